"""Compaction: merge a finished run's small segments into one per table and writer, safely
while other processes query the store.

Why a folder swap. Readers glob `<run>/<table>/*.parquet`, so no sequence of per-file
renames is safe: a reader that lists the folder between "merged file renamed in" and "small
files deleted" counts those rows twice, and one that lists between "deleted" and "renamed in"
misses them. Instead the new state of a table folder is built beside it (`.<table>.swap-*`, a
dot folder no view matches: the merged segment plus hard links of every file it leaves
alone) and the two folders are exchanged in one step with Linux `renameat2(RENAME_EXCHANGE)`.
A reader's listing then sees the old set of files or the new one, never a mix.

What a reader can still meet: it listed the old folder, and opens a file after the swap.
Merged segments get names that were never used before (`<writer>-c<time><random>.parquet`),
so such an open fails ("No such file") instead of reading new content under an old name;
`Store.execute` retries the query, and the retry lists the new folder. Results are always
those of the old files or of the new ones, which hold the same rows. Plain `duckdb` users of
the store's DuckDB file see that error instead and run the query again.

Never touched: a running run (the sink rewrites its open segment in place), a table folder
with a segment in flight (`.*.tmp`: its writer's rename would miss after the swap).
Segments of different schema versions are not merged together (see audit.versions). The swap
journal and the recovery of an interrupted swap are in audit.swaps (the query side runs it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from k2repro.audit import schema as S
from k2repro.audit.storemeta import COMPRESSION
from k2repro.audit.swaps import finish_swap, segment_files, store_root_of, write_journal
from k2repro.audit.versions import segment_version
from k2repro.errors import BadInputError

#: Segments smaller than this are merged; larger ones are left alone.
SMALL_BYTES = 16 << 20
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class TableBusy(RuntimeError):
    """A writer has a segment in flight in this table folder."""


def _exchange(a: Path, b: Path) -> None:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"renameat2(RENAME_EXCHANGE) {a} <-> {b}: {os.strerror(e)}")


def exchange_supported(directory: Path) -> bool:
    """Can this filesystem swap two folders atomically?"""
    a = Path(directory) / f".k2x-{secrets.token_hex(4)}"
    b = Path(directory) / f".k2x-{secrets.token_hex(4)}"
    try:
        a.mkdir()
        b.mkdir()
        (a / "m").touch()
        _exchange(a, b)
        return (b / "m").exists()
    except OSError:
        return False
    finally:
        shutil.rmtree(a, ignore_errors=True)
        shutil.rmtree(b, ignore_errors=True)


def new_segment_name(old_name: str, tag: str = "c") -> str:
    """A segment name never used before, keeping the writer prefix (`r0`, `x`, ...)."""
    writer = old_name.split("-", 1)[0] if "-" in old_name else "s"
    return f"{writer}-{tag}{time.time_ns():020d}{secrets.token_hex(4)}.parquet"


def _in_flight(table_dir: Path) -> list[str]:
    return [f.name for f in table_dir.iterdir() if f.name.startswith(".") and f.name.endswith(".tmp")]


def _carry(src: Path, dst: Path, done: set[str]) -> None:
    """Hard-link into `dst` every entry of `src` that `build` did not account for: segments
    appended meanwhile, and other content. The `checkpoints` table folder is also where the
    trainer keeps its checkpoint folders (`step_*/`): those are rebuilt as folders of hard
    links, so a process reading a checkpoint by path finds the same files after the swap."""
    for e in src.iterdir():
        if e.name in done or e.name.startswith(".") or (dst / e.name).exists():
            continue
        if e.is_dir() and not e.is_symlink():
            shutil.copytree(e, dst / e.name, copy_function=os.link, symlinks=True)
        else:
            os.link(e, dst / e.name, follow_symlinks=False)


#: Fault injection (tests, the fault campaign): `<point>:<seconds>` sleeps at that point of a
#: folder swap (`journaled`, `renamed-old`, `renamed-new`, `exchanged`) so a test can SIGKILL the
#: process there. Unset in normal use.
FAULT_ENV = "K2REPRO_SWAP_FAULT"


def _fault(point: str) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec.partition(":")[0] == point:
        print(f"k2repro: swap fault point {point} reached", file=sys.stderr, flush=True)
        time.sleep(float(spec.partition(":")[2] or 60))


def _manifest_changes(table_dir: Path, new: Path) -> list[tuple[str, str | None, int]]:
    """Manifest lines for an exchange: a checksum for every segment of the new folder that the
    old one lacks, a removal for every old segment the new folder drops."""
    from k2repro.audit.manifest import file_digest

    old_names = {f.name for f in segment_files(table_dir)}
    new_names = {f.name for f in segment_files(new)}
    out: list[tuple[str, str | None, int]] = []
    for name in sorted(new_names - old_names):
        sha, size = file_digest(new / name)
        out.append((f"{table_dir.name}/{name}", sha, size))
    out += [(f"{table_dir.name}/{n}", None, -1) for n in sorted(old_names - new_names)]
    return out


def swap_table_dir(table_dir: Path, build: Callable[[Path], list[str]], offline: bool = False) -> None:
    """Replace `table_dir` by a new folder in one atomic exchange.

    `build(new_dir)` fills the new folder and returns the names of the current files it
    accounts for (merged, migrated or linked). Files that appear in `table_dir` meanwhile
    (another process appended a segment) are linked into the new folder before the swap, and
    any that slip in between are moved over after it. `offline=True` swaps with two plain
    renames instead (a moment without the folder: only when nobody queries).

    Before the first rename the swap is journaled (`<store>/_k2repro/journal/`) and the run's
    segment manifest gets the new segments' checksums; a kill at any point is finished or
    rolled back by `recover_swaps` (every open of the store, every gc)."""
    from k2repro.audit.manifest import record

    table_dir = Path(table_dir)
    if _in_flight(table_dir):
        raise TableBusy(f"{table_dir}: a segment is being written ({_in_flight(table_dir)[0]})")
    new = table_dir.parent / f".{table_dir.name}.swap-{secrets.token_hex(4)}"
    new.mkdir()
    journal: Path | None = None
    try:
        done = set(build(new))
        _carry(table_dir, new, done)  # everything else, and segments appended while we built
        if _in_flight(table_dir):
            raise TableBusy(f"{table_dir}: a segment is being written")
        changes = _manifest_changes(table_dir, new)
        old = table_dir.parent / f".{table_dir.name}.old-{secrets.token_hex(4)}" if offline else None
        journal = write_journal(table_dir, new, old,
                                 [Path(rel).name for rel, sha, _ in changes if sha], sorted(done))
        record(table_dir.parent, "compact", changes, fsync=True)
        _fault("journaled")
        if old is not None:
            os.rename(table_dir, old)
            _fault("renamed-old")
            os.rename(new, table_dir)
            _fault("renamed-new")
            os.rename(old, new)
        else:
            _exchange(new, table_dir)
            _fault("exchanged")
        for f in segment_files(new):  # the old folder now: anything that slipped in moves over
            if f.name not in done and not (table_dir / f.name).exists():
                os.rename(f, table_dir / f.name)
    except BaseException:
        if journal is None:
            shutil.rmtree(new, ignore_errors=True)
        else:  # finish or roll back now; what cannot be done here waits for recover_swaps
            with contextlib.suppress(Exception):
                finish_swap(store_root_of(table_dir), journal)
        raise
    shutil.rmtree(new, ignore_errors=True)
    journal.unlink(missing_ok=True)


def _groups(table_dir: Path, small_bytes: int) -> dict[tuple[str, int], list[Path]]:
    """(writer prefix, schema version) -> its small segments, in name (= write) order."""
    out: dict[tuple[str, int], list[Path]] = {}
    for f in segment_files(table_dir):
        if f.stat().st_size >= small_bytes:
            continue
        writer = f.name.split("-", 1)[0] if "-" in f.name else "s"
        out.setdefault((writer, segment_version(f, -1)), []).append(f)
    return {k: v for k, v in out.items() if len(v) > 1}


def plan_run(run_dir: Path, small_bytes: int = SMALL_BYTES) -> list[dict[str, Any]]:
    """What compaction would merge in one run folder: per table and writer, the files."""
    plan = []
    for tdir in sorted(p for p in Path(run_dir).iterdir() if p.is_dir() and p.name in S.TABLES):
        for (writer, _), files in sorted(_groups(tdir, small_bytes).items()):
            plan.append({"table": tdir.name, "writer": writer, "files": [str(f) for f in files],
                         "segments": len(files), "bytes": sum(f.stat().st_size for f in files)})
    return plan


def _merge_into(new_dir: Path, table_dir: Path, small_bytes: int) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    groups = _groups(table_dir, small_bytes)
    merged: set[str] = set()
    for files in groups.values():
        tables = [pq.read_table(f) for f in files]
        meta = tables[0].schema.metadata
        tbl = pa.concat_tables(tables, promote_options="default").replace_schema_metadata(meta)
        name = new_segment_name(files[0].name)
        tmp = new_dir / f".{name}.tmp"
        pq.write_table(tbl, tmp, compression=COMPRESSION, write_page_checksum=True)
        os.replace(tmp, new_dir / name)
        merged.update(f.name for f in files)
    kept = [f.name for f in segment_files(table_dir) if f.name not in merged]
    for name in kept:
        os.link(table_dir / name, new_dir / name)
    return sorted(merged) + kept


def compact_run(run_dir: Path, small_bytes: int = SMALL_BYTES, offline: bool = False) -> dict[str, Any]:
    """Merge the run folder's small segments, one table folder swap at a time. The caller
    makes sure the run is not running (`tools.gc.compact`)."""
    run_dir = Path(run_dir)
    before = after = 0
    tables: list[str] = []
    busy: list[str] = []
    for tdir in sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name in S.TABLES):
        if not _groups(tdir, small_bytes):
            continue
        n0 = len(segment_files(tdir))
        try:
            swap_table_dir(tdir, lambda new, t=tdir: _merge_into(new, t, small_bytes), offline=offline)
        except TableBusy:
            busy.append(tdir.name)
            continue
        before += n0
        after += len(segment_files(tdir))
        tables.append(tdir.name)
    # A run that ended without close() (SIGKILL) left its ranks' full-disk reserves behind.
    reserves = sorted(run_dir.glob(".reserve-r*"))
    for f in reserves:
        f.unlink(missing_ok=True)
    return {"run_dir": str(run_dir), "tables": tables, "segments_before": before, "segments_after": after,
            "skipped_busy": busy, "reserves_removed": len(reserves)}


def require_exchange(root: Path, offline: bool) -> None:
    """Refuse early, with the reason, on a filesystem that cannot swap folders atomically."""
    if offline or exchange_supported(Path(root)):
        return
    raise BadInputError(f"store {root}: this filesystem cannot exchange two folders atomically "
                        f"(renameat2 RENAME_EXCHANGE), so compaction could disturb readers; "
                        f"pass --offline when nobody queries the store")


__all__ = ["FAULT_ENV", "compact_run", "plan_run", "swap_table_dir", "exchange_supported", "new_segment_name",
           "require_exchange", "SMALL_BYTES", "TableBusy"]
