"""The parsed run (`ImportedRun`): what every parser produces and what the rest of an import
consumes, with the helpers every parser uses to make one (the one error shape, the content
hash that identifies a source).

Kept apart from the parsers and from the store side so that a parser depends only on this
small contract, and the tables and the transaction depend only on it, not on any parser.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from k2repro.errors import BadInputError


@dataclass
class ImportedRun:
    """One run as an importer parsed it, before it becomes store tables.

    `steps` holds the step numbers (int64, strictly increasing, from 1) and `columns` the
    `steps` columns aligned with them (Arrow arrays: NULL where the source has no value, NaN
    where it logged NaN). `metrics` holds every other series as (steps, values). `times` are
    epoch seconds per step where the source has them."""

    kind: str
    path: str
    content_sha256: str
    source_run: str | None = None
    steps: Any = None                               # pa.Array int64
    columns: dict[str, Any] = field(default_factory=dict)   # steps column -> pa.Array
    metrics: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # name -> (steps, values)
    evals: list[tuple[int, str, float]] = field(default_factory=list)  # (step, metric, value)
    hparams: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    started_at: float | None = None
    ended_at: float | None = None
    world_size: int | None = None
    config: dict[str, Any] | None = None            # what the source holds as its config
    line_of: Any = None                             # row -> source line, for error messages

    def event(self, kind: str, step: int | None = None, severity: str = "info",
              time_s: float | None = None, **detail: Any) -> None:
        self.events.append({"kind": kind, "step": step, "severity": severity, "time": time_s,
                            "detail": detail})

    @property
    def n_steps(self) -> int:
        return 0 if self.steps is None else len(self.steps)


def bad(path: str | os.PathLike, line: int | None, msg: str) -> BadInputError:
    """The one error an import raises: `<file>:<line>: <what>`."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return BadInputError(f"{where}: {msg}")


def sha256_path(path: Path, pattern_files: Iterable[Path] | None = None) -> str:
    """sha256 of a file, or of a folder's files (relative names and bytes, sorted). Not
    `core.hashing.sha256_file`: each file's bytes are followed by a NUL, and the digest is
    stored (`import.content_sha256`, and in `import.identity`), so it must stay as it is."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(pattern_files or ())
    for f in files:
        if not path.is_file():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def sha256_background(path: Path) -> Any:
    """Hash a file in a thread while the caller parses it (hashlib and DuckDB both release the
    GIL); `.result()` gives the hex digest."""
    from concurrent.futures import ThreadPoolExecutor

    ex = ThreadPoolExecutor(max_workers=1)
    fut = ex.submit(sha256_path, path)
    ex.shutdown(wait=False)
    return fut
