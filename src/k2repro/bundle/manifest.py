"""The names of the bundle format and MANIFEST.json: the sha256 and size of every file, and the
sha256 of the manifest itself, so that a flipped byte anywhere is caught and blamed on the
right file. Export writes it last; verify and import read it first (`read_manifest`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from k2repro.errors import BadInputError

BUNDLE_FORMAT = "k2repro-bundle-v1"
#: What a bundle of this k2repro holds, within the same format: 1 the first release; 2 adds
#: the tokenizer under data/, the optional MANIFEST.sig and bundle.json's `incomplete`. Every
#: addition is optional to a reader, so version-1 bundles import and verify unchanged.
BUNDLE_VERSION = 2
BUNDLE_JSON = "bundle.json"
MANIFEST_JSON = "MANIFEST.json"
#: The detached ed25519 signature of MANIFEST.json (not listed in it: it signs it).
SIGNATURE = "MANIFEST.sig"
SELF_ZERO = "0" * 64


def file_entries(dest: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, bytes}} of every file under `dest` but MANIFEST.json."""
    from k2repro.core.hashing import sha256_file

    out = {}
    for f in sorted(dest.rglob("*")):
        if f.is_file() and f.name != MANIFEST_JSON:
            rel = f.relative_to(dest).as_posix()
            out[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return out


def manifest_bytes(body: dict[str, Any]) -> bytes:
    """MANIFEST.json carries the sha256 of its own bytes (with that field zeroed), so a flipped
    byte in it is caught and blamed on it, not on a file it lists."""
    text = json.dumps({**body, "self_sha256": SELF_ZERO}, indent=1, sort_keys=True) + "\n"
    h = hashlib.sha256(text.encode()).hexdigest()
    return text.replace(f'"self_sha256": "{SELF_ZERO}"', f'"self_sha256": "{h}"', 1).encode()


def write_manifest(dest: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """MANIFEST.json of every file now in `dest`, with `meta` (time, run ids) beside them."""
    files = file_entries(dest)
    body = {"format": BUNDLE_FORMAT, **meta, "files": files}
    (dest / MANIFEST_JSON).write_bytes(manifest_bytes(body))
    return body


def read_manifest(bundle: Path) -> dict[str, Any]:
    """MANIFEST.json, checked against its own sha256; BadInputError naming it otherwise."""
    path = Path(bundle) / MANIFEST_JSON
    if not Path(bundle).is_dir():
        raise BadInputError(f"bundle {bundle} does not exist")
    if not path.is_file() or path.is_symlink():
        raise BadInputError(f"{bundle} is not a k2repro bundle: no {MANIFEST_JSON}")
    raw = path.read_bytes()
    try:
        body = json.loads(raw)
        claimed = body["self_sha256"]
        files = body["files"]
        assert isinstance(files, dict) and isinstance(claimed, str)
        assert all(isinstance(v, dict) for v in files.values())
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError, RecursionError):
        raise BadInputError(f"{path}: corrupt (not the JSON a bundle manifest holds)") from None
    text = raw.decode()
    zeroed = text.replace(f'"self_sha256": "{claimed}"', f'"self_sha256": "{SELF_ZERO}"', 1)
    if zeroed == text or hashlib.sha256(zeroed.encode()).hexdigest() != claimed:
        raise BadInputError(f"{path}: changed (its sha256 differs from the one it records)")
    if body.get("format") != BUNDLE_FORMAT:
        raise BadInputError(f"{path}: format {body.get('format')!r}, this k2repro reads {BUNDLE_FORMAT}")
    return body


__all__ = ["BUNDLE_FORMAT", "BUNDLE_VERSION", "BUNDLE_JSON", "MANIFEST_JSON", "SIGNATURE", "SELF_ZERO",
           "file_entries", "manifest_bytes", "write_manifest", "read_manifest"]
