"""`k2repro sql "SELECT ..."`: read-only SQL over the audit store.

Thin: the allow-list lives in k2repro.audit.readonly, the views in k2repro.audit.store. The
connection is sandboxed (no file access outside the store, no extensions, locked settings).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from k2repro.audit.readonly import QueryInterrupted, QueryTimeout, run_query
from k2repro.cli.render import add_format_args, chosen_format, render
from k2repro.errors import BadInputError

__all__ = ["QueryInterrupted", "QueryTimeout", "configure", "parse_param", "run"]


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


def parse_param(text: str) -> Any:
    if text == "null":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


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
        columns, rows, _ = run_query(store, query, params if params else None, args.timeout)
    finally:
        store.close()
    render(columns, rows, chosen_format(args))
    return 0
