"""The bundle's ed25519 signature, MANIFEST.sig: checksums prove integrity (anyone can
recompute them), only a signature proves origin. Export signs MANIFEST.json's bytes with a
private key (`--sign`); verify and import check it against the publisher's public key
(`--key`). MANIFEST.json holds the sha256 of every other file, so the signature covers the
whole bundle (docs/release-bundle.md, "Trust model")."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from k2repro.bundle.manifest import MANIFEST_JSON, SIGNATURE
from k2repro.errors import BadInputError


def key_fingerprint(raw_public: bytes) -> str:
    """A short name for a public key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(raw_public).hexdigest()[:16]


def _load_key(path: str | Path, flag: str, loaders: tuple[Callable[[bytes], Any], ...], want: type,
              what: str) -> Any:
    """The key in file `path` that one of `loaders` reads and that is a `want`; BadInputError
    naming the option and the file otherwise."""
    from cryptography.exceptions import UnsupportedAlgorithm

    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise BadInputError(f"{flag} {p}: cannot read the key ({exc.strerror})") from None
    key = None
    for loader in loaders:
        try:
            key = loader(raw)
            break
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
    if not isinstance(key, want):
        raise BadInputError(f"{flag} {p}: not {what}")
    return key


def load_private_key(path: str | Path) -> Any:
    """An unencrypted ed25519 private key (PEM, PKCS#8 or OpenSSH: `openssl genpkey -algorithm
    ed25519`, `ssh-keygen -t ed25519 -N ''`); BadInputError naming the file otherwise."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return _load_key(path, "--sign", (lambda r: ser.load_pem_private_key(r, password=None),
                                      lambda r: ser.load_ssh_private_key(r, password=None)),
                     Ed25519PrivateKey, "an unencrypted ed25519 private key (PEM or OpenSSH)")


def load_public_key(path: str | Path) -> Any:
    """An ed25519 public key (PEM `-----BEGIN PUBLIC KEY-----` or an OpenSSH `ssh-ed25519 ...`
    line); BadInputError naming the file otherwise."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return _load_key(path, "--key", (ser.load_pem_public_key, ser.load_ssh_public_key), Ed25519PublicKey,
                     "an ed25519 public key (PEM or OpenSSH)")


def sign_bundle(dest: Path, key: Any) -> dict[str, str]:
    """Write MANIFEST.sig: the ed25519 signature of MANIFEST.json's bytes. MANIFEST.json holds
    the sha256 of every other file, so the signature covers the whole bundle."""
    from cryptography.hazmat.primitives import serialization

    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    sig = key.sign((dest / MANIFEST_JSON).read_bytes())
    body = {"algorithm": "ed25519", "signed_file": MANIFEST_JSON, "public_key": pub.hex(),
            "fingerprint": key_fingerprint(pub), "signature": sig.hex()}
    (dest / SIGNATURE).write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    return body


def check_signature(bundle: Path, key: Any) -> dict[str, Any]:
    """MANIFEST.sig against `key` (an Ed25519PublicKey). Returns {ok, problem, fingerprint}:
    a missing, malformed or foreign signature is a problem, never an exception."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    want = key_fingerprint(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    out: dict[str, Any] = {"ok": False, "key": want, "signed_by": None, "problem": None}
    sig_path = bundle / SIGNATURE
    if not sig_path.is_file() or sig_path.is_symlink():
        out["problem"] = "missing: the bundle is not signed"
        return out
    try:
        body = json.loads(sig_path.read_bytes())
        sig = bytes.fromhex(body["signature"])
        out["signed_by"] = body.get("fingerprint")
        assert body.get("algorithm") == "ed25519"
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError):
        out["problem"] = "corrupt (not the JSON an ed25519 signature holds)"
        return out
    try:
        key.verify(sig, (bundle / MANIFEST_JSON).read_bytes())
    except InvalidSignature:
        out["problem"] = (f"does not verify with key {want}"
                          + (f" (it names key {out['signed_by']})" if out["signed_by"] not in (None, want) else "")
                          + ": signed by someone else, or MANIFEST.json changed since")
        return out
    out["ok"] = True
    return out


__all__ = ["key_fingerprint", "load_private_key", "load_public_key", "sign_bundle", "check_signature"]
