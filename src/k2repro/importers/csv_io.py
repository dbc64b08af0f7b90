"""Reading CSV files for the importers: the header and a sample with the csv module, the data
through DuckDB's reader with explicit types, and a row's line number for error messages.

Two parsers (W&B chart exports and generic CSV) read CSV the same strict way; keeping the
reader here means one place decides what a malformed line is and how its error reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2repro.errors import BadInputError
from k2repro.importers.parsed import bad
from k2repro.importers.values import show

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa


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
