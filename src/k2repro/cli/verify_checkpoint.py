"""`k2repro verify-checkpoint PATH`: check every file against the checkpoint's manifest."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from k2repro.errors import BadInputError, CheckpointError, VerificationFailed


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a checkpoint folder (…/checkpoints/step_00000010)")
    parser.add_argument("--json", action="store_true", help="machine-readable result")


def run(args: argparse.Namespace) -> int:
    if not Path(args.path).is_dir():  # nothing to verify: bad input (exit 2), as verify-bundle does
        raise BadInputError(f"{args.path} is not a folder (expected a checkpoint such as …/checkpoints/step_00000010)")
    from k2repro.core.ckpt_manifest import verify_checkpoint

    try:
        manifest = verify_checkpoint(args.path)
    except CheckpointError as exc:
        if args.json:
            print(json.dumps({"ok": False, "path": args.path, "error": str(exc)}))
        raise VerificationFailed(str(exc)) from None  # exit 1: docs/architecture.md "Exit codes"
    out = {"ok": True, "path": args.path, "step": manifest.get("step"), "files": len(manifest["files"]),
           "world_size": manifest.get("world_size")}
    print(json.dumps(out) if args.json else f"ok: {args.path} (step {out['step']}, {out['files']} files)")
    return 0
