"""`k2repro batch RUN --step N`: the samples one step trained on (logged and recomputed from seed,
manifest and step, and whether they agree), each with its loss, documents and text."""

from __future__ import annotations

import argparse
import json
import sys

from k2repro.cli.render import jsonable


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("The samples of one step: logged ids and ids recomputed from seed, data "
                          "manifest and step (do they agree?), each sample's loss, documents and text.")
    parser.add_argument("run", help="run id, unique run id prefix, or unique run name")
    parser.add_argument("--step", type=int, required=True, help="the optimizer step (from 1)")
    parser.add_argument("--store", default=None, help="store root (default: $K2REPRO_STORE, else runs)")
    parser.add_argument("--packed-dir", default=None,
                        help="packed data folder (default: the run's data.packed_dir)")
    parser.add_argument("--no-text", action="store_true", help="document ids only, no decoded text")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")


def run(args: argparse.Namespace) -> int:
    from k2repro.audit.capability import partial_line
    from k2repro.audit.store import open_store
    from k2repro.tools.batch import batch_lookup, render_text

    with open_store(args.store) as store:
        report = batch_lookup(store, args.run, args.step, packed_dir=args.packed_dir, text=not args.no_text)
        limits = partial_line("batch", report["run_id"], store.run(report["run_id"]).get("source"))
    if limits:  # stderr: --json stays one object
        print(f"k2repro batch: {limits}", file=sys.stderr)
    print(json.dumps(jsonable(report), allow_nan=False, ensure_ascii=False) if args.json else render_text(report))
    return 0
