"""What the UI's JSON API answers, computed in DuckDB over the audit store.

Why a module of its own: the pages and scripts read the same objects (`/api/...`), and the
benchmark (bench/ui.py) times these functions without a server. The browser never receives
more points than it can draw: curves are cut to min/max per pixel bucket (a spike one step
wide survives any zoom level), heatmaps are aggregated per (parameter, step bucket) in DuckDB,
and over a large run from a per-run block cache built once (LayerCache).

Every query runs on a per-request cursor of one sandboxed connection (`open_store(...,
sandbox=True)`, the `k2repro sql` sandbox): read-only views, no file access outside the store.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from k2repro.errors import BadInputError
from k2repro.ui.heatmap import Cells, LayerCache, bucket_starts, merge_rows

log = logging.getLogger(__name__)

#: `steps` columns that can be drawn as a curve (numbers only)
CURVE_COLUMNS = ("loss", "grad_norm", "lr", "tokens", "step_time_s", "tokens_per_s", "loss_min", "loss_max",
                 "loss_std", "logz_mean", "mfu", "peak_mem_bytes", "n_samples")
#: `layer_stats` columns a heatmap can show
LAYER_COLUMNS = ("grad_norm", "param_norm", "update_norm", "update_ratio", "grad_max_abs")
HEAT_AGGS = ("max", "mean", "min")
MAX_POINTS = 20_000       # per curve request (a 4k screen is ~4,000 px wide; min+max per px)
MAX_BUCKETS = 2_000       # heatmap step buckets per request
CACHE_MIN_ROWS = 2_000_000  # below this many layer rows a raw aggregate is as fast as the cache


class NotFound(BadInputError):
    """An unknown run, step or spike: the API answers 404."""


class BadParam(BadInputError):
    """A malformed or out-of-range query parameter: the API answers 400."""


def as_int(v: Any, name: str, lo: int | None = None, hi: int | None = None, default: int | None = None) -> int | None:
    """Parse an integer query parameter; BadParam naming it otherwise."""
    if v is None or v == "":
        return default
    try:
        n = int(str(v), 10)
    except ValueError:
        raise BadParam(f"parameter '{name}': expected an integer, got {str(v)[:40]!r}") from None
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        raise BadParam(f"parameter '{name}': {n} is out of range [{lo}, {hi}]")
    return n


def choice(v: Any, name: str, allowed: tuple[str, ...], default: str) -> str:
    if v is None or v == "":
        return default
    if v not in allowed:
        raise BadParam(f"parameter '{name}': {str(v)[:40]!r} is not one of {', '.join(allowed)}")
    return str(v)


def _num(v: Any) -> Any:
    """JSON-safe value: NaN/inf become None, numpy scalars plain Python, timestamps ISO text."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        return _num(v.item())
    return v


def _rows(cur: Any) -> list[dict[str, Any]]:
    cols = [d[0] for d in cur.description]
    return [{c: _num(v) for c, v in zip(cols, r)} for r in cur.fetchall()]


class StoreReader:
    """The UI's read-only view of one store: a sandboxed connection, a cursor per request."""

    def __init__(self, root: str | Path | None, cache_min_rows: int = CACHE_MIN_ROWS) -> None:
        from k2repro.audit.store import open_store

        self.cache_min_rows = cache_min_rows
        self._store = open_store(root, sandbox=True)
        self.root = self._store.root
        self.layer_cache = LayerCache()
        self._lock = threading.Lock()
        self._runs_cache: tuple[tuple, list[dict[str, Any]]] | None = None
        self._ids: set[str] = set()

    def close(self) -> None:
        self._store.close()

    @contextmanager
    def cursor(self) -> Iterator[Any]:
        """A Store on its own DuckDB cursor: thread-safe, and `interrupt()` stops only its query."""
        from k2repro.audit.store import Store

        s = Store(self.root, self._store.con.cursor(), True)
        try:
            yield s
        finally:
            s.con.close()

    # ------------------------------------------------------------------ runs
    def _signature(self) -> tuple:
        """(path, size, mtime) of every segment and heartbeat of the store: the runs page is
        recomputed only when one changed (the views read every small file again, ~6 ms per run
        here; a listing of the folder tree costs a fraction of that)."""
        sig = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in filenames:
                if f.endswith((".parquet", ".json")):
                    try:
                        st = os.stat(os.path.join(dirpath, f))
                    except OSError:
                        continue
                    sig.append((dirpath, f, st.st_size, st.st_mtime_ns))
        sig.sort()
        return tuple(sig)

    def runs(self) -> list[dict[str, Any]]:
        """Every run with status, lineage, step count, last loss and tags, newest first.
        Cached while no file of the store changed and no run is live (a running run's status
        can turn `crashed` with no file written, so then it is recomputed each time)."""
        sig = self._signature()
        with self._lock:
            hit = self._runs_cache
        if hit is not None and hit[0] == sig and not any(r["status"] == "running" for r in hit[1]):
            return hit[1]
        with self.cursor() as s:
            cur = s.execute(
                "WITH st AS (SELECT run_id, count(*) AS steps, max(step) AS last_step, "
                "            arg_max(loss, step) AS last_loss, sum(tokens) AS tokens FROM steps GROUP BY run_id), "
                "tg AS (SELECT run_id, any_value(value) AS tags FROM hparams WHERE key = 'run.tags' GROUP BY run_id) "
                "SELECT r.run_id, r.name, r.status, r.source, r.started_at, r.ended_at, r.parent_run_id, "
                "       r.resumed_from_step, r.world_size, r.host, r.config_hash, r.git_commit, "
                "       l.lineage_root, l.depth, st.steps, st.last_step, st.last_loss, st.tokens, tg.tags "
                "FROM runs r LEFT JOIN lineage l USING (run_id) LEFT JOIN st USING (run_id) "
                "LEFT JOIN tg USING (run_id) ORDER BY r.started_at DESC NULLS LAST, r.run_id")
            out = _rows(cur)
        for r in out:  # run.tags is stored as JSON text of a list; anything else shows as one tag
            t = _json(r.get("tags")) if r.get("tags") else []
            r["tags"] = [str(x) for x in t] if isinstance(t, list) else [str(t)]
        with self._lock:
            self._runs_cache = (sig, out)
            self._ids = {r["run_id"] for r in out}
        return out

    def resolve(self, s: Any, ref: str) -> str:
        """An exact run id known from the last listing answers at once (`resolve_run_id` reads
        every runs segment: ~40 ms on a large store); anything else goes through it."""
        with self._lock:
            if ref in self._ids:
                return ref
        try:
            rid = s.resolve_run_id(ref)
        except BadInputError as exc:
            raise NotFound(str(exc)) from None
        if rid == ref:
            with self._lock:
                self._ids.add(rid)
        return rid

    def run(self, ref: str) -> dict[str, Any]:
        """One run: its row, hparams, env (rank 0), data manifest, checkpoints, events, spikes,
        the columns and metric series it can draw, and its lineage family."""
        from k2repro.audit.lineage import family

        with self.cursor() as s:
            rid = self.resolve(s, ref)
            row = {k: _num(v) for k, v in s.run(rid).items()}
            row.pop("config_json", None)  # the hparams hold it key by key
            hp = _rows(s.execute("SELECT key, value, value_type FROM hparams WHERE run_id = ? ORDER BY key", [rid]))
            env = _rows(s.execute("SELECT rank, key, value FROM env WHERE run_id = ? ORDER BY rank, key", [rid]))
            data = _rows(s.execute("SELECT * EXCLUDE (run_id) FROM data_manifest WHERE run_id = ? ORDER BY artifact",
                                   [rid]))
            ck = _rows(s.execute("SELECT step, path, manifest_sha256, bytes, save_s, time FROM checkpoints "
                                 "WHERE run_id = ? ORDER BY step", [rid]))
            ev = _rows(s.execute("SELECT time, rank, step, kind, severity, detail FROM events WHERE run_id = ? "
                                 "AND kind <> 'git_diff' ORDER BY time LIMIT 2000", [rid]))
            sp = self._spikes(s, rid)
            span = s.execute("SELECT min(step), max(step), count(*) FROM steps WHERE run_id = ?", [rid]).fetchone()
            have = s.execute("SELECT " + ", ".join(f"count({c}) > 0" for c in CURVE_COLUMNS)
                             + " FROM steps WHERE run_id = ?", [rid]).fetchone()
            metrics = [r[0] for r in s.execute("SELECT DISTINCT name FROM metrics WHERE run_id = ? ORDER BY name",
                                               [rid]).fetchall()]
            n_layer = s.execute("SELECT count(*) FROM layer_stats WHERE run_id = ? LIMIT 1", [rid]).fetchone()[0]
            n_evals = s.execute("SELECT count(*) FROM evals WHERE run_id = ?", [rid]).fetchone()[0]
            fam = family(s, rid)
        for e in ev:
            e["detail"] = _json(e.get("detail"))
        return {"run": row, "hparams": hp, "env": env, "data_manifest": data, "checkpoints": ck, "events": ev,
                "spikes": sp, "first_step": span[0], "last_step": span[1], "n_steps": span[2],
                "columns": [c for c, h in zip(CURVE_COLUMNS, have) if h], "metrics": metrics,
                "has_layers": n_layer > 0, "n_evals": n_evals, "family": fam}

    # ------------------------------------------------------------------ curves
    def curve(self, ref: str, col: str = "loss", lo: int | None = None, hi: int | None = None,
              points: int = 2000, raw: bool = False, x: str = "step") -> dict[str, Any]:
        """One series of a run between steps lo..hi: all points when they fit, else the min and
        the max of every one of `points // 2` step buckets (spikes survive), with tokens and
        time at each kept step so the page can draw x in steps, tokens or wall time."""
        metric = col.startswith("metric:")
        name = col[len("metric:"):] if metric else col
        if not metric and col not in CURVE_COLUMNS:
            raise BadParam(f"parameter 'col': unknown steps column {col[:40]!r} (one of {', '.join(CURVE_COLUMNS)}, "
                           f"or metric:<name>)")
        t0 = time.perf_counter()
        with self.cursor() as s:
            rid = self.resolve(s, ref)
            if metric:
                src = ("(SELECT step, value AS y, NULL::BIGINT AS tok, epoch(time) AS t FROM metrics "
                       "WHERE run_id = $rid AND name = $name AND step IS NOT NULL)")
            else:
                tok = "sum(tokens) OVER (ORDER BY step ROWS UNBOUNDED PRECEDING)" if x == "tokens" else "NULL::BIGINT"
                src = (f"(SELECT step, {name}::DOUBLE AS y, {tok} AS tok, epoch(time) AS t FROM steps "
                       f"WHERE run_id = $rid)")
            params: dict[str, Any] = {"rid": rid}
            if metric:
                params["name"] = name
            # one scan for the run's span, the points in range and the non-finite steps in range
            span = s.execute(
                f"SELECT min(step), max(step), count(y) FILTER (step BETWEEN $lo AND $hi AND isfinite(y)), "
                f"list(step ORDER BY step) FILTER (step BETWEEN $lo AND $hi AND y IS NOT NULL AND NOT isfinite(y)), "
                f"min(step) FILTER (step BETWEEN $lo AND $hi), max(step) FILTER (step BETWEEN $lo AND $hi) FROM {src}",
                {**params, "lo": -(2**62) if lo is None else lo, "hi": 2**62 if hi is None else hi}).fetchone()
            if span[0] is None:
                if metric:
                    raise NotFound(f"run '{rid}' has no metric series {name[:60]!r}")
                return {"run_id": rid, "col": col, "x": x, "lo": None, "hi": None, "first_step": None,
                        "last_step": None, "n": 0, "downsampled": False, "step": [], "y": [], "tokens": [],
                        "time": [], "nonfinite": [], "ms": 0.0}
            lo = span[0] if lo is None else max(lo, span[0])
            hi = span[1] if hi is None else min(hi, span[1])
            if hi < lo:
                raise BadParam(f"parameters 'lo'/'hi': empty range {lo}..{hi} (the run has steps "
                               f"{span[0]}..{span[1]})")
            params.update(lo=lo, hi=hi)
            n, bad = span[2], (span[3] or [])[:1000]
            nb = max(1, points // 2)
            if raw or n <= points:
                rows = s.execute(f"SELECT step, y, tok, t FROM {src} WHERE step BETWEEN $lo AND $hi "
                                 f"AND isfinite(y) ORDER BY step", params).fetchall()
            else:
                rows = s.execute(
                    f"WITH b AS (SELECT step, y, tok, t, ((step - $lo) * $nb // ($hi - $lo + 1)) AS b "
                    f"           FROM {src} WHERE step BETWEEN $lo AND $hi AND isfinite(y)), "
                    f"m AS (SELECT arg_min({{'step': step, 'y': y, 'tok': tok, 't': t}}, y) AS a, "
                    f"             arg_max({{'step': step, 'y': y, 'tok': tok, 't': t}}, y) AS z FROM b GROUP BY b) "
                    f"SELECT DISTINCT p.step, p.y, p.tok, p.t FROM (SELECT unnest([a, z]) AS p FROM m) ORDER BY 1",
                    {**params, "nb": nb}).fetchall()
        return {"run_id": rid, "col": col, "x": x, "lo": lo, "hi": hi, "first_step": span[0], "last_step": span[1],
                "n": n, "downsampled": not (raw or n <= points), "step": [r[0] for r in rows],
                "y": [r[1] for r in rows], "tokens": [r[2] for r in rows],
                "time": [r[3] for r in rows], "nonfinite": list(bad),
                "ms": round((time.perf_counter() - t0) * 1000, 2)}

    # ------------------------------------------------------------------ layers
    def heatmap(self, ref: str, col: str = "update_ratio", lo: int | None = None, hi: int | None = None,
                buckets: int = 400, agg: str = "max", cache: bool = True) -> dict[str, Any]:
        """A `layer_stats` column as parameter x step-bucket, aggregated in DuckDB (or from the
        per-run block cache when each bucket spans at least one cache block)."""
        import numpy as np

        if col not in LAYER_COLUMNS:
            raise BadParam(f"parameter 'col': unknown layer_stats column {col[:40]!r} (one of {', '.join(LAYER_COLUMNS)})")
        t0 = time.perf_counter()
        with self.cursor() as s:
            rid = self.resolve(s, ref)
            entry = self.layer_cache.peek(rid, col) if cache else None
            if entry is not None:  # the span is known; only steps logged since can be new
                tail = s.execute("SELECT max(step) FROM layer_stats WHERE run_id = ? AND step > ?",
                                 [rid, entry["last"]]).fetchone()[0]
                first, last, nrows = entry["first"], max(entry["last"], tail or entry["last"]), self.cache_min_rows
            else:
                first, last, nrows = s.execute("SELECT min(step), max(step), count(*) FROM layer_stats "
                                               "WHERE run_id = ?", [rid]).fetchone()
            if first is None:
                raise NotFound(f"run '{rid}' has no layer_stats (audit.layer_stats_every off, or an import)")
            lo = first if lo is None else max(lo, first)
            hi = last if hi is None else min(hi, last)
            if hi < lo:
                raise BadParam(f"parameters 'lo'/'hi': empty range {lo}..{hi} (layer_stats cover {first}..{last})")
            nb = max(1, min(buckets, hi - lo + 1))
            width = (hi - lo + 1) / nb
            if cache and entry is None and nrows >= self.cache_min_rows:
                entry = self.layer_cache.get(self, rid, col, first, last)
            use_cache = entry is not None and width >= entry["k"]
            if not use_cache:  # layer stats every N steps: no more buckets than logged steps (no empty stripes)
                logged = s.execute("SELECT count(DISTINCT step) FROM layer_stats WHERE run_id = ? AND step BETWEEN ? AND ?",
                                   [rid, lo, hi]).fetchone()[0]
                nb = max(1, min(nb, logged))
            params: list[str] = list(entry["params"]) if use_cache else []
            cells = None
            if use_cache:
                lo, hi, cells = Cells.from_cache(entry, lo, hi, nb)
            tail_lo = max(lo, entry["last"] + 1) if use_cache else lo
            extra: dict[str, Any] = {"param": np.array([], dtype=object)}
            if tail_lo <= hi:
                extra = s.execute(
                    f"SELECT param, ((step - ?) * ? // (? - ? + 1)) AS b, max({col}) AS mx, min({col}) AS mn, "
                    f"sum({col}) AS sm, count({col}) AS ct FROM layer_stats WHERE run_id = ? AND step BETWEEN ? AND ? "
                    f"AND isfinite({col}) GROUP BY ALL", [lo, nb, hi, lo, rid, tail_lo, hi]).fetchnumpy()
            params, cells = merge_rows(params, cells, extra, nb)
        z = cells.values(agg, len(params), nb)
        starts = bucket_starts(lo, hi, nb, entry["k"] if use_cache else None)
        return {"run_id": rid, "col": col, "agg": agg, "lo": lo, "hi": hi, "first_step": first, "last_step": last,
                "params": params, "bucket_start": starts, "z": z, "cached": use_cache,
                "ms": round((time.perf_counter() - t0) * 1000, 2)}

    # ------------------------------------------------------------------ step, spikes, evals
    def step(self, ref: str, step: int) -> dict[str, Any]:
        """A step's batch as `k2repro batch` shows it (tools/batch.py), plus the step's row and
        its events (injected faults, guard actions)."""
        from k2repro.tools.batch import batch_lookup

        with self.cursor() as s:
            rid = self.resolve(s, ref)
            try:
                out = batch_lookup(s, rid, step, text=True)
            except BadInputError as exc:
                if "has no step" in str(exc):
                    raise NotFound(str(exc)) from None
                raise
            row = _rows(s.execute("SELECT * EXCLUDE (run_id) FROM steps WHERE run_id = ? AND step = ? "
                                  "ORDER BY time DESC NULLS LAST LIMIT 1", [rid, step]))
            ev = _rows(s.execute("SELECT time, rank, kind, severity, detail FROM events WHERE run_id = ? AND step = ? "
                                 "ORDER BY time", [rid, step]))
            prev_next = s.execute("SELECT max(step) FILTER (step < ?), min(step) FILTER (step > ?) FROM steps "
                                  "WHERE run_id = ?", [step, step, rid]).fetchone()
        for e in ev:
            e["detail"] = _json(e.get("detail"))
        out["row"] = row[0] if row else None
        out["events"] = ev
        out["prev_step"], out["next_step"] = prev_next
        return {k: _clean(v) for k, v in out.items()}

    def _spikes(self, s: Any, rid: str) -> list[dict[str, Any]]:
        rows = _rows(s.execute("SELECT * EXCLUDE (run_id, detail) FROM spikes WHERE run_id = ? "
                               "ORDER BY onset_step, spike_id", [rid]))
        for r in rows:
            r["top_samples"] = _json(r.get("top_samples"))
        return rows

    def spikes(self, ref: str) -> list[dict[str, Any]]:
        with self.cursor() as s:
            return self._spikes(s, self.resolve(s, ref))

    def spike(self, ref: str, spike_id: int) -> dict[str, Any]:
        """One forensics episode: its row and the whole result object forensics stored in
        `detail` (precursors, layers, samples, faults nearby, reason)."""
        with self.cursor() as s:
            rid = self.resolve(s, ref)
            rows = _rows(s.execute("SELECT * EXCLUDE (run_id) FROM spikes WHERE run_id = ? AND spike_id = ? "
                                   "ORDER BY detected_at DESC NULLS LAST LIMIT 1", [rid, spike_id]))
        if not rows:
            raise NotFound(f"run '{rid}' has no spike {spike_id} (run `k2repro forensics {rid}` to find spikes)")
        r = rows[0]
        r["detail"] = _json(r.get("detail")) or {}
        r["top_samples"] = _json(r.get("top_samples"))
        r["run_id"] = rid
        return _clean(r)

    def evals(self, ref: str) -> dict[str, Any]:
        """Every evaluation of the run's checkpoints, by metric (val/ppl/<domain> per domain)."""
        with self.cursor() as s:
            rid = self.resolve(s, ref)
            rows = _rows(s.execute("SELECT step, metric, value, n_tokens, time, manifest_sha256 FROM evals "
                                   "WHERE run_id = ? ORDER BY metric, step, time", [rid]))
        series: dict[str, dict[int, float | None]] = {}
        for r in rows:  # the latest evaluation of a (metric, checkpoint) wins
            series.setdefault(r["metric"], {})[r["step"]] = r["value"]
        return {"run_id": rid, "rows": rows,
                "series": {m: {"step": sorted(v), "value": [v[k] for k in sorted(v)]} for m, v in series.items()}}

    # ------------------------------------------------------------------ compare, diff
    def diff(self, a: str, b: str) -> dict[str, Any]:
        """`k2repro diff A B` (tools/diff.py): config, env, data and the first divergence."""
        from k2repro.tools.diff import diff_runs

        with self.cursor() as s:
            ra, rb = self.resolve(s, a), self.resolve(s, b)
            return _clean(diff_runs(s, ra, s, rb))

    # ------------------------------------------------------------------ sql
    def sql(self, query: str, limit: int, timeout: float) -> dict[str, Any]:
        """`k2repro sql`'s allow-list and sandbox, with a time and a row limit."""
        from k2repro.audit.readonly import check_read_only, run_query

        check_read_only(query)
        t0 = time.perf_counter()
        with self.cursor() as s:
            cols, rows, truncated = run_query(s, query, None, timeout, max_rows=limit)
        return {"columns": cols, "rows": [[_clean(v) for v in r] for r in rows], "truncated": truncated,
                "limit": limit, "ms": round((time.perf_counter() - t0) * 1000, 2)}


def _json(v: Any) -> Any:
    if not isinstance(v, str):
        return v
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def _clean(v: Any) -> Any:
    """Deep JSON-safe copy (non-finite floats -> None)."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return _num(v)


__all__ = ["CURVE_COLUMNS", "LAYER_COLUMNS", "HEAT_AGGS", "MAX_POINTS", "MAX_BUCKETS", "NotFound", "BadParam",
           "StoreReader", "as_int", "choice"]
