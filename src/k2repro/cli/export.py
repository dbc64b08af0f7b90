"""`k2repro export RUN --out DIR`: the 360 release bundle of a run (config, environment, data
manifest and order, tables, checkpoints as safetensors and DCP, data, evals, forensics, a
model card, MANIFEST.json). A resumed or rolled-back run exports as one logical run. See
docs/release-bundle.md."""

from __future__ import annotations

import argparse
import json
import sys

from k2repro.cli.render import jsonable


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.replace("\n", " ") if __doc__ else None
    parser.add_argument("run", help="run id, unique run id prefix, or unique run name")
    parser.add_argument("--out", required=True, metavar="DIR", help="the bundle folder to create (must not exist)")
    parser.add_argument("--checkpoints", default="last", metavar="all|last|every:N|none",
                        help="which checkpoints to ship, as safetensors weights and DCP state (default: last)")
    parser.add_argument("--with-samples", action="store_true",
                        help="include the per-sample table (sample_stats); the data order ships anyway")
    parser.add_argument("--no-data", action="store_true",
                        help="do not ship the packed training data (the bundle then cannot replay)")
    parser.add_argument("--reports", default="reports", metavar="DIR",
                        help="where forensics reports live: DIR/<run_id>/forensics.* (default: reports)")
    parser.add_argument("--store", default=None, help="store root (default: $K2REPRO_STORE, else runs)")
    parser.add_argument("--sign", default=None, metavar="KEY",
                        help="sign the bundle with this ed25519 private key (PEM or OpenSSH, unencrypted): "
                        "MANIFEST.sig, checked by `verify-bundle --key PUB` and `import bundle --key PUB`")
    parser.add_argument("--allow-incomplete", action="store_true",
                        help="ship a run whose stored rows are incomplete (missing steps, a segment that is a "
                        "folder), saying so in bundle.json and the model card; refused otherwise")
    parser.add_argument("--json", action="store_true", help="print bundle.json's content as one JSON object")


def _say(msg: str) -> None:
    print(f"export: {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from k2repro.bundle.export import export_run

    info = export_run(args.store, args.run, args.out, checkpoints=args.checkpoints,
                      with_samples=args.with_samples, data=not args.no_data, reports_dir=args.reports,
                      progress=None if args.json else _say, sign=args.sign,
                      allow_incomplete=args.allow_incomplete)
    if args.json:
        print(json.dumps(jsonable(info), default=str))
        return 0
    run_ = info["run"]
    print(f"bundle {info['bundle']}: run {run_['head']}"
          + (f" ({len(run_['chain'])} launches)" if len(run_["chain"]) > 1 else "")
          + f", {info['steps']['count']} steps, {len(info['checkpoints'])} checkpoint(s), "
          f"{info['bytes'] / 1e6:.2f} MB")
    for n in info["notes"]:
        print(f"note: {n}", file=sys.stderr)
    return 0
