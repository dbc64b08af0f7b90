"""Validation every importer shares: step numbers while a source is parsed, and every value of
a parsed run before anything is written.

Parsers accept what looks like a number; the store's columns have limits that Arrow enforces
late, with a traceback (`ArrowInvalid: Float value inf was truncated converting to int64`).
These checks turn each such value into the importers' one-line error naming the file and the
line (or the step, where the source has no lines), before the store is touched.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from k2repro.errors import BadInputError
from k2repro.importers.names import STEP_INT
from k2repro.importers.parsed import bad

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from k2repro.importers.parsed import ImportedRun

#: int64 columns (step, tokens, ...): what fits, as a float comparison (2^63 is exact in float).
INT_LIMIT = 2.0**63
#: Times the store can hold (timestamp[us]) and Python can print: years 1 to 9999.
TIME_MIN = datetime(1, 1, 2, tzinfo=timezone.utc).timestamp()
TIME_MAX = datetime(9999, 12, 30, tzinfo=timezone.utc).timestamp()
#: How much of an offending value an error message shows.
SHOW_CHARS = 60


def show(value: Any, limit: int = SHOW_CHARS) -> str:
    """repr() of a value, cut to `limit` characters with the full length said: a 20 MB cell
    must not be echoed whole to the terminal."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, str | bytes) else len(text)
    return f"{text[:limit]}... ({size:,} characters)"


def where(run: ImportedRun, i: int) -> str:
    """`<file>:<line>` of row i where the importer knows lines, else `<file>: step N`."""
    line_of = getattr(run, "line_of", None)
    if line_of is not None:
        try:
            return f"{run.path}:{line_of(i)}"
        except (IndexError, TypeError, ValueError):
            pass
    try:
        return f"{run.path}: step {int(run.steps[i].as_py())}"
    except (IndexError, TypeError, ValueError, AttributeError):
        return f"{run.path}"


def check_step_range(path: str, steps: Any, line_of: Any, what: str = "step") -> None:
    """Step numbers (floats, after the step axis is divided out) must fit int64."""
    import numpy as np

    big = np.flatnonzero(np.abs(np.asarray(steps, dtype=np.float64)) >= INT_LIMIT)
    if big.size:
        i = int(big[0])
        raise BadInputError(f"{path}:{line_of(i)}: {what} {float(steps[i]):.6g} is too large "
                            f"(steps are 64-bit: at most {2**63 - 1})")


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


def time_ok(v: Any) -> bool:
    """A time value the store can hold: None, epoch seconds within years 1-9999, or an ISO
    8601 string that parses (to such a time)."""
    if v is None:
        return True
    if isinstance(v, str):
        try:
            d = datetime.fromisoformat(v)
            (d if d.tzinfo else d.replace(tzinfo=timezone.utc)).timestamp()
        except (ValueError, OverflowError, OSError):
            return False
        return True
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return False
    return TIME_MIN <= f <= TIME_MAX


def to_datetime(v: Any) -> datetime | None:
    """A value `time_ok` accepted as an aware datetime (naive ISO strings are UTC)."""
    if v is None:
        return None
    if isinstance(v, str):
        d = datetime.fromisoformat(v)
        return d if d.tzinfo else d.replace(tzinfo=timezone.utc)
    return datetime.fromtimestamp(float(v), tz=timezone.utc)


def _time_error(run: ImportedRun, i: int, value: Any) -> BadInputError:
    return BadInputError(f"{where(run, i)}: time {show(value)} is not a time k2repro can store "
                         f"(epoch seconds between years 1 and 9999, or an ISO 8601 date)")


def check_run_values(run: ImportedRun) -> None:
    """Every `steps` column of a parsed run against what its store column holds: integer
    columns finite, whole and within int64; times finite and within years 1-9999 (ISO strings
    must parse)."""
    import numpy as np
    import pyarrow as pa

    for name, arr in run.columns.items():
        if name == "time":
            if pa.types.is_timestamp(arr.type):
                continue
            if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
                for i, v in enumerate(arr.to_pylist()):
                    if not time_ok(v):
                        raise _time_error(run, i, v)
                continue
            x = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
            valid = arr.is_valid().to_numpy(zero_copy_only=False)
            wrong = np.flatnonzero(valid & ~((x >= TIME_MIN) & (x <= TIME_MAX)))  # NaN compares false
            if wrong.size:
                i = int(wrong[0])
                raise _time_error(run, i, float(x[i]))
        elif name in STEP_INT:
            x = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
            valid = arr.is_valid().to_numpy(zero_copy_only=False)
            wrong = np.flatnonzero(valid & ~(np.isfinite(x) & (np.abs(x) < INT_LIMIT)))
            if wrong.size:
                i = int(wrong[0])
                v = float(x[i])
                raise BadInputError(f"{where(run, i)}: {name} {v if not math.isfinite(v) else f'{v:.6g}'} "
                                    f"is not a whole number of at most 64 bits")
    for label, t in (("first time", run.started_at), ("last time", run.ended_at)):
        if not time_ok(t):
            raise BadInputError(f"{run.path}: {label} {show(t)} (wall_time) is not a time k2repro can store "
                                f"(epoch seconds between years 1 and 9999)")
    for e in run.events:
        if not time_ok(e.get("time")):
            raise BadInputError(f"{run.path}: step {e.get('step')}: time {show(e.get('time'))} is not a time "
                                f"k2repro can store (epoch seconds between years 1 and 9999)")


__all__ = ["check_run_values", "check_step_range", "check_steps", "show", "steps_from_float", "time_ok",
           "to_datetime", "where", "INT_LIMIT"]
