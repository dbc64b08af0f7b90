"""`k2repro diff RUN_A RUN_B`: config, environment, data and curves of two runs, and the first
step where they part. Exits 0 whatever it finds (2 for an unknown run or store)."""

from __future__ import annotations

import argparse
import json

from k2repro.cli.render import jsonable


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Where and why two runs part: config, environment, data manifest and curves "
                          "aligned by step. Volatile facts (run ids, paths, pids, ports, timestamps) are set aside.")
    parser.add_argument("run_a", help="run A (the reference): id, unique prefix or unique name")
    parser.add_argument("run_b", help="run B")
    parser.add_argument("--store", default=None, help="store of run A (default: $K2REPRO_STORE, else runs)")
    parser.add_argument("--store-b", default=None, help="store of run B (default: --store)")
    parser.add_argument("--tolerance", type=float, default=None, metavar="T",
                        help="relative tolerance for first_loss_divergence_step_tol (default 1e-5)")
    parser.add_argument("--png", default=None, metavar="PATH", help="write both loss curves and B - A as a PNG")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--md", action="store_true", help="Markdown")
    fmt.add_argument("--json", action="store_true", help="one JSON object on stdout")


def run(args: argparse.Namespace) -> int:
    from k2repro.audit.store import open_store
    from k2repro.errors import BadInputError
    from k2repro.tools.diff import DEFAULT_TOLERANCE, diff_runs, plot_png, render_md, render_text

    tol = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    if tol < 0:
        raise BadInputError(f"--tolerance {tol}: must be >= 0")
    sa = open_store(args.store)
    sb = open_store(args.store_b) if args.store_b else sa
    try:
        report = diff_runs(sa, args.run_a, sb, args.run_b, tol)
        if args.png:
            report["png"] = str(plot_png(sa, sb, report, args.png))
    finally:
        sa.close()
        if sb is not sa:
            sb.close()
    if args.json:
        print(json.dumps(jsonable(report), allow_nan=False))
    elif args.md:
        print(render_md(report), end="")
    else:
        print(render_text(report))
    return 0
