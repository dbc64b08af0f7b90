"""`verify_bundle`: is this folder exactly what its publisher exported? A bundle is untrusted
input (docs/release-bundle.md, "Trust model"): MANIFEST.json's own checksum first, then every
listed file's size and sha256, no file missing or unlisted, nothing a symbolic link; with a
public key, MANIFEST.sig too (checksums prove integrity, anyone can recompute them; only the
signature proves origin). Each problem names its file. Import runs this before it reads
anything else, and uses the path rules here (`safe_relpath`, `is_linked`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from k2repro.bundle.manifest import MANIFEST_JSON, SIGNATURE, read_manifest
from k2repro.bundle.signing import check_signature, load_public_key
from k2repro.errors import BadInputError


def safe_relpath(rel: Any) -> bool:
    """A path a bundle may name: relative, POSIX, no `..`, no empty or dot parts."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel or rel.startswith("/"):
        return False
    parts = rel.split("/")
    return all(p not in ("", ".", "..") for p in parts) and not (len(rel) > 1 and rel[1] == ":")


def is_linked(bundle: Path, rel: str) -> bool:
    """Whether `rel` or any folder on the way to it is a symbolic link (which could point
    anywhere: a bundle holds plain files and folders only)."""
    p = bundle
    for part in rel.split("/"):
        p = p / part
        if p.is_symlink():
            return True
    return False


def _check_listed(bundle: Path, files: dict[str, Any]) -> tuple[list[dict[str, str]], int]:
    """Every file MANIFEST.json lists: a plain relative path, no link, there, of its size and
    sha256. Returns (problems, bytes checked)."""
    from k2repro.core.hashing import sha256_file

    problems: list[dict[str, str]] = []
    total = 0
    for rel, info in sorted(files.items()):
        if not safe_relpath(rel):
            problems.append({"file": rel, "problem": "not a plain relative path inside the bundle"})
            continue
        f = bundle / rel
        if is_linked(bundle, rel):
            problems.append({"file": rel, "problem": "a symbolic link (a bundle holds plain files only)"})
            continue
        if not f.is_file():
            problems.append({"file": rel, "problem": "missing"})
            continue
        size = f.stat().st_size
        total += size
        try:
            want_bytes, want_sha = int(info["bytes"]), str(info["sha256"])
        except (KeyError, TypeError, ValueError):
            problems.append({"file": rel, "problem": "its manifest entry is corrupt"})
            continue
        if size != want_bytes:
            problems.append({"file": rel, "problem": f"size {size} bytes, the manifest says {info['bytes']}"})
        elif sha256_file(f) != want_sha:
            problems.append({"file": rel, "problem": "sha256 differs from the manifest"})
    return problems, total


def _check_unlisted(bundle: Path, files: dict[str, Any]) -> list[dict[str, str]]:
    """Every link, and every file MANIFEST.json does not list (but itself and MANIFEST.sig)."""
    problems: list[dict[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(bundle):  # never follows a link
        here = Path(dirpath)
        for name in sorted(dirnames + filenames):
            f = here / name
            rel = f.relative_to(bundle).as_posix()
            if f.is_symlink():
                if rel not in files:
                    problems.append({"file": rel, "problem": "a symbolic link (a bundle holds plain files only)"})
            elif name in filenames and rel not in files and rel not in (MANIFEST_JSON, SIGNATURE):
                problems.append({"file": rel, "problem": "not listed in the manifest"})
    return problems


def _signature_state(bundle: Path, pub: Any) -> dict[str, Any] | None:
    """The signature checked against `pub`; without a key, only who it names (not checked)."""
    if pub is not None:
        return check_signature(bundle, pub)
    if not (bundle / SIGNATURE).is_file():
        return None
    try:
        return {"ok": None, "signed_by": json.loads((bundle / SIGNATURE).read_bytes()).get("fingerprint"),
                "problem": "not checked: pass --key with the publisher's public key"}
    except (ValueError, AttributeError, RecursionError):
        return {"ok": None, "signed_by": None, "problem": "not checked (and not readable)"}


def verify_bundle(bundle: str | Path, key: str | Path | Any | None = None) -> dict[str, Any]:
    """Every file against MANIFEST.json, and with `key` (a public key file or key) the
    signature too. Returns {ok, problems: [{file, problem}], files, bytes, signature}.
    Raises BadInputError only when the folder is not a bundle at all (or the key is bad).

    Integrity only proves the files match MANIFEST.json, which anyone can recompute; origin
    needs the signature (docs/release-bundle.md)."""
    bundle = Path(bundle)
    pub = load_public_key(key) if isinstance(key, str | Path) else key
    try:
        body = read_manifest(bundle)
    except BadInputError as exc:
        if not bundle.is_dir() or not (bundle / MANIFEST_JSON).is_file():
            raise
        return {"bundle": str(bundle), "ok": False, "files": 0, "bytes": 0,
                "problems": [{"file": MANIFEST_JSON, "problem": str(exc).split(": ", 1)[-1]}]}
    files = body["files"]
    problems, total = _check_listed(bundle, files)
    problems += _check_unlisted(bundle, files)
    signature = _signature_state(bundle, pub)
    if pub is not None and not signature["ok"]:
        problems.append({"file": SIGNATURE, "problem": signature["problem"]})
    return {"bundle": str(bundle), "ok": not problems, "problems": problems, "files": len(files), "bytes": total,
            "run": body.get("run"), "runs": body.get("runs", []), "signature": signature}


__all__ = ["verify_bundle", "safe_relpath", "is_linked"]
