"""`k2repro report RUN`: the run report (summary, training curves, eval metrics over training
with spikes marked, link to the forensics report). Thin: parse, call `k2repro.tools.report`,
print the paths (or the report object with `--json`). Reads the store only; never imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run id (or unique prefix, or unique run name)")
    parser.add_argument("--store", default=None,
                        help="audit store to read; a root above the stage folders sees train, eval and "
                        "forensics rows together (default: $K2REPRO_STORE or runs)")
    parser.add_argument("--out", default="reports", help="writes OUT/RUN/report.{html,md,json} (default: reports)")
    parser.add_argument("--forensics-dir", action="append", default=[], metavar="DIR",
                        help="where `k2repro forensics --out` wrote its reports, if not OUT (repeatable)")
    parser.add_argument("--no-html", action="store_true", help="skip the HTML report (and its figures)")
    parser.add_argument("--json", action="store_true", help="print the report object as JSON to stdout")


def run(args: argparse.Namespace) -> int:
    from k2repro.tools.report import write_report

    obj, paths = write_report(args.store, args.run, args.out, args.forensics_dir, html_report=not args.no_html)
    if args.json:
        obj = {**obj, "files": {k: str(v) for k, v in paths.items()}}
        json.dump(obj, sys.stdout, allow_nan=False)
        sys.stdout.write("\n")
        return 0
    ot = obj["over_training"]
    print(f"run {obj['run_id']}: {obj['training']['n_steps']} steps, {len(ot['rows'])} evaluated checkpoint(s), "
          f"{len(obj['spikes'])} spike(s)")
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0
