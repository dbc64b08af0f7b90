"""`k2repro verify-store`: read every segment of a store whole (page checksums verified) and
check each rank's segment sequence for holes. Exit 1 when something is damaged or missing."""

from __future__ import annotations

import argparse
import json

from k2repro.errors import VerificationFailed


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Check a store's integrity beyond what queries notice: every segment is read whole with "
        "its page checksums verified (a flipped byte that DuckDB would return as a changed value "
        "is named), and each rank's segment numbers must run without a hole (a deleted segment "
        "is named). Exit 0 all good, 1 damage found, 2 bad input.")
    parser.add_argument("--store", default=None, help="store root (default: $K2REPRO_STORE, else runs)")
    parser.add_argument("--run", action="append", default=None, metavar="RUN_ID",
                        help="only this run (repeatable); default: every run")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")


def run(args: argparse.Namespace) -> int:
    from k2repro.audit.verify import verify_store
    from k2repro.core.layout import default_store

    root = default_store() if args.store is None else args.store
    checks = verify_store(root, args.run)
    bad = [c for c in checks if c.problems]
    if args.json:
        from pathlib import Path

        print(json.dumps({"ok": not bad, "runs": [c.as_dict(Path(root)) for c in checks],
                          "segments": sum(c.segments for c in checks)}))
    else:
        for c in checks:
            state = "ok" if not c.problems else f"{len(c.problems)} problem(s)"
            print(f"{c.run_dir.name}: {c.segments} segments, {c.checkpoints} checkpoint(s), {state}")
            for p in c.problems:
                print(f"  {p}")
            for u in c.unchecked:
                print(f"  not checked: {u}")
        print(f"{len(checks)} run(s), {sum(c.segments for c in checks)} segments, "
              f"{sum(c.checkpoints for c in checks)} checkpoint(s), "
              f"{'all readable' if not bad else f'{len(bad)} run(s) damaged'}")
    if bad:
        first = bad[0]
        raise VerificationFailed(f"{first.run_dir.name}: {first.problems[0]}"
                                 + (f" (and {sum(len(c.problems) for c in bad) - 1} more)"
                                    if sum(len(c.problems) for c in bad) > 1 else ""))
    return 0
