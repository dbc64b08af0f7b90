"""Names on disk that several layers read or write: checkpoint folders, the audit store's
marker and meta files, and where the store is when nobody says."""

from __future__ import annotations

import os
from pathlib import Path

#: checkpoint folders inside `ckpt.dir/<run_id>/` (the trainer writes, replay/export/bundles read)
CKPT_PREFIX = "step_"

#: the store: `<root>/_k2repro/` holds the schema stubs; each run folder has a `_run.json` marker
META_DIR = "_k2repro"
STUB_DIR = f"{META_DIR}/schema"
STUB_NAME = "_empty.parquet"
DUCKDB_FILE = "k2repro.duckdb"
RUN_MARKER = "_run.json"
DEFAULT_STORE = "runs"


def step_dirname(step: int) -> str:
    """`step_00000200`: sorts by step as text."""
    return f"{CKPT_PREFIX}{step:08d}"


def step_of_dirname(name: str) -> int | None:
    """The step of a checkpoint folder name, None for anything else."""
    if not name.startswith(CKPT_PREFIX):
        return None
    try:
        return int(name[len(CKPT_PREFIX):])
    except ValueError:
        return None


def inside_dir(path: Path, folder: Path) -> bool:
    """Whether `path` lies in `folder`, both resolved (symlinks followed): what gc may delete,
    what eval may write and what a bundle may ship are decided by this one test."""
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def default_store() -> Path:
    """`$K2REPRO_STORE`, else `runs` (relative to the working directory). Resolved when a
    command runs, never when a parser is built, so a test or a script that sets the variable
    later still gets it."""
    return Path(os.environ.get("K2REPRO_STORE") or DEFAULT_STORE)


__all__ = ["CKPT_PREFIX", "META_DIR", "STUB_DIR", "STUB_NAME", "DUCKDB_FILE", "RUN_MARKER",
           "DEFAULT_STORE", "step_dirname", "step_of_dirname", "inside_dir", "default_store"]
