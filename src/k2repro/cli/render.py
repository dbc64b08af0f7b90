"""Render query results for the CLI: an aligned text table, `--json` (array of row objects) or
`--csv`. Works on plain (columns, rows) so that commands need neither pandas nor pyarrow."""

from __future__ import annotations

import csv
import datetime as _dt
import decimal
import json
import math
import os
import sys
import uuid
from collections.abc import Sequence
from typing import Any, TextIO

TEXT_MAX_WIDTH = 80  # text mode only; --json and --csv print values whole


def jsonable(v: Any) -> Any:
    """A JSON-safe value: timestamps as ISO 8601, non-finite floats as the strings "NaN",
    "Infinity", "-Infinity" (strict JSON has no such numbers), decimals as floats."""
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return v
    if isinstance(v, _dt.datetime | _dt.date | _dt.time):
        return v.isoformat()
    if isinstance(v, _dt.timedelta):
        return v.total_seconds()
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v).hex()
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple | set):
        return [jsonable(x) for x in v]
    return str(v)


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    j = jsonable(v)
    return json.dumps(j, ensure_ascii=False) if isinstance(j, list | dict) else j


def _text(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, _dt.datetime):
        return v.isoformat(sep=" ", timespec="milliseconds")
    s = str(v).replace("\n", "\\n")
    return s if len(s) <= TEXT_MAX_WIDTH else s[: TEXT_MAX_WIDTH - 1] + "…"


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float | decimal.Decimal) and not isinstance(v, bool)


def render(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str = "text",
           out: TextIO | None = None) -> None:
    """Write rows as text, JSON or CSV; a closed pipe (`| head`) ends output quietly."""
    try:
        _render(columns, rows, fmt, out or sys.stdout)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush cannot fail


def _render(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str, out: TextIO) -> None:
    if fmt == "json":
        json.dump([{c: jsonable(v) for c, v in zip(columns, r, strict=True)} for r in rows], out,
                  ensure_ascii=False, allow_nan=False)
        out.write("\n")
        return
    if fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow([_csv_cell(v) for v in r])
        return
    cells = [[_text(v) for v in r] for r in rows]
    widths = [len(c) for c in columns]
    for r in cells:
        for i, s in enumerate(r):
            widths[i] = max(widths[i], len(s))
    numeric = [bool(rows) and all(_is_num(r[i]) or r[i] is None for r in rows) for i in range(len(columns))]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if numeric[i] else v.ljust(w)
                         for i, (v, w) in enumerate(zip(vals, widths, strict=True))).rstrip()

    out.write(line(list(columns)) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for r in cells:
        out.write(line(r) + "\n")
    out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")


def add_format_args(parser: Any) -> None:
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="JSON array of row objects on stdout")
    g.add_argument("--csv", action="store_true", help="CSV with a header row on stdout")


def chosen_format(args: Any) -> str:
    return "json" if getattr(args, "json", False) else "csv" if getattr(args, "csv", False) else "text"
