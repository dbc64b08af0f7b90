"""Outputs that appear whole or not at all: written under a temporary dot name in the same
folder, then renamed. A reader (or a DVC stage after a kill) sees the old output or the new
one, never half of one."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder and one rename."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text; creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_dir(out: str | os.PathLike, *, replace: bool = True, tmp_prefix: str | None = None) -> Iterator[Path]:
    """Yield a fresh temporary sibling folder of `out`; on success it becomes `out` in one
    rename, on any error it is removed and `out` is left as it was.

    `replace=True` (data stages: a rerun replaces its output): an existing `out` is moved aside
    first and removed after. `replace=False` (a run, a bundle, an import: never overwritten):
    FileExistsError if `out` exists, before the work or when it is done. `tmp_prefix` names the
    temporary folder (a dot name, so the store's readers skip it; default `.<name>.tmp-`)."""
    out = Path(out)
    if not replace and out.exists():
        raise FileExistsError(f"{out} already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix or f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the output is an ordinary folder
    try:
        yield tmp
        if not replace:
            if out.exists():  # someone else finished first
                raise FileExistsError(f"{out} already exists")
            os.rename(tmp, out)
            return
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_dir"]
