"""W&B chart CSV exports: `"Step","<run> - <metric>","<run> - <metric>__MIN","<run> -
<metric>__MAX",...`, one or several runs per file, empty cells where a run has no point.

Every run of the file becomes one store run (`--run` picks one). The step axis may count
iterations, samples or tokens (`StepAxis`). `__MIN`/`__MAX` are the envelope of a bucket W&B
downsampled into one point: they are kept as `metrics` series `<metric>__MIN`/`__MAX` (not as
`steps.loss_min`, which means something else), and a run whose envelope is wider than its
value, or whose steps are irregularly spaced, is marked sampled (`import.sampled`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k2repro.errors import BadInputError
from k2repro.importers.csv_io import csv_line_of, read_csv_header, read_csv_table
from k2repro.importers.names import STEP_COLUMNS, NameMap
from k2repro.importers.parsed import ImportedRun, bad, sha256_background
from k2repro.importers.values import check_steps, steps_from_float

KIND = "wandb-csv"
SEP = " - "
ENVELOPE = ("__MIN", "__MAX")


@dataclass(frozen=True)
class StepAxis:
    """What the source's step column counts, and how it becomes our step number:
    step = value / divisor + offset."""

    unit: str = "iteration"
    global_batch: int | None = None
    seq_len: int | None = None
    divisor: float | None = None
    offset: int = 0

    def resolved_divisor(self) -> float:
        if self.divisor is not None:
            if not self.divisor > 0:
                raise BadInputError(f"--step-divisor must be > 0, got {self.divisor}")
            return float(self.divisor)
        if self.unit == "iteration":
            return 1.0
        if self.unit == "sample":
            if not self.global_batch:
                raise BadInputError("--step-unit sample needs --global-batch (or --step-divisor)")
            return float(self.global_batch)
        if self.unit == "token":
            if not self.global_batch or not self.seq_len:
                raise BadInputError("--step-unit token needs --global-batch and --seq-len "
                                    "(or --step-divisor)")
            return float(self.global_batch * self.seq_len)
        raise BadInputError(f"--step-unit must be iteration, sample or token, got {self.unit!r}")

    def as_hparams(self) -> dict[str, Any]:
        out: dict[str, Any] = {"import.step_unit": self.unit,
                               "import.step_divisor": self.resolved_divisor(),
                               "import.step_offset": self.offset}
        if self.global_batch:
            out["import.global_batch"] = self.global_batch
        if self.seq_len:
            out["import.seq_len"] = self.seq_len
        return out


def parse_header(path: Path, header: list[str]) -> dict[str, dict[str, dict[str, str]]]:
    """run -> metric -> {"value"|"__MIN"|"__MAX": column name}; the first column is the step."""
    runs: dict[str, dict[str, dict[str, str]]] = {}
    for col in header[1:]:
        base, part = col, "value"
        for suf in ENVELOPE:
            if col.endswith(suf):
                base, part = col[: -len(suf)], suf
        run, sep, metric = base.rpartition(SEP)
        if not sep or not run.strip() or not metric.strip():
            raise bad(path, 1, f"wrong header: column {col!r} is not '<run> - <metric>' "
                      "(a W&B chart export; for other CSV files use `k2repro import csv`)")
        runs.setdefault(run, {}).setdefault(metric, {})[part] = col
    if not runs:
        raise bad(path, 1, "wrong header: no '<run> - <metric>' columns after the step column")
    for run, metrics in runs.items():
        for metric, parts in metrics.items():
            if "value" not in parts:
                raise bad(path, 1, f"wrong header: {run}{SEP}{metric} has "
                          f"{'/'.join(sorted(parts))} but no value column")
    return runs


@dataclass(frozen=True)
class _Export:
    """The file as read once for all its runs: header, every wanted column, row -> line."""

    path: Path
    header: list[str]
    table: Any                  # pa.Table
    row_index: Any              # pa.Array int64: the table's row numbers
    line_of: Any                # data row -> file line
    sha: str


def read(path: str | Path, names: NameMap, axis: StepAxis, select_run: str | None = None
         ) -> list[ImportedRun]:
    """Parse a W&B CSV export into one ImportedRun per W&B run (or the one `select_run`)."""
    import numpy as np
    import pyarrow as pa

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such file")
    header = read_csv_header(path)
    layout = parse_header(path, header)
    if select_run is not None:
        if select_run not in layout:
            raise BadInputError(f"{path}: no run {select_run!r} in the file (runs: "
                                f"{', '.join(sorted(layout))})")
        layout = {select_run: layout[select_run]}
    divisor = axis.resolved_divisor()
    sha_job = sha256_background(path)
    wanted = [header[0]] + [c for m in layout.values() for p in m.values() for c in p.values()]
    tbl = read_csv_table(path, header, {c: "DOUBLE" for c in header}, wanted)
    line_of = csv_line_of(path)
    src = _Export(path, header, tbl, pa.array(np.arange(tbl.num_rows, dtype=np.int64)), line_of,
                  sha_job.result())
    return [_read_run(src, label, metrics, names, axis, divisor) for label, metrics in layout.items()]


def _read_run(src: _Export, run_label: str, metrics: dict[str, dict[str, str]], names: NameMap,
              axis: StepAxis, divisor: float) -> ImportedRun:
    """One W&B run of the file: the rows where it has a value, its steps, series and flags."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    path, step_col = src.path, src.header[0]
    present = None
    for c in [p["value"] for p in metrics.values()]:
        v = src.table.column(c).is_valid()
        present = v if present is None else pc.or_(present, v)
    sub = src.table.filter(present)
    idx = src.row_index.filter(present).to_numpy()

    def run_line(i: int, idx: np.ndarray = idx) -> int:
        return src.line_of(int(idx[i]))

    x = sub.column(step_col).to_numpy(zero_copy_only=False).astype(np.float64)
    if x.size == 0:
        raise bad(path, None, f"run {run_label!r} has no values")
    steps = steps_from_float(str(path), x, divisor, axis.offset, run_line, what=step_col)
    check_steps(str(path), steps, run_line, what=step_col)
    run = ImportedRun(KIND, str(path), src.sha, source_run=run_label,
                      steps=pa.array(steps, type=pa.int64()))
    sampled_reasons: list[str] = []
    mapped: dict[str, str] = {}
    for metric, parts in metrics.items():
        target = _add_metric(run, sub, metric, parts, names, path, step_col, sampled_reasons)
        if target is not None:
            mapped[metric] = target
    if steps.size > 2:
        gaps = np.unique(np.diff(steps))
        if gaps.size > 1:
            sampled_reasons.append(f"irregular step spacing ({gaps.size} distinct gaps, "
                                   f"{int(gaps.min())} to {int(gaps.max())})")
    _set_hparams(run, src, run_label, axis, steps, mapped, sampled_reasons)
    return run


def _add_metric(run: ImportedRun, sub: Any, metric: str, parts: dict[str, str], names: NameMap,
                path: Path, step_col: str, sampled_reasons: list[str]) -> str | None:
    """One metric of a run (its value column and envelope) into the run; returns its target
    (None: left out). A bucketed envelope adds a reason to `sampled_reasons`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    target, scale = names.target(metric)
    if target is None:
        return None
    if target == "step":
        raise bad(path, 1, f"--map: {metric!r} cannot be the step here (the step is the "
                  f"first column, {step_col!r})")
    vals = sub.column(parts["value"]).combine_chunks()
    if scale != 1.0:
        vals = pc.multiply(vals, scale)
    if target in STEP_COLUMNS and target not in run.columns:
        run.columns[target] = vals
    else:
        if target in run.metrics or target in run.columns:
            target = metric  # two sources for one target: keep the second under its own name
        run.metrics[target] = (run.steps, vals)
    lo = sub.column(parts["__MIN"]).combine_chunks() if "__MIN" in parts else None
    hi = sub.column(parts["__MAX"]).combine_chunks() if "__MAX" in parts else None
    for suf, arr in (("__MIN", lo), ("__MAX", hi)):
        if arr is None:
            continue
        # W&B writes the envelope for every point; it says something only where it
        # differs from the value (a bucket of several steps): keep those points.
        differs = pc.fill_null(pc.not_equal(arr, sub.column(parts["value"]).combine_chunks()), True)
        if pc.any(differs).as_py():
            arr = pc.multiply(arr, scale) if scale != 1.0 else arr
            run.metrics[f"{target}{suf}"] = (run.steps.filter(differs), arr.filter(differs))
    if lo is not None and hi is not None:
        wide = pc.fill_null(pc.greater(hi, lo), False)
        n_wide = int(pc.sum(wide.cast(pa.int64())).as_py() or 0)
        if n_wide:
            sampled_reasons.append(f"{metric}: {n_wide} point(s) with __MIN < __MAX "
                                   "(buckets of several steps)")
    return target


def _set_hparams(run: ImportedRun, src: _Export, run_label: str, axis: StepAxis, steps: Any,
                 mapped: dict[str, str], sampled_reasons: list[str]) -> None:
    """The import's facts; a sampled run also gets its reasons and an `import_sampled` event."""
    import numpy as np

    sampled = bool(sampled_reasons)
    run.hparams.update({
        "import.kind": KIND, "import.path": str(src.path), "import.content_sha256": src.sha,
        "import.source_run": run_label, "import.step_column": src.header[0],
        "import.sampled": sampled, **axis.as_hparams(),
        **{f"import.map.{m}": t for m, t in sorted(mapped.items())},
    })
    if steps.size > 1 and not sampled:
        run.hparams["import.step_interval"] = int(np.diff(steps)[0])
    if sampled:
        run.hparams["import.sampled_reason"] = "; ".join(sampled_reasons)
        run.event("import_sampled", severity="warning", reasons=sampled_reasons,
                  points=int(steps.size), first_step=int(steps[0]), last_step=int(steps[-1]))
