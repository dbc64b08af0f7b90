"""`k2repro runs`: the runs of a store with their derived status, oldest first."""

from __future__ import annotations

import argparse
from pathlib import Path

from k2repro.cli.render import add_format_args, chosen_format, render

# Text mode shows these; --json and --csv show every column of the `runs` view + last_step.
TEXT_COLUMNS = ("run_id", "name", "status", "started_at", "ended_at", "last_step", "source",
                "parent_run_id", "resumed_from_step", "world_size", "config_hash", "git_commit")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("List the runs in a store: status (running, completed, failed, crashed) "
                          "is derived from end markers and heartbeats at query time.")
    parser.add_argument("--store", default=None,
                        help="store root (default: $K2REPRO_STORE, else runs)")
    parser.add_argument("--status", default=None,
                        choices=("running", "completed", "failed", "crashed"),
                        help="only runs with this status")
    add_format_args(parser)


def run(args: argparse.Namespace) -> int:
    from k2repro.audit.store import open_store
    from k2repro.core.layout import default_store
    from k2repro.errors import BadInputError

    fmt = chosen_format(args)
    root = Path(args.store) if args.store else default_store()
    if not root.is_dir():  # an empty table would read as "no runs yet" for a mistyped path
        raise BadInputError(f"no store at {root} (pass --store or set K2REPRO_STORE)")
    store = open_store(root, sandbox=True)
    try:
        where = "WHERE r.status = ?" if args.status else ""
        cur = store.execute(
            "SELECT r.*, s.last_step FROM runs r LEFT JOIN "
            "(SELECT run_id, max(step) AS last_step FROM steps GROUP BY run_id) s USING (run_id) "
            f"{where} ORDER BY r.started_at, r.run_id", [args.status] if args.status else None)
        columns = [d[0] for d in cur.description]
        rows = cur.fetchall()
    finally:
        store.close()
    if fmt == "text":
        idx = [columns.index(c) for c in TEXT_COLUMNS]
        columns = list(TEXT_COLUMNS)
        rows = [tuple(r[i] for i in idx) for r in rows]
    render(columns, rows, fmt)
    return 0
