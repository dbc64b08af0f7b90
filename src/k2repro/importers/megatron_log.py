"""Megatron-LM training logs (stdout), with or without timestamp prefixes, interleaved with
any other output.

Read: the `iteration N/ M | key: value | ... |` lines (-> `steps`, `metrics`, `events`), the
`validation loss at iteration N | lm loss value: ... | lm loss PPL: ... |` lines (-> `evals`),
and the arguments block (`---- arguments ----` ... `---- end of arguments ----`, lines
`  name ....... value`) (-> `hparams` as `args.<name>`).

A restart (a new arguments block, `training ...`, or a checkpoint-loading line, followed by
iteration numbers that go back) stays one store run: the later values replace the earlier
ones from the resumed iteration on, as the resumed job overwrote them, and a `restart` event
records where. Iteration numbers that go back without such a marker are an error.
"""

from __future__ import annotations

import ast
import re
from bisect import bisect_left
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from k2repro.errors import BadInputError
from k2repro.importers.names import STEP_COLUMNS, NameMap
from k2repro.importers.parsed import ImportedRun, bad, sha256_path

KIND = "megatron-log"

ITER_RE = re.compile(r"\biteration\s+(\d+)\s*/\s*(\d+)\s*\|(.*)$")
VALID_RE = re.compile(r"\bvalidation loss at iteration\s+(\d+)(?:\s+on\s+(\w+)\s+set)?\s*\|(.*)$")
TS_RE = re.compile(r"(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}:\d{2}(?:[.,]\d+)?)(Z|[+-]\d{2}:?\d{2})?")
ARGS_START_RE = re.compile(r"-{3,}\s*arguments\s*-{3,}")
ARGS_END_RE = re.compile(r"-{3,}\s*end of arguments\s*-{3,}")
ARG_RE = re.compile(r"(\S+) \.{2,}(?: (.*?))?\s*$")
RESTART_RE = re.compile(r"(^|\s)training \.\.\.\s*$|loading checkpoint|loaded checkpoint", re.I)

SKIPPED_KEY = "number of skipped iterations"
NAN_KEY = "number of nan iterations"
EVAL_NAMES = {"lm loss value": "val/loss", "lm loss ppl": "val/ppl"}


def parse_time(text: str) -> float | None:
    """Epoch seconds of the first timestamp in `text` (no zone: UTC)."""
    m = TS_RE.search(text)
    if not m:
        return None
    zone = m.group(3) or "+00:00"
    zone = "+00:00" if zone == "Z" else zone if ":" in zone else f"{zone[:3]}:{zone[3:]}"
    try:
        return datetime.fromisoformat(f"{m.group(1)}T{m.group(2).replace(',', '.')}{zone}").timestamp()
    except ValueError:
        return None


def parse_arg_value(text: str) -> Any:
    """Megatron prints args with str(): True/False/None, numbers, lists; anything else is text."""
    t = text.strip()
    if t in ("True", "False"):
        return t == "True"
    if t == "None":
        return None
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        pass
    if t[:1] in "[({":
        try:
            v = ast.literal_eval(t)
            return list(v) if isinstance(v, tuple) else v
        except (ValueError, SyntaxError):
            pass
    return t


def _fields(path: Path, lineno: int, rest: str) -> dict[str, float]:
    body = rest.rstrip()
    if not body.endswith("|"):
        raise bad(path, lineno, "truncated iteration line (it does not end with '|')")
    out: dict[str, float] = {}
    for part in body[:-1].split("|"):
        if not part.strip():
            continue
        key, colon, val = part.rpartition(":")
        key = key.strip()
        if not colon or not key:
            raise bad(path, lineno, f"field {part.strip()!r} is not 'name: value'")
        try:
            out[key] = float(val.strip())
        except ValueError:
            raise bad(path, lineno, f"field {key!r}: {val.strip()!r} is not a number") from None
    return out


@dataclass
class _Scan:
    """What one pass over the log collects, and the state of that pass: iteration lines
    (step, fields, time, line), validation lines, the latest arguments block, restarts."""

    path: Path
    steps: list[int] = field(default_factory=list)
    rows: list[dict[str, float]] = field(default_factory=list)
    times: list[float | None] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    evals: dict[tuple[int, str], float] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    train_iters: int | None = None
    lineno: int = 0
    in_args: bool = False
    block: dict[str, Any] = field(default_factory=dict)
    marker: tuple[int, str] | None = None    # a restart marker seen since the last iteration line
    pending_args_change: list[str] = field(default_factory=list)

    def feed(self, lineno: int, line: str) -> None:
        self.lineno = lineno
        if self.in_args:
            self._argument(line)
            return
        if "iteration" in line:
            if (m := ITER_RE.search(line)):
                self._iteration(lineno, line, m)
                return
            if (m := VALID_RE.search(line)):
                self._validation(lineno, m)
                return
        if ARGS_START_RE.search(line):
            self.in_args = True
            self.block = {}
            if self.steps:
                self.marker = (lineno, "arguments block")
            return
        if self.steps and RESTART_RE.search(line):
            self.marker = (lineno, line.strip()[:120])

    def _argument(self, line: str) -> None:
        """A line inside an arguments block; its end line makes the block the current args."""
        if ARGS_END_RE.search(line):
            self.in_args = False
            if self.args and self.steps:
                self.pending_args_change = sorted(k for k in set(self.args) | set(self.block)
                                                  if self.args.get(k) != self.block.get(k))
            self.args = self.block
            return
        m = ARG_RE.search(line)
        if m:
            self.block[m.group(1)] = parse_arg_value(m.group(2) or "")

    def _iteration(self, lineno: int, line: str, m: re.Match[str]) -> None:
        """An iteration line; after a restart marker, one going back replaces the later steps."""
        n, total = int(m.group(1)), int(m.group(2))
        fields = _fields(self.path, lineno, m.group(3))
        t = parse_time(line[: m.start()])
        steps = self.steps
        if steps and n <= steps[-1] and self.marker is None:
            word = "repeats" if n == steps[-1] else "goes back"
            raise bad(self.path, lineno, f"iteration {n} {word} (the previous line said "
                      f"{steps[-1]}) without a restart marker (arguments block, "
                      "'training ...' or a checkpoint load)")
        if self.marker is not None and steps:
            cut = bisect_left(steps, n)
            self.restarts.append({"step": n, "line": lineno, "time": t,
                                  "previous_last_step": steps[-1],
                                  "replaced_steps": len(steps) - cut,
                                  "marker_line": self.marker[0], "marker": self.marker[1],
                                  "changed_args": self.pending_args_change[:50]})
            del steps[cut:], self.rows[cut:], self.times[cut:], self.lines[cut:]
            for key in [k for k in self.evals if k[0] >= n]:
                del self.evals[key]
        self.marker = None
        self.pending_args_change = []
        steps.append(n)
        self.rows.append(fields)
        self.times.append(t)
        self.lines.append(lineno)
        self.train_iters = total

    def _validation(self, lineno: int, m: re.Match[str]) -> None:
        for key, v in _fields(self.path, lineno, m.group(3)).items():
            metric = EVAL_NAMES.get(key.lower(), f"val/{key}")
            if m.group(2) and m.group(2) != "validation":
                metric = metric.replace("val/", f"{m.group(2)}/", 1)
            self.evals[(int(m.group(1)), metric)] = v


def _scan(path: Path) -> _Scan:
    scan = _Scan(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            scan.feed(lineno, line)
    if scan.in_args:
        raise bad(path, scan.lineno, "truncated arguments block (no 'end of arguments' line)")
    if not scan.steps:
        raise bad(path, None, "no Megatron 'iteration N/ M | ... |' lines found")
    return scan


def read(path: str | Path, names: NameMap) -> list[ImportedRun]:
    """Parse a Megatron-LM log into one ImportedRun."""
    import numpy as np
    import pyarrow as pa

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such file")
    scan = _scan(path)
    run = ImportedRun(KIND, str(path), sha256_path(path))
    step_arr = np.asarray(scan.steps, dtype=np.int64)
    if step_arr[0] < 1:
        raise bad(path, scan.lines[0], "iteration 0: steps are numbered from 1")
    run.steps = pa.array(step_arr, type=pa.int64())
    mapped = _fill_series(run, scan.rows, names)
    _fill_tokens_and_time(run, scan)
    _add_events(run, scan)
    run.evals = [(s, m, v) for (s, m), v in sorted(scan.evals.items())]
    args = scan.args
    run.config = args or None
    ws = args.get("world_size")
    run.world_size = ws if isinstance(ws, int) else None
    _set_hparams(run, path, scan, mapped)
    return [run]


def _fill_series(run: ImportedRun, rows: list[dict[str, float]], names: NameMap) -> dict[str, str]:
    """Every field of the iteration lines into a `steps` column or a `metrics` series (the
    skipped and NaN counts into both a series and what they mean); returns source -> target."""
    import pyarrow as pa

    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    mapped: dict[str, str] = {}
    for k in keys:
        vals = pa.array([r.get(k) for r in rows], type=pa.float64())
        if k == SKIPPED_KEY:
            run.metrics["skipped_iterations"] = (run.steps, vals)
            run.columns["skipped"] = pa.array([bool(r.get(k) or 0) for r in rows])
            continue
        if k == NAN_KEY:
            run.metrics["nan_iterations"] = (run.steps, vals)
            continue
        target, scale = names.target(k)
        if target is None:
            continue
        if scale != 1.0:
            vals = pa.array([None if r.get(k) is None else r[k] * scale for r in rows], type=pa.float64())
        if target in STEP_COLUMNS and target not in run.columns:
            run.columns[target] = vals
        else:
            run.metrics[target if target not in run.metrics and target not in STEP_COLUMNS else k] = (run.steps, vals)
        mapped[k] = target
    return mapped


def _fill_tokens_and_time(run: ImportedRun, scan: _Scan) -> None:
    """tokens = samples x seq_length when the log says only samples; times from the prefixes."""
    import pyarrow as pa

    seq = scan.args.get("seq_length")
    if "tokens" not in run.columns and "n_samples" in run.columns and isinstance(seq, int):
        import pyarrow.compute as pc

        run.columns["tokens"] = pc.multiply(run.columns["n_samples"], float(seq))
    times = scan.times
    if any(t is not None for t in times):
        run.columns["time"] = pa.array(times, type=pa.float64())
        known = [t for t in times if t is not None]
        run.started_at, run.ended_at = min(known), max(known)


def _add_events(run: ImportedRun, scan: _Scan) -> None:
    """Skipped and NaN iterations as Megatron reported them, then the restarts."""
    for i, r in enumerate(scan.rows):
        if r.get(SKIPPED_KEY):
            run.event("skip", step=scan.steps[i], severity="warning", time_s=scan.times[i],
                      iterations=int(r[SKIPPED_KEY]), line=scan.lines[i], reason="reported by Megatron-LM")
        if r.get(NAN_KEY):
            run.event("nan", step=scan.steps[i], severity="warning", time_s=scan.times[i],
                      iterations=int(r[NAN_KEY]), line=scan.lines[i])
    for rs in scan.restarts:
        run.event("restart", step=rs.pop("step"), severity="warning", time_s=rs.pop("time"), **rs)


def _set_hparams(run: ImportedRun, path: Path, scan: _Scan, mapped: dict[str, str]) -> None:
    args = scan.args
    run.hparams.update({f"args.{k}": v for k, v in args.items()})
    run.hparams.update({
        "import.kind": KIND, "import.path": str(path), "import.content_sha256": run.content_sha256,
        "import.sampled": False, "import.train_iters": scan.train_iters, "import.restarts": len(scan.restarts),
        **{f"import.map.{m}": t for m, t in sorted(mapped.items())},
    })
    li = args.get("log_interval")
    if isinstance(li, int):
        run.hparams["import.log_interval"] = li
        if li > 1:
            run.hparams["import.note"] = (f"values are Megatron's averages over log_interval={li} "
                                          "iterations; skipped marks an interval with a skipped iteration")
