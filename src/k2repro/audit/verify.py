"""Integrity of a store's segments, beyond what queries notice.

DuckDB reads a segment whose data page has a flipped byte without complaint (it checks no page
checksum) and a deleted segment just takes its rows with it. Two checks close that gap:

- Every segment is read whole by Arrow with page checksum verification. The sink writes a
  CRC32 per data page (`write_page_checksum`), so a flipped byte in a page, a torn or
  truncated file, or a broken footer is named; the footer's min/max statistics (what DuckDB
  prunes by) are checked against the values read. (Segments written before the checksums existed
  are still read whole: structural damage is found, a flip inside a page is not.)
- Every segment's sha256 and size, recorded by its writer before it renamed the segment into
  place (`_manifest/`, audit/manifest.py), must match: this covers every byte (footers,
  dictionary pages, bytes a page CRC does not cover), truncation, and a segment deleted
  whole, whatever its name. Runs written before the manifest existed are reported as
  "no checksums recorded", not as fine and not as damaged.
- Segment names carry each rank's write sequence (`r<rank>-<seq>.parquet`, one counter per
  rank over all tables of a run, the open segment rewritten under its own name), so the
  numbers a rank used must run 0, 1, 2, ... without a hole: a missing number is a deleted
  segment. A rank's `close()` records its last number in its heartbeat file, so a deleted
  newest segment is found too; for a rank that never closed (SIGKILL) it is not, nor are a
  rank's numbers after `gc --compact` renamed them (both reported as not checked).
- Checkpoints kept inside the run folder (`<run>/checkpoints/step_*/`, where the trainer puts
  them unless `ckpt.dir` names another place) are store-resident too: every file of each one is
  checked against the sha256 and size in its own manifest.json, and that manifest against the
  `manifest_sha256` the `checkpoints` table recorded for it. A checkpoint the table records but
  that is gone is not a problem (keep_last and gc prune them; the row stays as history).

No torch here; the command is `k2repro verify-store`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from k2repro.audit import schema as S
from k2repro.audit.manifest import COMPLETE_MARK

SEQ_NAME = re.compile(r"^r(\d+)-(\d{8})\.parquet$")


@dataclass
class RunCheck:
    run_dir: Path
    segments: int = 0
    checkpoints: int = 0  # checkpoint folders inside the run folder, every file verified
    problems: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # what could not be checked, and why

    def as_dict(self, root: Path) -> dict[str, Any]:
        return {"run_id": self.run_dir.name, "path": str(self.run_dir.relative_to(root)),
                "segments": self.segments, "checkpoints": self.checkpoints, "ok": not self.problems, "problems": self.problems,
                "unchecked": self.unchecked}


def read_segment(path: Path) -> None:
    """Read every page of one segment, verifying page checksums where it has them, and check
    the footer's min/max statistics against the values read: DuckDB skips files and row
    groups by those statistics, so a damaged one silently drops rows from filtered queries."""
    import math

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path, page_checksum_verification=True)
    tbl = pf.read()
    md = pf.metadata
    start = 0
    for rg in range(md.num_row_groups):
        group = md.row_group(rg)
        for ci in range(group.num_columns):
            chunk = group.column(ci)
            st = chunk.statistics
            name = chunk.path_in_schema
            if st is None or not st.has_min_max or name not in tbl.column_names:
                continue
            values = tbl.column(name).slice(start, group.num_rows)
            mm = pc.min_max(values)
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            if any(isinstance(v, float) and math.isnan(v) for v in (lo, hi)):
                continue
            if (lo, hi) != (st.min, st.max):
                raise ValueError(f"column {name}: footer statistics min/max {st.min!r}/{st.max!r} "
                                 f"disagree with the data ({lo!r}/{hi!r})")
        start += group.num_rows


def _check_manifest(run_dir: Path, on_disk: dict[str, Path], out: RunCheck) -> None:
    """Every segment against the checksums its writers recorded (audit/manifest.py): a
    changed byte, a truncated or extended file, a segment recorded but gone, a segment no
    writer recorded. Run folders from before the manifest are reported as not checked."""
    from k2repro.audit.manifest import MANIFEST_DIR, file_digest, load

    entries = load(run_dir) or {}
    complete = (run_dir / MANIFEST_DIR / COMPLETE_MARK).exists()
    unrecorded = 0
    named = {p.split(": ", 1)[0] for p in out.problems}  # one finding per file
    for rel, path in sorted(on_disk.items()):
        if rel in named:
            continue
        e = entries.get(rel)
        if e is None or not e.digests:
            if complete:
                out.problems.append(f"{rel}: no checksum recorded (not written by k2repro's writer, or "
                                    f"its manifest line is gone)")
            else:
                unrecorded += 1
            continue
        try:
            sha, size = file_digest(path)
        except OSError as exc:
            out.problems.append(f"{rel}: unreadable: {exc.strerror or exc}")
            continue
        if (sha, size) in e.digests:
            continue
        sizes = sorted({s for _, s in e.digests})
        if size not in sizes:
            out.problems.append(f"{rel}: {size} bytes, recorded {' or '.join(map(str, sizes))} "
                                f"({'truncated' if size < min(sizes) else 'changed size'})")
        else:
            out.problems.append(f"{rel}: sha256 {sha[:16]}... differs from the recorded checksum "
                                f"(a changed byte)")
    if unrecorded:
        out.unchecked.append(f"no checksums recorded for {unrecorded} segment(s) (written before k2repro "
                             f"recorded segment checksums)")
    for rel, e in sorted(entries.items()):
        if e.removed or not e.digests or rel in on_disk:
            continue
        table, _, name = rel.partition("/")
        if (run_dir / table / f".{name}.tmp").exists():
            out.unchecked.append(f"{rel}: recorded, not renamed into place (its writer died mid-write)")
        elif (run_dir / rel).is_dir():
            continue  # named below as a folder
        else:
            out.problems.append(f"{rel}: missing (its checksum is recorded, the file is gone)")


def check_run(run_dir: Path) -> RunCheck:
    """Read every segment of one run folder, check it against its recorded checksum, and check
    each rank's sequence for holes."""
    out = RunCheck(run_dir)
    seqs: dict[int, set[int]] = {}
    renamed: set[str] = set()
    on_disk: dict[str, Path] = {}
    for hidden in sorted(run_dir.glob(".*.old-*")) + sorted(run_dir.glob(".*.swap-*")):
        table = hidden.name[1:].split(".", 1)[0]
        if hidden.is_dir() and table in S.TABLES and not (run_dir / table).is_dir():
            out.problems.append(f"{table}/: missing, its segments sit in the hidden folder {hidden.name} "
                                f"(an interrupted compaction: `k2repro gc --compact` restores it)")
    tables = sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name in S.TABLES)
    for tdir in tables:
        for f in sorted(tdir.iterdir()):
            if not f.name.endswith(".parquet") or f.name.startswith("."):
                continue
            if not f.is_file():
                out.problems.append(f"{tdir.name}/{f.name}: not a segment file "
                                    f"({'a folder' if f.is_dir() else 'not a regular file'}), its rows "
                                    f"are not read")
                continue
            out.segments += 1
            on_disk[f"{tdir.name}/{f.name}"] = f
            try:
                read_segment(f)
            except Exception as exc:  # noqa: BLE001 - any reader failure is the finding
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                out.problems.append(f"{tdir.name}/{f.name}: unreadable: {msg}")
            m = SEQ_NAME.match(f.name)
            if m:
                seqs.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
            elif f.name.startswith("r") and "-" in f.name:
                renamed.add(f.name.split("-", 1)[0])  # compacted: r0-c<time>...
    _check_manifest(run_dir, on_disk, out)
    _check_checkpoints(run_dir, out)
    last = _last_seqs(run_dir)
    for rank in sorted(set(seqs) | set(last)):
        used = seqs.get(rank, set())
        if f"r{rank}" in renamed:
            out.unchecked.append(f"rank {rank}: segment sequence after compaction")
            continue
        top = max(used | {last.get(rank, -1)})
        if rank not in last:
            out.unchecked.append(f"rank {rank}: its newest segment (no recorded count: the rank was killed "
                                 "before close(), or an older k2repro wrote it)")
        holes = sorted(set(range(top + 1)) - used)
        for h in holes:
            if any(f"/r{rank}-{h:08d}.parquet: " in p for p in out.problems):
                continue  # already named with its table by the manifest check
            out.problems.append(f"rank {rank}: segment r{rank}-{h:08d}.parquet is missing "
                                f"(its numbers run to {top} with this one absent)")
    if 0 in seqs and not (run_dir / "runs").is_dir():
        out.problems.append("runs/: missing (the run's identity row)")
    return out


def _recorded_checkpoints(run_dir: Path) -> dict[str, str]:
    """checkpoint folder name -> the manifest sha256 the `checkpoints` table recorded for it
    (segments that cannot be read are already named by the segment checks)."""
    import pyarrow.parquet as pq

    out: dict[str, str] = {}
    for f in sorted((run_dir / "checkpoints").glob("*.parquet")):
        try:
            rows = pq.read_table(f, columns=["path", "manifest_sha256"]).to_pylist()
        except Exception:  # noqa: BLE001, S112 - named by read_segment already
            continue
        for r in rows:
            if r["path"] and r["manifest_sha256"]:
                out[Path(r["path"]).name] = r["manifest_sha256"]
    return out


def _check_checkpoints(run_dir: Path, out: RunCheck) -> None:
    """Every byte of the checkpoints under the run folder: each file against its checkpoint's
    manifest (core/ckpt_manifest.py, no torch), each manifest against the table's record. Without
    this, a flipped byte in a checkpoint inside the store passed verify-store (only a resume
    or `verify-checkpoint` found it). Temporary `.step_*` folders (a save killed before its
    rename) are no checkpoint: they are never listed nor resumed from."""
    from k2repro.core.ckpt_manifest import MANIFEST, verify_checkpoint
    from k2repro.core.hashing import sha256_file
    from k2repro.errors import CheckpointError

    cdir = run_dir / "checkpoints"
    if not cdir.is_dir():
        return
    recorded = None
    for d in sorted(cdir.glob("step_*")):
        if not d.is_dir():
            continue
        rel = f"checkpoints/{d.name}"
        try:
            verify_checkpoint(d)
        except CheckpointError as exc:
            out.problems.append(f"{rel}: {str(exc).replace(str(d), d.name)}")
            continue
        out.checkpoints += 1
        if recorded is None:
            recorded = _recorded_checkpoints(run_dir)
        want = recorded.get(d.name)
        if want and sha256_file(d / MANIFEST) != want:
            out.problems.append(f"{rel}/{MANIFEST}: sha256 differs from the one the checkpoints table "
                                f"recorded (the checkpoint was changed and its manifest rewritten)")


def _last_seqs(run_dir: Path) -> dict[int, int]:
    """rank -> the last segment number it used, from the heartbeat file its close() rewrote."""
    import json

    from k2repro.audit.views import HEARTBEAT_DIR

    out: dict[int, int] = {}
    for f in sorted((run_dir / HEARTBEAT_DIR).glob("r*.json")):
        try:
            hb = json.loads(f.read_text())
            out[int(hb["rank"])] = int(hb["last_seq"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def verify_store(root: str | Path, run_ids: list[str] | None = None) -> list[RunCheck]:
    """Check the runs of a store (all, or those named). Raises BadInputError for a store
    that does not exist or a run id it does not hold."""
    from k2repro.audit.swaps import recover_swaps
    from k2repro.audit.versions import run_markers
    from k2repro.errors import BadInputError

    root = Path(root)
    if not root.is_dir():
        raise BadInputError(f"store {root} does not exist")
    recover_swaps(root)  # an interrupted compaction is finished or rolled back first
    dirs = run_markers(root)
    if run_ids:
        by_id = {d.name: d for d in dirs}
        missing = [r for r in run_ids if r not in by_id]
        if missing:
            raise BadInputError(f"run {missing[0]!r} is not in store {root}")
        dirs = [by_id[r] for r in run_ids]
    return [check_run(d) for d in dirs]


__all__ = ["RunCheck", "check_run", "read_segment", "verify_store"]
