"""A checksum per segment, recorded when the segment is written: what `verify-store` checks.

Parquet's page CRCs do not cover everything (footers, dictionary pages of some writers, a
segment deleted whole), so a verification that says OK could not mean "every byte checked".
Each run folder therefore keeps `_manifest/<writer>.tsv`: one append-only file per writer
(`r0`, `r1`, ... for a sink's ranks, `x` for `append_table`, `compact` for compaction and
migration, ...), so that writers never share a file they rewrite. A line is

    <table>/<segment name> TAB <sha256 hex> TAB <bytes>      a segment written (or rewritten)
    <table>/<segment name> TAB - TAB -1                      a segment removed on purpose

The writer appends the line (one `write`, with `O_APPEND`) *before* it renames the segment
into place, so every segment a reader can see has a line; a writer killed between the two
leaves a line without its file, next to the `.<name>.tmp` it was about to rename (verify
reports that as in flight, not as damage). A sink's open segment is rewritten under its own
name, so a path may have several lines: the file on disk must match one of them (the newest
normally; an older one when the newest rewrite never landed).

Not a schema change: tables, columns and bundle contents are unchanged, and a run folder
without `_manifest/` (written before this existed) is read and verified as before, its
segments reported as "no checksum recorded". See docs/audit-store.md.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_DIR = "_manifest"
#: Written when a run folder's first segment is recorded: from then on every segment of the
#: folder has a line, so one without is a finding (a planted or copied-in file), not an old run.
COMPLETE_MARK = "COMPLETE"
_REMOVED = "-"


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of one file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def writer_of(segment_name: str) -> str:
    """The writer prefix of a segment name (`r0-00000003.parquet` -> `r0`), a safe file name."""
    w = segment_name.split("-", 1)[0] if "-" in segment_name else "s"
    return "".join(c if c.isalnum() or c in "_." else "_" for c in w).lstrip(".") or "s"


def record(run_dir: Path, writer: str, entries: Iterable[tuple[str, str | None, int]],
           fsync: bool = False) -> None:
    """Append lines to `<run_dir>/_manifest/<writer>.tsv`: (relative path, sha256 or None for
    a removal, bytes). One `write` call per batch with O_APPEND, so concurrent writers of the
    same prefix (several `append_table` processes) never tear each other's lines."""
    lines = []
    for rel, sha, size in entries:
        if "\t" in rel or "\n" in rel:
            raise ValueError(f"segment path {rel!r} has a tab or newline")
        lines.append(f"{rel}\t{sha or _REMOVED}\t{size if sha else -1}\n")
    if not lines:
        return
    run_dir = Path(run_dir)
    d = run_dir / MANIFEST_DIR
    if not d.is_dir():
        fresh = not any(f.name.endswith(".parquet") and not f.name.startswith(".")
                        for t in run_dir.iterdir() if t.is_dir() and not t.name.startswith(".")
                        for f in t.iterdir()) if run_dir.is_dir() else True
        d.mkdir(parents=True, exist_ok=True)
        if fresh:
            (d / COMPLETE_MARK).touch()
    fd = os.open(d / f"{writer}.tsv", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, "".join(lines).encode())
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def record_file(run_dir: Path, rel: str, path: Path, writer: str | None = None, fsync: bool = False) -> None:
    """Record one segment's checksum (the file at `path`, to be found at `run_dir/rel`)."""
    sha, size = file_digest(path)
    record(run_dir, writer or writer_of(Path(rel).name), [(rel, sha, size)], fsync=fsync)


@dataclass
class Entry:
    """What the manifest says about one path: every checksum recorded, and whether the last
    line removed it."""

    digests: list[tuple[str, int]] = field(default_factory=list)
    removed: bool = False


def load(run_dir: Path) -> dict[str, Entry] | None:
    """path -> Entry from every writer's file; None when the run folder has no manifest. Lines
    are applied in file order per writer; a removal is final, whichever writer's file holds it
    (removed names are never reused: compaction names merged segments afresh). A torn last line (a crash mid-write) is
    ignored."""
    d = Path(run_dir) / MANIFEST_DIR
    if not d.is_dir():
        return None
    out: dict[str, Entry] = {}
    for f in sorted(d.glob("*.tsv")):
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        for line in text.split("\n"):
            parts = line.split("\t")
            if len(parts) != 3:
                continue
            rel, sha, size = parts
            e = out.setdefault(rel, Entry())
            if sha == _REMOVED:
                e.removed = True
                continue
            try:
                e.digests.append((sha, int(size)))
            except ValueError:
                continue
    return out


__all__ = ["COMPLETE_MARK", "MANIFEST_DIR", "Entry", "file_digest", "load", "record", "record_file", "writer_of"]
