"""What forensics reads from the audit store, as SQL against the store's views (docs/architecture.md,
"The audit store"): `steps` as numpy arrays (one row per step, the only table read whole), and
`layer_stats` / `sample_stats` only in windows around episodes, so a 100M-row layer log is
never loaded. Works on any DuckDB connection with those views (a Store's `.con`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

RUN_COLUMNS = ("run_id", "name", "status", "source", "started_at", "ended_at", "parent_run_id",
               "resumed_from_step", "world_size", "config_hash", "git_commit")
STEP_SIGNALS = ("loss", "grad_norm", "lr", "loss_max", "loss_std", "logz_mean")
LAYER_COLUMNS = ("grad_norm", "param_norm", "update_norm", "update_ratio", "grad_max_abs")


@dataclass
class LayerWindow:
    """layer_stats rows around an episode as matrices: `stats[c][i, j]` is column c at
    `steps[i]` for parameter `params[j]` (NaN where not logged). Steps ascend and params
    are sorted, so each analysis is a few numpy reductions, not a pandas pivot per episode."""

    steps: np.ndarray
    params: list[str]
    stats: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, step: Any, param: Any, cols: dict[str, Any]) -> LayerWindow:
        step = np.asarray(step, dtype=np.int64)
        if step.size == 0:
            return cls(np.zeros(0, dtype=np.int64), [], {c: np.zeros((0, 0)) for c in cols})
        steps, si = np.unique(step, return_inverse=True)
        params, pi = np.unique(np.asarray(param, dtype=object).astype(str), return_inverse=True)
        stats = {}
        for c, v in cols.items():
            m = np.full((steps.size, params.size), np.nan)
            # a (step, param) logged twice keeps its last row, as the steps table does
            m[si, pi] = np.ma.filled(np.ma.asarray(v, dtype=np.float64), np.nan)
            stats[c] = m
        return cls(steps, [str(q) for q in params], stats)

    def __len__(self) -> int:
        return int(self.steps.size)

    def has(self, c: str) -> bool:
        """Column c was read and holds a value somewhere in the window."""
        m = self.stats.get(c)
        return m is not None and bool(np.isfinite(m).any())


def finite_any(a: np.ndarray | None) -> bool:
    """`a` holds a finite value: an absent column, an empty one or one all NaN is no signal."""
    return a is not None and a.size > 0 and bool(np.isfinite(a).any())


def open_source(path: str | os.PathLike) -> Any:
    """The audit store at `path` (k2repro.open_store), for analyze_run."""
    import k2repro

    return k2repro.open_store(str(path))


def connection(con_or_store: Any) -> Any:
    """Accept a Store (anything with `.con`) or a DuckDB connection."""
    return getattr(con_or_store, "con", con_or_store)


@contextmanager
def footer_cache(con: Any) -> Iterator[None]:
    """Parquet footers cached on `con` for the block, then the connection's own setting back:
    forensics speeds up the caller's connection while it reads, and leaves it as it was.
    Every layer/sample window query would otherwise parse the footers of every segment again
    (half the time of a window on a 100M-row log); segments are immutable once renamed into
    place, so a cached footer never goes stale."""
    try:
        before = con.execute("SELECT current_setting('parquet_metadata_cache')").fetchone()[0]
        con.execute("SET parquet_metadata_cache = true")
    except Exception:  # noqa: BLE001 - a connection without the setting: just slower
        before = None
    try:
        yield
    finally:
        if before is not None:
            con.execute(f"SET parquet_metadata_cache = {'true' if before else 'false'}")


class RunSource:
    """Queries about one run; every query is parameterised and filtered by run_id."""

    def __init__(self, con_or_store: Any, run_id: str) -> None:
        self.con = connection(con_or_store)
        self.run_id = run_id
        self._cols: dict[str, set[str]] = {}

    def columns(self, table: str) -> set[str]:
        if table not in self._cols:
            try:
                rows = self.con.execute(f"DESCRIBE {table}").fetchall()
                self._cols[table] = {r[0] for r in rows}
            except Exception:  # noqa: BLE001 - a store without that view: treat as empty
                self._cols[table] = set()
        return self._cols[table]

    def _q(self, sql: str, params: list | None = None) -> Any:
        return self.con.execute(sql, [self.run_id, *(params or [])])

    def has_rows(self, table: str) -> bool:
        if "run_id" not in self.columns(table):
            return False
        return self._q(f"SELECT 1 FROM {table} WHERE run_id = ? LIMIT 1").fetchone() is not None

    def exists(self) -> bool:
        # the store's raw runs table when it has one: the `runs` view derives status (slower)
        return self.has_rows("runs_raw" if self.columns("runs_raw") else "runs") or self.has_rows("steps")

    def run_row(self) -> dict:
        """The run's `runs` row (from the raw table when the store has one: the `runs` view's
        derived status costs a heartbeat scan, and forensics does not need it)."""
        table = "runs_raw" if self.columns("runs_raw") else "runs"
        if not self.has_rows(table):
            return {}
        have = self.columns(table)
        cols = [c for c in RUN_COLUMNS if c in have]
        cur = self._q(f"SELECT {', '.join(cols)} FROM {table} WHERE run_id = ? LIMIT 1")
        row = cur.fetchone()
        return {d[0]: _py(v) for d, v in zip(cur.description, row, strict=True)}

    def steps(self, primary: str = "loss") -> dict[str, np.ndarray]:
        """Step-ordered arrays of the step signals present (absent columns left out). Rows
        where `primary` is NULL (not logged, as in an import that logs it every N steps) are
        left out, so that a missing value is never read as a NaN loss; their count is in
        `self.unlogged`. A step logged twice keeps one of its rows (`self.dup_steps`)."""
        have = self.columns("steps")
        cols = [c for c in (*STEP_SIGNALS, "skipped") if c in have]
        # NULL -> NaN / false in SQL, so the arrays come back plain (not masked)
        sel = ", ".join(f"coalesce({c}::DOUBLE, 'NaN'::DOUBLE) AS {c}" if c != "skipped"
                        else "coalesce(skipped, false) AS skipped" for c in cols)
        where = f" AND {primary} IS NOT NULL" if primary in have else ""
        res = self._q(
            f"SELECT step::BIGINT AS step{', ' if sel else ''}{sel} FROM steps "
            f"WHERE run_id = ? AND step IS NOT NULL{where}"
        ).fetchnumpy()
        # segments are written in step order, so the rows usually come back sorted: a
        # check costs a millisecond where DuckDB's ORDER BY costs a sort of every row
        order = None
        step0 = np.asarray(res["step"], dtype=np.int64)
        if step0.size > 1 and np.any(step0[1:] < step0[:-1]):
            order = np.argsort(step0, kind="stable")
        self.unlogged = 0
        if where:
            self.unlogged = int(self._q(
                f"SELECT count(*) FROM steps WHERE run_id = ? AND {primary} IS NULL").fetchone()[0])
        out: dict[str, np.ndarray] = {}
        step = step0 if order is None else step0[order]
        keep = np.ones(step.size, dtype=bool)
        if step.size > 1:
            keep[:-1] = step[1:] != step[:-1]
        self.dup_steps = int((~keep).sum())
        out["step"] = step if keep.all() else step[keep]
        for c in cols:
            arr = np.asarray(res[c], dtype=bool if c == "skipped" else np.float64)
            arr = arr if order is None else arr[order]
            out[c] = arr if keep.all() else arr[keep]
        return out

    def layer_window(self, lo: int, hi: int) -> LayerWindow:
        """layer_stats rows with lo <= step <= hi, as step x param matrices."""
        have = self.columns("layer_stats")
        cols = [c for c in LAYER_COLUMNS if c in have]
        sel = ", ".join(f"{c}::DOUBLE AS {c}" for c in cols)
        res = self._q(
            f"SELECT step::BIGINT AS step, param::VARCHAR AS param{', ' if sel else ''}{sel} "
            "FROM layer_stats WHERE run_id = ? AND step BETWEEN ? AND ?",
            [int(lo), int(hi)],
        ).fetchnumpy()
        return LayerWindow.from_rows(res["step"], res["param"], {c: res[c] for c in cols})

    def samples(self, lo: int, hi: int) -> Any:
        have = self.columns("sample_stats")
        extra = [c for c in ("rank", "n_tokens") if c in have]
        sel = "".join(f", {c}" for c in extra)
        return self._q(
            f"SELECT step::BIGINT AS step, sample_id::BIGINT AS sample_id, loss::DOUBLE AS loss{sel} "
            "FROM sample_stats WHERE run_id = ? AND step BETWEEN ? AND ? ORDER BY step, sample_id",
            [int(lo), int(hi)],
        ).df()

    def events(self) -> list[dict]:
        if not self.has_rows("events"):
            return []
        have = self.columns("events")
        cols = [c for c in ("step", "kind", "severity", "detail") if c in have]
        df = self._q(f"SELECT {', '.join(cols)} FROM events WHERE run_id = ? ORDER BY step").df()
        return [{k: _py(v) for k, v in row.items()} for row in df.to_dict("records")]

    def hparams(self) -> dict[str, str]:
        if not self.has_rows("hparams"):
            return {}
        rows = self._q("SELECT key, value FROM hparams WHERE run_id = ?").fetchall()
        return {str(k): v for k, v in rows}

    def manifest(self) -> list[dict]:
        if not self.has_rows("data_manifest"):
            return []
        df = self._q("SELECT * FROM data_manifest WHERE run_id = ?").df()
        return [{k: _py(v) for k, v in row.items()} for row in df.to_dict("records")]


def _py(v: Any) -> Any:
    """numpy / pandas scalars to plain Python (JSON-friendly)."""
    if v is None:
        return None
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    try:
        import pandas as pd

        if v is pd.NaT or (not isinstance(v, (str, bytes, list, dict)) and pd.isna(v)):
            return None
        if isinstance(v, pd.Timestamp):
            return v.isoformat()
    except (TypeError, ValueError):
        pass
    return v
