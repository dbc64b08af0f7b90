"""Generic CSV and JSONL metric files: one row (or JSON object) per logged step.

Columns are mapped by the default name table (`step`, `iteration`, `train/loss`, `lr`, ...)
extended by `--map` (`--map step=iter,loss=train/loss`). The step column is the one mapped to
`step`. Mapped columns must be numeric; other numeric columns become `metrics` series under
their own name; columns holding text are left out (listed in `import.dropped_columns`).
CSV goes through DuckDB's reader with explicit types; JSONL is read line by line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from k2repro.errors import BadInputError
from k2repro.importers.csv_io import (
    csv_line_of,
    csv_sample,
    is_number,
    read_csv_header,
    read_csv_table,
)
from k2repro.importers.names import STEP_BOOL, STEP_COLUMNS, NameMap
from k2repro.importers.parsed import ImportedRun, bad, sha256_background
from k2repro.importers.values import check_steps, show, steps_from_float, time_ok, to_datetime
from k2repro.importers.wandb_csv import StepAxis

KIND = "csv"
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")


def is_jsonl(path: Path) -> bool:
    if path.suffix.lower() in JSON_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"{")


def _step_column(path: Path, cols: list[str], names: NameMap) -> str:
    hits = [c for c in cols if names.target(c)[0] == "step"]
    if not hits:
        raise bad(path, 1, "wrong header: no step column (looked for step, _step, iteration, "
                  "iter, global_step, trainer/global_step; pass --map step=COLUMN)")
    user = [c for c in hits if c.strip().lower() in names.user_pairs()]
    return (user or hits)[0]


def read(path: str | Path, names: NameMap, axis: StepAxis | None = None) -> list[ImportedRun]:
    """Parse a CSV or JSONL file into one ImportedRun."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such file")
    axis = axis or StepAxis()
    sha = sha256_background(path)
    if is_jsonl(path):
        cols, data, line_of, dropped = _read_jsonl(path, names)
        fmt = "jsonl"
    else:
        cols, data, line_of, dropped = _read_csv(path, names)
        fmt = "csv"
    return [_assemble(path, fmt, cols, data, line_of, dropped, names, axis, sha.result())]


def _read_csv(path: Path, names: NameMap) -> tuple[list[str], dict[str, Any], Any, list[str]]:
    header = read_csv_header(path)
    step_col = _step_column(path, header, names)
    sample = csv_sample(path)
    types: dict[str, str] = {}
    dropped: list[str] = []
    for j, c in enumerate(header):
        vals = [r[j] for r in sample if j < len(r) and r[j] != ""]
        numeric = all(is_number(v) for v in vals)
        target = names.target(c)[0]
        if c == step_col:
            types[c] = "DOUBLE"
        elif target in STEP_BOOL and not numeric:
            types[c] = "BOOLEAN"
        elif target == "time" and not numeric:
            types[c] = "TIMESTAMPTZ"
        elif numeric or (target in STEP_COLUMNS):
            types[c] = "DOUBLE"   # a non-number later in the file is an error naming its line
        else:
            types[c] = "VARCHAR"
            dropped.append(c)
    keep = [c for c in header if types[c] != "VARCHAR" and names.target(c)[0] is not None]
    keep = [step_col] + [c for c in keep if c != step_col]
    tbl = read_csv_table(path, header, types, keep)
    return keep, {c: tbl.column(c).combine_chunks() for c in keep}, csv_line_of(path), dropped


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _read_jsonl(path: Path, names: NameMap) -> tuple[list[str], dict[str, Any], Any, list[str]]:
    import pyarrow as pa

    columns: dict[str, list[Any]] = {}
    text_cols: set[str] = set()
    lines: list[int] = []
    n = 0
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                flat = _flatten(obj) if isinstance(obj, dict) else None
            except json.JSONDecodeError as exc:
                raise bad(path, lineno, f"not a JSON object ({exc.msg}; truncated line?)") from None
            except RecursionError:
                raise bad(path, lineno, "JSON nested too deeply (a metrics line holds flat values)") from None
            if flat is None:
                raise bad(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
            for k, v in flat.items():
                if isinstance(v, str):
                    target = names.target(k)[0]
                    if target == "time":
                        pass  # ISO time strings, cast below
                    elif target in STEP_COLUMNS or target == "step" or k in columns:
                        if not is_number(v):
                            raise bad(path, lineno, f"key {show(k)}: {show(v)} is not a number")
                        v = float(v)
                    else:
                        text_cols.add(k)
                        continue
                elif isinstance(v, list):
                    text_cols.add(k)
                    continue
                elif k in text_cols and v is not None:
                    raise bad(path, lineno, f"key {show(k)}: {show(v)} in a column that held text before")
                if k in text_cols:
                    continue
                col = columns.get(k)
                if col is None:
                    col = columns[k] = [None] * n
                col.append(v)
            n += 1
            lines.append(lineno)
            for col in columns.values():
                if len(col) < n:
                    col.append(None)
    if n == 0:
        raise bad(path, 1, "no JSON objects in the file")
    step_col = _step_column(path, list(columns), names)
    data: dict[str, Any] = {}
    for k, vals in columns.items():
        if names.target(k)[0] is None:
            continue
        target = names.target(k)[0]
        if target == "time":
            for i, v in enumerate(vals):
                if not time_ok(v):
                    raise bad(path, lines[i], f"time {show(v)} is not a time k2repro can store (epoch "
                                              f"seconds between years 1 and 9999, or an ISO 8601 date)")
        if target == "time" and any(isinstance(v, str) for v in vals):
            data[k] = pa.array([to_datetime(v) for v in vals], type=pa.timestamp("us", tz="UTC"))
            continue
        conv = [None if v is None else (1.0 if v is True else 0.0 if v is False else float(v))
                for v in vals]
        data[k] = pa.array(conv, type=pa.float64())
    keep = [step_col] + [c for c in data if c != step_col]
    return keep, data, (lambda i: lines[i]), sorted(text_cols - set(columns))


def _assemble(path: Path, fmt: str, cols: list[str], data: dict[str, Any], line_of: Any,
              dropped: list[str], names: NameMap, axis: StepAxis, sha: str) -> ImportedRun:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    step_col = cols[0]
    x = data[step_col].to_numpy(zero_copy_only=False).astype(np.float64)
    if x.size == 0:
        raise bad(path, None, "no data rows")
    steps = steps_from_float(str(path), x, axis.resolved_divisor(), axis.offset, line_of, what=step_col)
    check_steps(str(path), steps, line_of, what=step_col)
    run = ImportedRun(KIND, str(path), sha, steps=pa.array(steps, type=pa.int64()), line_of=line_of)
    mapped: dict[str, str] = {}
    for c in cols[1:]:
        target, scale = names.target(c)
        if target is None:
            continue
        vals = data[c]
        if scale != 1.0:
            vals = pc.multiply(vals, scale)
        if target in STEP_COLUMNS and target not in run.columns:
            run.columns[target] = vals
        else:
            if target == "step" or target in run.metrics or target in run.columns:
                target = c
            if pa.types.is_timestamp(vals.type) or pa.types.is_boolean(vals.type):
                continue
            run.metrics[target] = (run.steps, vals)
        mapped[c] = target
    for k in ("loss", "grad_norm"):
        arr = run.columns.get(k)
        if arr is not None:
            nan = pc.fill_null(pc.is_nan(arr.cast(pa.float64())), False)
            for i in np.flatnonzero(nan.to_numpy(zero_copy_only=False))[:1000]:
                run.event("nan", step=int(steps[i]), severity="warning", signal=k)
    run.hparams.update({
        "import.kind": KIND, "import.format": fmt, "import.path": str(path),
        "import.content_sha256": run.content_sha256, "import.step_column": step_col,
        "import.sampled": False, **axis.as_hparams(),
        **{f"import.map.{m}": t for m, t in sorted(mapped.items())},
    })
    if dropped:
        run.hparams["import.dropped_columns"] = sorted(dropped)
    if "time" in run.columns:
        t = run.columns["time"]
        ts = (t.cast(pa.int64()).to_numpy(zero_copy_only=False) / 1e6 if pa.types.is_timestamp(t.type)
              else t.cast(pa.float64()).to_numpy(zero_copy_only=False))
        ts = ts[np.isfinite(ts)] if ts.dtype.kind == "f" else ts
        if ts.size:
            run.started_at, run.ended_at = float(ts.min()), float(ts.max())
    return run
