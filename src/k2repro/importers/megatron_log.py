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


def read(path: str | Path, names: NameMap) -> list[ImportedRun]:
    """Parse a Megatron-LM log into one ImportedRun."""
    import numpy as np
    import pyarrow as pa

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such file")
    steps: list[int] = []
    rows: list[dict[str, float]] = []
    times: list[float | None] = []
    lines: list[int] = []
    evals: dict[tuple[int, str], float] = {}
    args: dict[str, Any] = {}
    in_args = False
    block: dict[str, Any] = {}
    marker: tuple[int, str] | None = None     # a restart marker seen since the last iteration line
    restarts: list[dict[str, Any]] = []
    pending_args_change: list[str] = []
    train_iters = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if in_args:
                if ARGS_END_RE.search(line):
                    in_args = False
                    if args and steps:
                        pending_args_change = sorted(k for k in set(args) | set(block)
                                                     if args.get(k) != block.get(k))
                    args = block
                    continue
                m = ARG_RE.search(line)
                if m:
                    block[m.group(1)] = parse_arg_value(m.group(2) or "")
                continue
            if "iteration" in line:
                m = ITER_RE.search(line)
                if m:
                    n, total = int(m.group(1)), int(m.group(2))
                    fields = _fields(path, lineno, m.group(3))
                    t = parse_time(line[: m.start()])
                    if steps and n <= steps[-1] and marker is None:
                        word = "repeats" if n == steps[-1] else "goes back"
                        raise bad(path, lineno, f"iteration {n} {word} (the previous line said "
                                  f"{steps[-1]}) without a restart marker (arguments block, "
                                  "'training ...' or a checkpoint load)")
                    if marker is not None and steps:
                        cut = bisect_left(steps, n)
                        restarts.append({"step": n, "line": lineno, "time": t,
                                         "previous_last_step": steps[-1],
                                         "replaced_steps": len(steps) - cut,
                                         "marker_line": marker[0], "marker": marker[1],
                                         "changed_args": pending_args_change[:50]})
                        del steps[cut:], rows[cut:], times[cut:], lines[cut:]
                        for key in [k for k in evals if k[0] >= n]:
                            del evals[key]
                    marker = None
                    pending_args_change = []
                    steps.append(n)
                    rows.append(fields)
                    times.append(t)
                    lines.append(lineno)
                    train_iters = total
                    continue
                m = VALID_RE.search(line)
                if m:
                    for key, v in _fields(path, lineno, m.group(3)).items():
                        metric = EVAL_NAMES.get(key.lower(), f"val/{key}")
                        if m.group(2) and m.group(2) != "validation":
                            metric = metric.replace("val/", f"{m.group(2)}/", 1)
                        evals[(int(m.group(1)), metric)] = v
                    continue
            if ARGS_START_RE.search(line):
                in_args = True
                block = {}
                if steps:
                    marker = (lineno, "arguments block")
                continue
            if steps and RESTART_RE.search(line):
                marker = (lineno, line.strip()[:120])
    if in_args:
        raise bad(path, lineno, "truncated arguments block (no 'end of arguments' line)")
    if not steps:
        raise bad(path, None, "no Megatron 'iteration N/ M | ... |' lines found")

    run = ImportedRun(KIND, str(path), sha256_path(path))
    step_arr = np.asarray(steps, dtype=np.int64)
    if step_arr[0] < 1:
        raise bad(path, lines[0], "iteration 0: steps are numbered from 1")
    run.steps = pa.array(step_arr, type=pa.int64())
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
    seq = args.get("seq_length")
    if "tokens" not in run.columns and "n_samples" in run.columns and isinstance(seq, int):
        import pyarrow.compute as pc

        run.columns["tokens"] = pc.multiply(run.columns["n_samples"], float(seq))
    if any(t is not None for t in times):
        run.columns["time"] = pa.array(times, type=pa.float64())
        known = [t for t in times if t is not None]
        run.started_at, run.ended_at = min(known), max(known)
    for i, r in enumerate(rows):
        if r.get(SKIPPED_KEY):
            run.event("skip", step=steps[i], severity="warning", time_s=times[i],
                      iterations=int(r[SKIPPED_KEY]), line=lines[i], reason="reported by Megatron-LM")
        if r.get(NAN_KEY):
            run.event("nan", step=steps[i], severity="warning", time_s=times[i],
                      iterations=int(r[NAN_KEY]), line=lines[i])
    for rs in restarts:
        run.event("restart", step=rs.pop("step"), severity="warning", time_s=rs.pop("time"), **rs)
    run.evals = [(s, m, v) for (s, m), v in sorted(evals.items())]
    run.config = args or None
    ws = args.get("world_size")
    run.world_size = ws if isinstance(ws, int) else None
    run.hparams.update({f"args.{k}": v for k, v in args.items()})
    run.hparams.update({
        "import.kind": KIND, "import.path": str(path), "import.content_sha256": run.content_sha256,
        "import.sampled": False, "import.train_iters": train_iters, "import.restarts": len(restarts),
        **{f"import.map.{m}": t for m, t in sorted(mapped.items())},
    })
    li = args.get("log_interval")
    if isinstance(li, int):
        run.hparams["import.log_interval"] = li
        if li > 1:
            run.hparams["import.note"] = (f"values are Megatron's averages over log_interval={li} "
                                          "iterations; skipped marks an interval with a skipped iteration")
    return [run]
