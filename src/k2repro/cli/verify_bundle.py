"""`k2repro verify-bundle DIR`: check a release bundle without importing it: MANIFEST.json's
own checksum, then the size and sha256 of every file, and that none is missing, unlisted or a
link; with `--key PUB`, the ed25519 signature (origin, not only integrity). Exit 0 when all
match, 1 naming every file that does not, 2 when DIR is not a bundle or the key is bad.

Also home of `k2repro import bundle DIR` (wired into `k2repro import`): verify, then add the
run to a store so that `k2repro replay` works there."""

from __future__ import annotations

import argparse
import json
import sys

from k2repro.cli.render import jsonable


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0].replace("\n", " ") if __doc__ else None
    parser.add_argument("bundle", metavar="DIR", help="the bundle folder")
    parser.add_argument("--json", action="store_true",
                        help='print {"ok", "problems": [{"file", "problem"}], "files", "bytes"}')
    parser.add_argument("--key", default=None, metavar="PUB",
                        help="the publisher's ed25519 public key (PEM or OpenSSH): also check MANIFEST.sig, "
                        "which proves who made the bundle (a checksum proves only that nothing changed)")
    parser.add_argument("--store", default=None, help="unused (no store is touched); accepted for symmetry")


def run(args: argparse.Namespace) -> int:
    from k2repro.tools.bundle import verify_bundle

    out = verify_bundle(args.bundle, args.key)
    if args.json:
        print(json.dumps(jsonable(out)))
    else:
        for p in out["problems"]:
            print(f"FAILED {p['file']}: {p['problem']}")
        sig = out.get("signature")
        said = ""
        if sig is not None and sig.get("ok"):
            said = f", signed by key {sig['key']}"
        elif sig is not None and sig.get("ok") is None:
            said = f"; signed (key {sig.get('signed_by')}), signature {sig['problem']}"
        elif sig is None and out["ok"]:
            said = "; not signed: this proves the files are intact, not who made them"
        print(f"{'OK' if out['ok'] else 'FAILED'}: {out['files']} files, {out['bytes'] / 1e6:.2f} MB checked"
              + ("" if out["ok"] else f", {len(out['problems'])} problem(s)") + said)
    return 0 if out["ok"] else 1


def configure_import(p: argparse.ArgumentParser) -> None:
    """`k2repro import bundle DIR`'s options."""
    p.description = ("Verify a release bundle (k2repro export) and add its run(s) to the store, with "
                     "the shipped checkpoints and data, so that `k2repro replay` works there. A bundle "
                     "that fails verification is refused (exit 2) and nothing is written.")
    p.add_argument("path", metavar="DIR", help="the bundle folder")
    p.add_argument("--store", default=None, help="store root (default: $K2REPRO_STORE, else runs)")
    p.add_argument("--key", default=None, metavar="PUB",
                   help="the publisher's ed25519 public key: refuse a bundle that is not signed with it")
    p.add_argument("--json", action="store_true", help='print {"run_ids": [...], ...} as JSON to stdout')


def run_import(args: argparse.Namespace) -> int:
    from k2repro.tools.bundle import import_bundle

    out = import_bundle(args.path, args.store,
                        progress=None if args.json else (lambda m: print(f"import: {m}", file=sys.stderr)),
                        key=args.key)
    if args.json:
        print(json.dumps(jsonable(out)))
        return 0
    for rid in out["run_ids"]:
        print(f"run_id={rid} (imported into {out['folder']})")
    for rid, rw in out["rewrites"].items():
        for key, (old, new) in rw.items():
            print(f"  {rid}: {key}: {old} -> {new}")
    return 0
