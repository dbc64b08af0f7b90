"""`k2repro sql "SELECT ..."`: read-only SQL over the audit store.

Thin: the allow-list lives in k2repro.audit.readonly, the views in k2repro.audit.store. The
connection is sandboxed (no file access outside the store, no extensions, locked settings).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from k2repro.cli.render import add_format_args, chosen_format, render
from k2repro.errors import BadInputError, K2ReproError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Read-only SQL (DuckDB) over the audit store: one SELECT / WITH / VALUES / "
                          "DESCRIBE / SHOW / SUMMARIZE / EXPLAIN / read-only PRAGMA statement. "
                          "Anything else exits 2 naming the statement type. Tables: runs, steps, "
                          "layer_stats, sample_stats, hparams, env, data_manifest, checkpoints, "
                          "events, evals, spikes, metrics, run_end, heartbeats, lineage, "
                          "lineage_steps (docs/audit-store.md).")
    parser.add_argument("query", help="the SQL statement ('-' reads it from stdin)")
    parser.add_argument("--store", default=None,
                        help="store root (default: $K2REPRO_STORE, else runs)")
    parser.add_argument("--param", action="append", default=[], metavar="VALUE",
                        help="value for the next ? placeholder, repeatable (integers and floats are "
                             "typed, 'null' is NULL, anything else a string)")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="stop the query after this many seconds (exit 124; 0: no limit; default 60)")
    add_format_args(parser)


class QueryTimeout(K2ReproError):
    """The query ran past --timeout and was stopped."""

    exit_code = 124


class QueryInterrupted(K2ReproError):
    """Ctrl-C (SIGINT) stopped the query."""

    exit_code = 130


def parse_param(text: str) -> Any:
    if text == "null":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _run_query(store: Any, query: str, params: list[Any] | None, timeout: float) -> tuple[list[str], list]:
    """Run the query in a worker thread, so that the main thread can stop it: at the
    deadline, or on SIGINT (Python raises KeyboardInterrupt in the main thread only), by
    DuckDB's `interrupt()`. Before, Ctrl-C surfaced as a RuntimeError traceback and a query
    could run for ever."""
    import threading
    import time

    import duckdb

    out: dict[str, Any] = {}
    finished = threading.Event()  # not Thread.join: an interrupted join can report a live thread dead

    def work() -> None:
        try:
            cur = store.execute(query, params)
            out["columns"] = [d[0] for d in cur.description] if cur.description else []
            out["rows"] = cur.fetchall() if cur.description else []
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            out["exc"] = exc
        finally:
            finished.set()

    worker = threading.Thread(target=work, name="k2repro-sql", daemon=True)
    deadline = time.monotonic() + timeout if timeout > 0 else None
    why = None
    worker.start()
    try:
        while not finished.wait(0.05):
            if deadline is not None and time.monotonic() > deadline:
                why = "timeout"
                store.con.interrupt()
                break
    except KeyboardInterrupt:
        why = "sigint"
        store.con.interrupt()
    while not finished.wait(10):  # DuckDB stops at its next check; keep asking
        store.con.interrupt()
    if why == "timeout":
        raise QueryTimeout(f"SQL: the query ran longer than {timeout:g} s and was stopped (--timeout to change it)")
    if why == "sigint":
        raise QueryInterrupted("SQL: interrupted (SIGINT); the query was stopped, nothing was changed")
    exc = out.get("exc")
    if isinstance(exc, duckdb.Error):
        raise BadInputError(f"SQL: {str(exc).strip().splitlines()[0]}") from None
    if exc is not None:
        raise exc
    return out["columns"], out["rows"]


def run(args: argparse.Namespace) -> int:
    from k2repro.audit.readonly import check_read_only
    from k2repro.audit.store import open_store

    query = sys.stdin.read() if args.query == "-" else args.query
    check_read_only(query)
    if not args.timeout >= 0:
        raise BadInputError(f"--timeout {args.timeout:g}: expected seconds >= 0")
    params = [parse_param(p) for p in args.param]
    store = open_store(args.store, sandbox=True)
    try:
        columns, rows = _run_query(store, query, params if params else None, args.timeout)
    finally:
        store.close()
    render(columns, rows, chosen_format(args))
    return 0
