"""Read-only SQL by an allow-list of statement types, decided by DuckDB's own parser.

Allowed: SELECT (which DuckDB also reports for WITH, VALUES, FROM-first, DESCRIBE, SHOW and
SUMMARIZE), EXPLAIN of an allowed statement (EXPLAIN ANALYZE runs it, so the inner statement is
checked too), and PRAGMAs that only read metadata. Everything else (INSERT, UPDATE, DELETE,
COPY, ATTACH, DETACH, CREATE, DROP, ALTER, INSTALL/LOAD, SET/RESET/USE, CALL, EXPORT, PREPARE,
transactions, several statements at once, ...) is refused with the statement type named.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

from k2repro.errors import BadInputError, K2ReproError

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


class QueryTimeout(K2ReproError):
    """The query ran past its time limit and was stopped."""

    exit_code = 124


class QueryInterrupted(K2ReproError):
    """Ctrl-C (SIGINT) stopped the query."""

    exit_code = 130


def run_query(store: Any, query: str, params: list[Any] | None, timeout: float,
              max_rows: int | None = None) -> tuple[list[str], list, bool]:
    """Run one (already checked) query on `store` in a worker thread, so that the calling
    thread can stop it: at the deadline, or on SIGINT (Python raises KeyboardInterrupt in the
    main thread only), by DuckDB's `interrupt()`. Before, Ctrl-C surfaced as a RuntimeError
    traceback and a query could run for ever. Shared by `k2repro sql` and the UI's SQL page
    (which passes `max_rows`: a page must not pull a billion rows into memory).

    Returns (columns, rows, truncated): `truncated` is True when `max_rows` cut the result."""
    import duckdb

    out: dict[str, Any] = {}
    finished = threading.Event()  # not Thread.join: an interrupted join can report a live thread dead

    def work() -> None:
        try:
            cur = store.execute(query, params)
            out["columns"] = [d[0] for d in cur.description] if cur.description else []
            if not cur.description:
                out["rows"] = []
            elif max_rows is None:
                out["rows"] = cur.fetchall()
            else:
                out["rows"] = cur.fetchmany(max_rows + 1)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            out["exc"] = exc
        finally:
            finished.set()

    worker = threading.Thread(target=work, name="k2repro-sql", daemon=True)
    deadline = time.monotonic() + timeout if timeout > 0 else None
    why: str | None = None

    def on_sigint(_signum: int, _frame: Any) -> None:
        # A handler that records and returns, instead of a KeyboardInterrupt raised inside
        # Event.wait: raised between taking and releasing the Event's lock, that exception left
        # the lock held, and the worker's finished.set() then waited for it for ever (a test
        # caught the hang under load).
        nonlocal why
        why = why or "sigint"
        store.con.interrupt()

    import signal

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main else None
    worker.start()
    try:
        try:
            while not finished.wait(0.05):
                if why is not None:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    why = "timeout"
                    store.con.interrupt()
                    break
        except KeyboardInterrupt:  # a caller's thread that is not the main one cannot get here
            why = "sigint"
            store.con.interrupt()
        while not finished.wait(1):  # DuckDB stops at its next check; keep asking
            store.con.interrupt()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    if why == "timeout":
        raise QueryTimeout(f"SQL: the query ran longer than {timeout:g} s and was stopped (--timeout to change it)")
    if why == "sigint":
        raise QueryInterrupted("SQL: interrupted (SIGINT); the query was stopped, nothing was changed")
    exc = out.get("exc")
    if isinstance(exc, duckdb.Error):
        raise BadInputError(f"SQL: {str(exc).strip().splitlines()[0]}") from None
    if exc is not None:
        raise exc
    rows = out["rows"]
    truncated = max_rows is not None and len(rows) > max_rows
    return out["columns"], rows[:max_rows] if truncated else rows, truncated
