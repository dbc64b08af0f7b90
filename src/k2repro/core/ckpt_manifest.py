"""Checkpoint manifests: the torch-free half of `k2repro.train.checkpoint`, so that
`k2repro verify-checkpoint`, `verify-store`, replay planning and export check checkpoints
without importing torch (and without the store's code importing the trainer's)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from k2repro.core.hashing import sha256_file
from k2repro.core.layout import step_of_dirname
from k2repro.errors import CheckpointError

FORMAT = "k2repro-ckpt-v1"
MANIFEST = "manifest.json"


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check that every file of the manifest is there with its sha256; raise CheckpointError
    naming the first file that is missing or changed. Returns the manifest."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not mpath.exists():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST} (incomplete or not a k2repro checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):  # ValueError: bad JSON, or bytes that are not UTF-8
        raise CheckpointError(f"checkpoint manifest {mpath} is corrupt") from None
    for name, info in sorted(files.items()):
        f = path / name
        if not f.exists():
            raise CheckpointError(f"checkpoint file {f} is missing")
        if f.stat().st_size != int(info["bytes"]) or sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {f} is corrupt (sha256 differs from the manifest)")
    return manifest


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (final names only) in a run's checkpoint folder, oldest first."""
    if not directory.is_dir():
        return []
    out = []
    for d in directory.iterdir():
        step = step_of_dirname(d.name)
        if step is not None and d.is_dir() and (d / MANIFEST).exists():
            out.append((step, d))
    return sorted(out)
