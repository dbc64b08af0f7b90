"""A parsed run as the audit store's tables: `runs`, `hparams`, `steps`, `metrics`, `evals`,
`events` and `run_end`, ready for `k2repro.audit.writer.write_run_tables`.

Separate from the transaction (`importers/transaction.py`) so that what an imported run looks
like in the store is decided in one place and can be read without the locking and rollback
around it. Nothing here touches the store.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2repro.audit.runrow import end_row
from k2repro.errors import BadInputError
from k2repro.importers.names import STEP_BOOL, STEP_INT
from k2repro.importers.parsed import ImportedRun

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa


def _utc(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, tz=timezone.utc)


def jsonable(v: Any) -> Any:
    """`v` with non-finite floats as their repr and keys as strings: what JSON can hold."""
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
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


# runs row: see audit.runrow (lead unifies)
def runs_row(run: ImportedRun, name: str, store_root: Path, now: float,
             argv: Sequence[str] | None = None, parent_run_id: str | None = None,
             resumed_from_step: int | None = None) -> dict[str, list]:
    """The `runs` row of an imported run (one-element columns), by the one builder every writer
    uses (audit/runrow.py). An import knows no config hash, git state, host or launcher of the
    original run: those stay NULL; `started_at` is the source's first time, else the time of
    the import."""
    from k2repro.audit.runrow import runs_row as build

    started = run.started_at
    row = build({
        "name": name, "started_at": _utc(started if started is not None else now),
        "parent_run_id": parent_run_id, "resumed_from_step": resumed_from_step, "source": f"import:{run.kind}",
        "argv": list(argv if argv is not None else sys.argv),
        "config_json": json.dumps(jsonable(run.config), default=str) if run.config else None,
    }, store_path=str(store_root), world_size=run.world_size, live=False)
    return {k: [v] for k, v in row.items()}


def _events_table(run: ImportedRun, now: float) -> dict[str, list]:
    """The `import` event (what was read, from where) followed by the parser's own events."""
    events = [{"kind": "import", "step": None, "severity": "info", "time": now,
               "detail": {"kind": run.kind, "path": run.path, "content_sha256": run.content_sha256,
                          "source_run": run.source_run, "steps": run.n_steps,
                          "metrics": sorted(run.metrics)}}] + run.events
    return {
        "time": [_utc(e["time"] if e.get("time") is not None else now) for e in events],
        "rank": [0] * len(events),
        "step": [e.get("step") for e in events],
        "kind": [e["kind"] for e in events],
        "severity": [e.get("severity", "info") for e in events],
        "detail": [json.dumps(jsonable(e.get("detail") or {}), default=str) for e in events],
    }


def build_tables(run: ImportedRun, run_id: str, name: str, store_root: Path,
                 argv: Sequence[str] | None = None, parent_run_id: str | None = None,
                 resumed_from_step: int | None = None) -> dict[str, Any]:
    """The store tables of one imported run (Arrow tables / column dicts for
    write_run_tables, which conforms them to the schema and redacts them). `parent_run_id` /
    `resumed_from_step` link a restart segment or fork to its parent (importers/stitch.py)."""
    now = datetime.now(timezone.utc).timestamp()
    steps = _steps_table(run)
    ended = run.ended_at if run.ended_at is not None else now
    tables: dict[str, Any] = {
        "runs": runs_row(run, name, store_root, now, argv, parent_run_id, resumed_from_step),
        "hparams": _hparam_table(run.hparams),
        "steps": steps,
        "run_end": end_row(0, "completed", ended_at=_utc(ended)),
    }
    metrics = _metrics_table(run)
    if metrics is not None and metrics.num_rows:
        tables["metrics"] = metrics
    if run.evals:
        tables["evals"] = {"step": [e[0] for e in run.evals], "metric": [e[1] for e in run.evals],
                           "value": [e[2] for e in run.evals]}
    tables["events"] = _events_table(run, now)
    return tables
