"""`k2repro verify-bundle DIR`: check a release bundle without importing it: MANIFEST.json's
own checksum, then the size and sha256 of every file, and that none is missing, unlisted or a
link; with `--key PUB`, the ed25519 signature (origin, not only integrity). Exit 0 when all
match, 1 naming every file that does not, 2 when DIR is not a bundle or the key is bad.
Thin: parse, call `k2repro.bundle.verify`, render, exit code."""

from __future__ import annotations

import argparse
import json

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
    from k2repro.bundle.verify import verify_bundle

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

