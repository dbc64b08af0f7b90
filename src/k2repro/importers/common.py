"""What every importer shares: the metric-name table, the parsed run (`ImportedRun`), its
conversion to the audit store's tables, and the one transaction that writes it.

An importer only parses. It raises `BadInputError("<file>:<line>: ...")` for anything
malformed, before the store is touched; `commit_runs` then turns every parsed run into Arrow
tables (still before the store is touched) and writes each run with
`k2repro.audit.writer.write_run_tables` (a dot folder renamed into place). A second import of
the same content with the same options is idempotent (the existing run is reported, nothing is
written); with different options it is refused, so the store never holds a duplicate.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2repro.errors import BadInputError
from k2repro.importers.values import check_run_values, check_step_range, show

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import pyarrow as pa

    from k2repro.importers.stitch import Link

KINDS = ("wandb-csv", "tensorboard", "megatron-log", "csv")

# ----------------------------------------------------------------------------- metric names

#: `steps` columns an imported series can fill, by Arrow type.
STEP_FLOAT = ("loss", "grad_norm", "lr", "step_time_s", "tokens_per_s", "loss_min", "loss_max",
              "loss_std", "logz_mean", "mfu")
STEP_INT = ("tokens", "n_samples", "peak_mem_bytes")
STEP_BOOL = ("skipped", "clipped")
STEP_COLUMNS = (*STEP_FLOAT, *STEP_INT, *STEP_BOOL, "time")

#: Source name (compared lower-cased, spaces trimmed) -> (target, scale). A target that is a
#: `steps` column fills it; any other target is a series name in the `metrics` table.
DEFAULT_MAP: dict[str, tuple[str, float]] = {}


def _add(target: str, *names: str, scale: float = 1.0) -> None:
    for n in names:
        DEFAULT_MAP[n] = (target, scale)


_add("step", "step", "_step", "iteration", "iter", "global_step", "trainer/global_step",
     "train/global_step")
_add("loss", "loss", "lm loss", "lm_loss", "lm-loss", "train/loss", "train_loss", "training_loss",
     "train/lm_loss", "train/lm loss", "train/loss_step", "lm-loss-training/lm loss")
_add("grad_norm", "grad_norm", "grad-norm", "grad norm", "gradient_norm", "train/grad_norm",
     "grad-norm/grad-norm", "optim/grad_norm")
_add("lr", "lr", "learning-rate", "learning_rate", "learning rate", "train/lr",
     "train/learning_rate", "optim/lr", "learning-rate/learning-rate")
_add("loss_scale", "loss-scale", "loss_scale", "loss scale", "loss-scale/loss-scale")
_add("step_time_s", "step_time_s", "step_time", "train/step_time", "iteration-time",
     "iteration-time/iteration-time")
_add("step_time_s", "elapsed time per iteration (ms)", "elapsed_time_per_iteration_ms", scale=1e-3)
_add("tokens_per_s", "tokens_per_s", "tokens_per_second", "train/tokens_per_second",
     "throughput/tokens_per_s")
_add("n_samples", "n_samples", "global batch size", "batch-size", "batch_size", "global_batch_size",
     "batch-size/batch-size")
_add("tokens", "tokens", "n_tokens", "batch_tokens")
_add("consumed_samples", "consumed samples", "consumed_samples")
_add("consumed_tokens", "consumed tokens", "consumed_tokens")
_add("num_zeros", "num zeros", "num-zeros", "num_zeros")
_add("params_norm", "params norm", "params-norm", "params_norm")
_add("mfu", "mfu", "perf/mfu")
_add("time", "time", "_timestamp", "timestamp")
for _c in STEP_COLUMNS:
    DEFAULT_MAP.setdefault(_c, (_c, 1.0))

#: Names a `--map` side is recognised as a k2repro target by.
KNOWN_TARGETS = frozenset({"step", *STEP_COLUMNS} | {t for t, _ in DEFAULT_MAP.values()})


def norm_name(name: str) -> str:
    return name.strip().lower()


@dataclass(frozen=True)
class NameMap:
    """The default table extended by `--map` pairs (source name -> (target, scale)); a target
    of None drops the series."""

    pairs: Mapping[str, tuple[str | None, float]]
    explicit: Mapping[str, str | None] = field(default_factory=dict)

    @classmethod
    def build(cls, specs: Sequence[str] = ()) -> NameMap:
        pairs: dict[str, tuple[str | None, float]] = dict(DEFAULT_MAP)
        explicit: dict[str, str | None] = {}
        for spec in specs:
            for item in spec.split(","):
                if not item.strip():
                    continue
                left, eq, right = item.partition("=")
                left, right = left.strip(), right.strip()
                if not eq or not left:
                    raise BadInputError(f"--map {item!r}: expected SOURCE=TARGET or TARGET=SOURCE")
                if not right:  # `--map name=`: leave that series out
                    pairs[norm_name(left)] = (None, 1.0)
                    explicit[norm_name(left)] = None
                    continue
                # Either order: `--map step=iter` (k2repro column first, as for generic CSV) or
                # `--map grad-norm=grad_norm` (W&B's old=new). The side that names a k2repro
                # column is the target; when both or neither do, the form is SOURCE=TARGET.
                lk, rk = left in KNOWN_TARGETS, right in KNOWN_TARGETS
                src, dst = (right, left) if lk and not rk else (left, right)
                pairs[norm_name(src)] = (dst, 1.0)
                explicit[norm_name(src)] = dst
        return cls(pairs, explicit)

    def target(self, name: str) -> tuple[str | None, float]:
        """(target, scale); an unmapped name keeps its own name as a `metrics` series."""
        return self.pairs.get(norm_name(name), (name.strip(), 1.0))

    def user_pairs(self) -> dict[str, str | None]:
        """The `--map` pairs as given (source -> target), for hparams and the options hash."""
        return dict(self.explicit)


# ----------------------------------------------------------------------------- parsed runs

@dataclass
class ImportedRun:
    """One run as an importer parsed it, before it becomes store tables.

    `steps` holds the step numbers (int64, strictly increasing, from 1) and `columns` the
    `steps` columns aligned with them (Arrow arrays: NULL where the source has no value, NaN
    where it logged NaN). `metrics` holds every other series as (steps, values). `times` are
    epoch seconds per step where the source has them."""

    kind: str
    path: str
    content_sha256: str
    source_run: str | None = None
    steps: Any = None                               # pa.Array int64
    columns: dict[str, Any] = field(default_factory=dict)   # steps column -> pa.Array
    metrics: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # name -> (steps, values)
    evals: list[tuple[int, str, float]] = field(default_factory=list)  # (step, metric, value)
    hparams: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    started_at: float | None = None
    ended_at: float | None = None
    world_size: int | None = None
    config: dict[str, Any] | None = None            # what the source holds as its config
    line_of: Any = None                             # row -> source line, for error messages

    def event(self, kind: str, step: int | None = None, severity: str = "info",
              time_s: float | None = None, **detail: Any) -> None:
        self.events.append({"kind": kind, "step": step, "severity": severity, "time": time_s,
                            "detail": detail})

    @property
    def n_steps(self) -> int:
        return 0 if self.steps is None else len(self.steps)


def bad(path: str | os.PathLike, line: int | None, msg: str) -> BadInputError:
    """The one error an import raises: `<file>:<line>: <what>`."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return BadInputError(f"{where}: {msg}")


def sha256_path(path: Path, pattern_files: Iterable[Path] | None = None) -> str:
    """sha256 of a file, or of a folder's files (relative names and bytes, sorted)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(pattern_files or ())
    for f in files:
        if not path.is_file():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def sha256_background(path: Path) -> Any:
    """Hash a file in a thread while the caller parses it (hashlib and DuckDB both release the
    GIL); `.result()` gives the hex digest."""
    from concurrent.futures import ThreadPoolExecutor

    ex = ThreadPoolExecutor(max_workers=1)
    fut = ex.submit(sha256_path, path)
    ex.shutdown(wait=False)
    return fut


def check_steps(path: str, steps: np.ndarray, line_of: Any, what: str = "step") -> None:
    """Steps must be integers >= 1 and strictly increasing. `line_of(i)` gives the source line
    of row i (only called on the error path)."""
    import numpy as np

    if steps.size == 0:
        return
    low = np.flatnonzero(steps < 1)
    if low.size:
        i = int(low[0])
        raise bad(path, line_of(i), f"{what} {int(steps[i])}: steps are numbered from 1 "
                  "(if the source counts from 0, pass --step-offset 1)")
    back = np.flatnonzero(np.diff(steps) <= 0)
    if back.size:
        i = int(back[0]) + 1
        word = "repeats" if steps[i] == steps[i - 1] else "goes back"
        raise bad(path, line_of(i), f"{what} {word} ({int(steps[i - 1])} then {int(steps[i])}) "
                  "without a restart marker")


def steps_from_float(path: str, x: np.ndarray, divisor: float, offset: int, line_of: Any,
                     what: str = "step") -> np.ndarray:
    """Step numbers from the source's step axis (iterations, samples or tokens): x / divisor +
    offset, which must be a whole number."""
    import numpy as np

    bad_val = np.flatnonzero(~np.isfinite(x))
    if bad_val.size:
        i = int(bad_val[0])
        raise bad(path, line_of(i), f"{what} value missing or not finite")
    q = x / divisor
    r = np.rint(q)
    check_step_range(path, r + offset, line_of, what)
    off = np.flatnonzero(np.abs(q - r) > 1e-6 * np.maximum(1.0, np.abs(q)))
    if off.size:
        i = int(off[0])
        hint = (f" (step axis / {divisor:g}); check --step-unit/--global-batch/--seq-len/"
                "--step-divisor (a batch-size ramp-up cannot be divided out)") if divisor != 1 else ""
        v = float(x[i])
        raise bad(path, line_of(i), f"{what} {int(v) if v.is_integer() else v!r} is not a whole "
                  f"number{hint}")
    return r.astype(np.int64) + int(offset)


# ----------------------------------------------------------------------------- tables

def _utc(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, tz=timezone.utc)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


def _steps_table(run: ImportedRun) -> pa.Table:
    import pyarrow as pa
    import pyarrow.compute as pc

    cols: dict[str, Any] = {"step": run.steps}
    for name, arr in run.columns.items():
        if name in STEP_INT:
            f = arr.cast(pa.float64())
            r = pc.round(f)
            if pc.any(pc.not_equal(f, r)).as_py():
                raise BadInputError(f"{run.path}: {name} has values that are not whole numbers")
            arr = r.cast(pa.int64())
        elif name in STEP_BOOL:
            arr = arr if pa.types.is_boolean(arr.type) else pc.not_equal(arr.cast(pa.float64()), 0.0)
        elif name == "time" and pa.types.is_timestamp(arr.type):
            arr = arr.cast(pa.timestamp("us", tz="UTC"))
        elif name == "time":  # epoch seconds
            arr = pc.multiply(arr.cast(pa.float64()), 1e6)
            arr = pc.round(arr).cast(pa.int64()).cast(pa.timestamp("us", tz="UTC"))
        else:
            arr = arr.cast(pa.float64())
        cols[name] = arr
    if "tokens_per_s" not in cols and "tokens" in cols and "step_time_s" in cols:
        cols["tokens_per_s"] = pc.divide(cols["tokens"].cast(pa.float64()), cols["step_time_s"])
    return pa.table(cols)


def _metrics_table(run: ImportedRun) -> pa.Table | None:
    import pyarrow as pa

    from k2repro.audit.writer import repeat_string

    if not run.metrics:
        return None
    steps, names, values = [], [], []
    for name, (s, v) in sorted(run.metrics.items()):
        s = s if isinstance(s, pa.Array) else pa.array(s, type=pa.int64())
        v = v if isinstance(v, pa.Array) else pa.array(v, type=pa.float64())
        if v.null_count:
            keep = v.is_valid()
            s, v = s.filter(keep), v.filter(keep)
        steps.append(s.cast(pa.int64()))
        values.append(v.cast(pa.float64()))
        names.append(repeat_string(name, len(s)))
    n = sum(map(len, steps))
    return pa.table({"step": pa.concat_arrays(steps), "name": pa.concat_arrays(names),
                     "value": pa.concat_arrays(values), "rank": pa.nulls(n, pa.int32())})


def _hparam_table(h: Mapping[str, Any]) -> dict[str, list]:
    from k2repro.audit.hparams import hparam_rows

    return hparam_rows(h)


def build_tables(run: ImportedRun, run_id: str, name: str, store_root: Path,
                 argv: Sequence[str] | None = None, parent_run_id: str | None = None,
                 resumed_from_step: int | None = None) -> dict[str, Any]:
    """The store tables of one imported run (Arrow tables / column dicts for
    write_run_tables, which conforms them to the schema and redacts them). `parent_run_id` /
    `resumed_from_step` link a restart segment or fork to its parent (importers/stitch.py)."""
    import k2repro

    now = datetime.now(timezone.utc).timestamp()
    steps = _steps_table(run)
    started = run.started_at
    ended = run.ended_at if run.ended_at is not None else now
    tables: dict[str, Any] = {
        "runs": {
            "name": [name], "started_at": [_utc(started if started is not None else now)],
            "parent_run_id": [parent_run_id], "resumed_from_step": [resumed_from_step],
            "source": [f"import:{run.kind}"],
            "config_hash": [None], "git_commit": [None], "git_dirty": [None],
            "world_size": [run.world_size], "host": [None], "pid": [None], "launcher": [None],
            "argv": [json.dumps(list(argv if argv is not None else sys.argv))],
            "config_json": [json.dumps(_jsonable(run.config), default=str) if run.config else None],
            "store_path": [str(store_root)], "schema_version": [None],
            "k2repro_version": [k2repro.__version__],
        },
        "hparams": _hparam_table(run.hparams),
        "steps": steps,
        "run_end": {"rank": [0], "status": ["completed"], "ended_at": [_utc(ended)],
                    "error": [None], "pid": [os.getpid()], "host": [socket.gethostname()]},
    }
    from k2repro.audit import schema as S

    tables["runs"]["schema_version"] = [S.SCHEMA_VERSION]
    metrics = _metrics_table(run)
    if metrics is not None and metrics.num_rows:
        tables["metrics"] = metrics
    if run.evals:
        tables["evals"] = {"step": [e[0] for e in run.evals], "metric": [e[1] for e in run.evals],
                           "value": [e[2] for e in run.evals]}
    events = [{"kind": "import", "step": None, "severity": "info", "time": now,
               "detail": {"kind": run.kind, "path": run.path, "content_sha256": run.content_sha256,
                          "source_run": run.source_run, "steps": run.n_steps,
                          "metrics": sorted(run.metrics)}}] + run.events
    tables["events"] = {
        "time": [_utc(e["time"] if e.get("time") is not None else now) for e in events],
        "rank": [0] * len(events),
        "step": [e.get("step") for e in events],
        "kind": [e["kind"] for e in events],
        "severity": [e.get("severity", "info") for e in events],
        "detail": [json.dumps(_jsonable(e.get("detail") or {}), default=str) for e in events],
    }
    return tables


# ----------------------------------------------------------------------------- the transaction

@dataclass
class ImportResult:
    run_id: str
    name: str
    source_run: str | None
    steps: int
    created: bool
    kind: str

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "name": self.name, "source_run": self.source_run,
                "steps": self.steps, "created": self.created, "source": f"import:{self.kind}"}


def identity(run: ImportedRun) -> str:
    """What makes two imports 'the same content': kind, file bytes, and which run of the file."""
    return hashlib.sha256(json.dumps([run.kind, run.content_sha256, run.source_run]).encode()).hexdigest()


def options_hash(options: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_jsonable(dict(options)), sort_keys=True, default=str)
                          .encode()).hexdigest()


def _existing(store_root: Path, identities: list[str]) -> dict[str, tuple[str, str | None, str | None]]:
    """identity -> (run_id, name, options hash) of runs already imported into the store."""
    if not store_root.is_dir() or not identities:
        return {}
    from k2repro.audit.store import open_store

    store = open_store(store_root)
    try:
        rows = store.execute(
            "SELECT i.value, i.run_id, r.name, o.value FROM hparams i "
            "LEFT JOIN runs_raw r USING (run_id) "
            "LEFT JOIN (SELECT run_id, value FROM hparams WHERE key = 'import.options_sha256') o "
            "USING (run_id) WHERE i.key = 'import.identity' AND list_contains(?, i.value)",
            [identities]).fetchall()
    finally:
        store.close()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def run_name(base: str, run: ImportedRun, n_runs: int) -> str:
    return base if n_runs == 1 or not run.source_run else f"{base}/{run.source_run}"


def commit_runs(store_root: str | Path, runs: Sequence[ImportedRun], name: str,
                options: Mapping[str, Any], argv: Sequence[str] | None = None,
                links: Sequence[Link] = ()) -> list[ImportResult]:
    """Write parsed runs to the store as one transaction: every table is built first, runs
    already imported with the same options are reported (idempotent), content already
    imported with other options is refused (BadInputError), and if writing run k fails the
    runs written before it are removed again. `links` (importers/stitch.py) set each linked
    run's parent and resume step and add a `stitch` event to it; what they link is part of the
    options hash, so the same content linked differently is refused, not duplicated."""
    from k2repro.audit.storemeta import check_store_path

    root = check_store_path(store_root)
    if not runs:
        raise BadInputError("nothing to import")
    for r in runs:  # every value against its column's limits, before anything is written
        check_run_values(r)
    if links:
        from k2repro.importers.stitch import describe

        options = {**options, "links": describe(runs, links)}
    opt_hash = options_hash(options)
    ids = [identity(r) for r in runs]
    with import_lock(root):
        return _commit_locked(root, runs, name, opt_hash, ids, argv, links)


@contextlib.contextmanager
def import_lock(root: Path) -> Iterator[None]:
    """One import at a time per store: "already imported?" and the write are one step, so
    identical imports started together make one run (without it, four made two in one try
    of three). An flock on the store folder itself: nothing is created in the store, and the
    kernel drops the lock when a killed import dies."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _commit_locked(root: Path, runs: Sequence[ImportedRun], name: str, opt_hash: str, ids: list[str],
                   argv: Sequence[str] | None, links: Sequence[Link]) -> list[ImportResult]:
    """commit_runs under the store's import lock."""
    from k2repro.audit.writer import write_run_tables
    from k2repro.core.ids import new_run_id

    prior = _existing(root, ids)
    for r, ident in zip(runs, ids, strict=True):
        if ident in prior and prior[ident][2] != opt_hash:
            rid, rname, _ = prior[ident]
            raise BadInputError(
                f"{r.path}: this content{f' (run {r.source_run!r})' if r.source_run else ''} was "
                f"already imported as run {rid} ({rname}) with other options; remove that run "
                "first to import it differently")
    run_ids = [prior[ident][0] if ident in prior else new_run_id() for ident in ids]
    link_of = {lk.child: lk for lk in links}
    planned: list[tuple[ImportedRun, str, str, dict[str, Any] | None]] = []
    for i, (r, ident) in enumerate(zip(runs, ids, strict=True)):
        nm = run_name(name, r, len(runs))
        if ident in prior:
            planned.append((r, run_ids[i], prior[ident][1] or nm, None))
            continue
        r.hparams["import.identity"] = ident
        r.hparams["import.options_sha256"] = opt_hash
        parent = resumed = None
        if (lk := link_of.get(i)) is not None:
            parent = lk.external if lk.parent is None else run_ids[lk.parent]
            resumed = lk.resumed_from_step
            r.event("stitch", step=resumed, **lk.detail(runs, parent))
        planned.append((r, run_ids[i], nm, build_tables(r, run_ids[i], nm, root, argv, parent, resumed)))
    written: list[Path] = []
    results = []
    try:
        for r, run_id, nm, tables in planned:
            if tables is not None:
                written.append(write_run_tables(root, run_id, tables))
            results.append(ImportResult(run_id, nm, r.source_run, r.n_steps, tables is not None, r.kind))
    except BaseException:
        for p in written:
            shutil.rmtree(p, ignore_errors=True)
        raise
    return results


# ----------------------------------------------------------------------------- CSV through DuckDB

def read_csv_header(path: Path) -> list[str]:
    """The header row (first line) as the csv module reads it; BadInputError if there is none."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            row = next(csv.reader(f), None)
    except UnicodeDecodeError as exc:
        raise bad(path, 1, f"not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise bad(path, 1, f"wrong header: {exc}") from None
    if not row or all(not c.strip() for c in row):
        raise bad(path, 1, "wrong header: the file is empty or its first line is blank")
    seen: set[str] = set()
    for c in row:
        if not c.strip():
            raise bad(path, 1, f"wrong header: an empty column name in {row!r}")
        if c in seen:
            raise bad(path, 1, f"wrong header: column {c!r} appears twice")
        seen.add(c)
    return row


def csv_sample(path: Path, n: int = 2000) -> list[list[str]]:
    """The first `n` data rows (for deciding which columns hold text)."""
    import csv
    from itertools import islice

    with open(path, newline="", encoding="utf-8-sig") as f:
        r = csv.reader(f)
        next(r, None)
        try:
            return [row for row in islice(r, n) if row]
        except csv.Error as exc:
            if "field limit" in str(exc):  # a cell over 131,072 characters: say so, never echo it
                raise bad(path, r.line_num, f"a cell is longer than {csv.field_size_limit():,} characters, "
                                            f"more than a metrics file holds") from None
            return []


def csv_line_of(path: Path) -> Any:
    """data row index (0-based, blank lines not counted, as DuckDB reads) -> file line number.
    Scans the file with the csv module; only used to name the line of an error."""
    def line_of(i: int) -> int:
        import csv

        with open(path, newline="", encoding="utf-8-sig") as f:
            r = csv.reader(f)
            next(r, None)
            k = -1
            start = r.line_num + 1
            for row in r:
                if row:
                    k += 1
                    if k == i:
                        return start
                start = r.line_num + 1
        return start
    return line_of


def _duckdb_csv_error(path: Path, exc: Exception) -> BadInputError:
    import re

    text = str(exc)
    m = re.search(r"CSV Error on Line: (\d+)", text)
    line = int(m.group(1)) if m else None
    if (m2 := re.search(r"Expected Number of Columns: (\d+) Found: (\d+)", text)):
        msg = f"expected {m2.group(1)} fields, found {m2.group(2)} (truncated or malformed line)"
    elif (m3 := re.search(r'converting column "(.*?)"\. Could not convert string "(.*?)" to', text, re.S)):
        msg = f"column {m3.group(1)!r}: {show(m3.group(2))} is not a number"
    elif "unterminated quote" in text.lower() or "quote" in text.lower() and "Line" in text:
        msg = "unterminated quoted value"
    else:
        msg = text.strip().splitlines()[0]
    return bad(path, line, msg)


def read_csv_table(path: Path, header: Sequence[str], types: Mapping[str, str],
                   select: Sequence[str]) -> pa.Table:
    """Read a CSV file with DuckDB's reader and explicit column types (`types` names every
    header column; VARCHAR for text); strict, so a line with too few or too many fields, or a
    value that is not of its column's type, is an error that names the line."""
    import duckdb

    con = duckdb.connect(config={"autoinstall_known_extensions": "false",
                                 "autoload_known_extensions": "false"})
    try:
        cols = {c: types[c] for c in header}
        sel = ", ".join('"' + c.replace('"', '""') + '"' for c in select)
        rel = con.sql(
            f"SELECT {sel} FROM read_csv($path, header=true, auto_detect=false, strict_mode=true, "
            "delim=',', quote='\"', escape='\"', columns=$cols, nullstr='', "
            "parallel=true)",
            params={"path": str(path), "cols": cols})
        return rel.to_arrow_table()
    except duckdb.Error as exc:
        raise _duckdb_csv_error(path, exc) from None
    finally:
        con.close()


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
