"""Read-only SQL by an allow-list of statement types, decided by DuckDB's own parser.

Allowed: SELECT (which DuckDB also reports for WITH, VALUES, FROM-first, DESCRIBE, SHOW and
SUMMARIZE), EXPLAIN of an allowed statement (EXPLAIN ANALYZE runs it, so the inner statement is
checked too), and PRAGMAs that only read metadata. Everything else (INSERT, UPDATE, DELETE,
COPY, ATTACH, DETACH, CREATE, DROP, ALTER, INSTALL/LOAD, SET/RESET/USE, CALL, EXPORT, PREPARE,
transactions, several statements at once, ...) is refused with the statement type named.
"""

from __future__ import annotations

import re

from k2repro.errors import BadInputError

ALLOWED_TYPES = ("SELECT", "EXPLAIN", "PRAGMA")
READ_ONLY_PRAGMAS = frozenset({
    "table_info", "show_tables", "show_tables_expanded", "show", "database_list", "database_size",
    "version", "platform", "functions", "collations", "user_agent", "storage_info",
})
ALLOWED_TEXT = "SELECT, WITH, VALUES, FROM, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN, read-only PRAGMA"

_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(ANALYZE\s+|\([^)]*\)\s*)?", re.IGNORECASE)
_PRAGMA = re.compile(r"^\s*PRAGMA\s+([A-Za-z_][A-Za-z0-9_]*)", re.IGNORECASE)


def _type_name(stmt: object) -> str:
    t = getattr(stmt, "type", None)
    return getattr(t, "name", str(t)).upper()


def check_read_only(query: str) -> None:
    """Raise BadInputError naming the statement type unless `query` is one allowed statement."""
    import duckdb

    try:
        stmts = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise BadInputError(f"SQL: {str(exc).strip().splitlines()[0]}") from None
    if not stmts:
        raise BadInputError("SQL: no statement given")
    if len(stmts) > 1:
        kinds = ", ".join(_type_name(s) for s in stmts)
        raise BadInputError(f"read-only: one statement per call (got {len(stmts)}: {kinds})")
    _check_one(stmts[0], query)


def _check_one(stmt: object, text: str) -> None:
    kind = _type_name(stmt)
    if kind == "SELECT":
        return
    if kind == "EXPLAIN":
        inner = _EXPLAIN.sub("", getattr(stmt, "query", text) or text, count=1)
        if inner.strip() == (getattr(stmt, "query", text) or text).strip():
            raise BadInputError("read-only: cannot read the statement inside EXPLAIN")
        check_read_only(inner)
        return
    if kind == "PRAGMA":
        m = _PRAGMA.match(getattr(stmt, "query", text) or text)
        name = m.group(1).lower() if m else "?"
        if name in READ_ONLY_PRAGMAS:
            return
        raise BadInputError(f"read-only: PRAGMA {name} is not allowed (read-only pragmas: "
                            f"{', '.join(sorted(READ_ONLY_PRAGMAS))})")
    raise BadInputError(f"read-only: {kind} statements are not allowed (allowed: {ALLOWED_TEXT})")
