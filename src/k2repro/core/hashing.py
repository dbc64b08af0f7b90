"""Hashes that outlive a release: stored config hashes are compared by replay, diff and
bundles, so the canonical form below must never change."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (bounded memory for shards and checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_hash(obj: Any) -> str:
    """First 16 hex of the sha256 of `obj` as canonical JSON (sorted keys, `str()` for what
    JSON cannot hold): the config hash of the trainer (`config.load.config_hash`) and of the
    audit API (`audit.api.config_hash_of`) both end here."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


__all__ = ["sha256_file", "canonical_hash"]
