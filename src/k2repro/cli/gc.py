"""`k2repro gc`: the store's lifecycle. Remove runs (`--run ID...`, `--name PATTERN`,
`--older-than AGE`; every given criterion must hold), never a running one; `--dry-run` lists
exactly what the same call without it removes. `--compact` merges small segments (safe while
others query); `--migrate` upgrades runs written by an older schema version. See
docs/store-lifecycle.md."""

from __future__ import annotations

import argparse
import json
import sys

from k2repro.cli.render import jsonable


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.replace("\n", " ") if __doc__ else None
    parser.add_argument("--store", default=None, help="store root (default: $K2REPRO_STORE, else runs)")
    parser.add_argument("--run", nargs="+", default=None, metavar="ID",
                        help="run ids (or unique prefixes or names) to remove / compact")
    parser.add_argument("--name", default=None, metavar="PATTERN", help="runs whose name matches this glob")
    parser.add_argument("--older-than", default=None, metavar="AGE",
                        help="runs that ended (else started) longer ago than AGE: 90s, 30m, 12h, 7d, 2w")
    parser.add_argument("--compact", action="store_true",
                        help="merge small segments per table and writer instead of removing runs")
    parser.add_argument("--small-mb", type=float, default=None,
                        help="--compact: segments below this size are merged (default 16)")
    parser.add_argument("--offline", action="store_true",
                        help="--compact on a filesystem without atomic folder exchange: only when "
                        "nobody queries the store")
    parser.add_argument("--migrate", action="store_true",
                        help="upgrade runs written by an older schema version")
    parser.add_argument("--dry-run", action="store_true", help="list what would happen, change nothing")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from k2repro.core.layout import default_store
    from k2repro.errors import BadInputError
    from k2repro.tools import gc

    store = Path(args.store) if args.store else default_store()
    if args.compact and args.migrate:
        raise BadInputError("gc: --compact and --migrate are separate steps: give one")
    if args.migrate:
        from k2repro.audit.migrate import migrate_store

        if not store.is_dir():
            raise BadInputError(f"store {store} does not exist")
        out = migrate_store(store, dry_run=args.dry_run)
        out["dry_run"] = args.dry_run
        if args.json:
            print(json.dumps(jsonable(out)))
            return 0
        verb = "would upgrade" if args.dry_run else "upgraded"
        for p in out["plan"]:
            print(f"{verb} {p['run_dir']}: schema version {p['from_version']} -> {p['to_version']}")
        if not out["plan"]:
            print(f"store {store}: every run is at schema version {out['schema_version']}")
        return 0
    if args.compact:
        small = None if args.small_mb is None else int(args.small_mb * (1 << 20))
        out = gc.compact(store, args.run, dry_run=args.dry_run, small_bytes=small, offline=args.offline)
        if args.json:
            print(json.dumps(jsonable(out)))
            return 0
        for r in out["runs"]:
            for p in r["plan"]:
                verb = "would merge" if args.dry_run else "merged"
                print(f"{verb} {p['segments']} segments of {r['run_id']}/{p['table']} (writer {p['writer']}, "
                      f"{_mb(p['bytes'])})")
        for k in out["kept"]:
            print(f"kept {k['run_id']}: {k['reason']}")
        if not out["runs"]:
            print("nothing to compact")
        return 0
    age = gc.parse_age(args.older_than) if args.older_than is not None else None
    plan = gc.plan_gc(store, args.run, args.name, age)
    out = dict(plan.to_dict(), dry_run=True, removed_run_ids=[]) if args.dry_run else gc.apply_gc(plan)
    if args.json:
        print(json.dumps(jsonable(out)))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for r in out["remove"]:
        print(f"{verb} {r['run_id']} ({r['name']}, {r['status']}, {_mb(r['bytes'])})")
        for p in r["paths"]:
            print(f"  {p}")
    for k in out["kept"]:
        print(f"kept {k['run_id']}: {k['reason']}")
    for n in out["notes"]:
        print(f"note: {n}", file=sys.stderr)
    if not out["remove"]:
        print("no run matched")
    return 0
