"""The store's own files, beside the runs: the schema stubs, their version stamp and the
DuckDB database file, and the check that a store path can be globbed at all.

Both sides need them: a writer creates the stubs before its first segment, the query side
checks the stamp (and adds the stubs to a store written by hand or by an older k2repro)
before it builds its views. They live here, in the shared audit layer, so that neither side
imports the other (docs/architecture.md, "Layers").
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from k2repro.audit import schema as S
from k2repro.audit.versions import stamp_version
from k2repro.audit.views import HEARTBEAT_DIR, all_view_sql
from k2repro.core.atomic import atomic_write_bytes
from k2repro.core.layout import DUCKDB_FILE, STUB_DIR, STUB_NAME
from k2repro.errors import BadInputError

COMPRESSION = "zstd"  # stubs, compaction and export: written once, kept long

#: Characters DuckDB's globs read as patterns: a store path cannot hold them.
GLOB_CHARS = "[]?*{}"


def _meta_stamp() -> str:
    return f"{S.SCHEMA_VERSION} {S.schema_hash()}"


def store_meta_current(root: Path) -> bool:
    """Do the store's stubs and DuckDB file match this k2repro's schema (version and columns)?"""
    try:
        stamp = (root / STUB_DIR / "VERSION").read_text().strip()
    except OSError:
        return False
    return stamp == _meta_stamp() and (root / DUCKDB_FILE).exists()


def check_store_path(root: str | Path) -> Path:
    """Refuse a store path with glob characters: views find segments by glob patterns built
    from the store's absolute path, and DuckDB would read `dir[1]` as a character class (the
    import succeeded, then every query failed or found nothing). A store path never needs them."""
    root = Path(root)
    full = str(root.resolve()) if root.exists() or root.parent.exists() else str(root.absolute())
    bad = sorted({c for c in full if c in GLOB_CHARS})
    if bad:
        raise BadInputError(f"store path {str(root)!r} contains {' '.join(bad)}: a store path cannot hold "
                            f"glob characters ({' '.join(GLOB_CHARS)}); rename or move the folder")
    return root


def ensure_store(root: str | Path) -> Path:
    """Create the store root with one empty typed segment per table (so every view's glob
    matches from the start: an empty table reads as 0 typed rows) and the DuckDB database
    file. Idempotent and safe when several processes race: every file is temp + rename."""
    import pyarrow.parquet as pq

    root = check_store_path(root)
    if store_meta_current(root):
        return root
    stamp = stamp_version(root)  # never restamp a newer store with this (older) schema: audit/versions.py
    if stamp is not None and stamp > S.SCHEMA_VERSION:
        raise BadInputError(f"store {root} was written by a newer k2repro (schema version above "
                            f"{S.SCHEMA_VERSION}): upgrade k2repro to write to it")
    stub_root = root / STUB_DIR
    for t in S.TABLES:
        d = stub_root / t
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{STUB_NAME}.{os.getpid()}.{secrets.token_hex(3)}.tmp"
        pq.write_table(S.arrow_schema(t).empty_table(), tmp, compression=COMPRESSION)
        os.replace(tmp, d / STUB_NAME)
    hb = stub_root / HEARTBEAT_DIR
    hb.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(hb / "_stub.json", b"{}")
    write_duckdb_file(root)
    atomic_write_bytes(stub_root / "VERSION", (_meta_stamp() + "\n").encode())
    return root


def write_duckdb_file(root: str | Path) -> Path:
    """`<root>/k2repro.duckdb`: the same views with globs relative to the store, for plain
    `duckdb` users (open it read-only with `file_search_path` set to the store). Built under a
    temp name and renamed, never held open, so it cannot conflict with any reader."""
    import duckdb

    root = Path(root)
    tmp = root / f".{DUCKDB_FILE}.{os.getpid()}.{secrets.token_hex(3)}.tmp"
    have = {t: True for t in S.TABLES} | {HEARTBEAT_DIR: True}
    con = duckdb.connect(str(tmp), config={"file_search_path": str(root.resolve())})
    try:
        for stmt in all_view_sql("", have, explicit=True):
            con.execute(stmt)
        con.execute(f"CREATE OR REPLACE VIEW k2repro_meta AS SELECT {S.SCHEMA_VERSION} AS schema_version, "
                    f"'{S.schema_hash()}' AS schema_hash")
        con.execute("CHECKPOINT")
    finally:
        con.close()
    wal = Path(str(tmp) + ".wal")
    if wal.exists():  # a clean close leaves none; never leave one that names a temp file
        wal.unlink()
    os.replace(tmp, root / DUCKDB_FILE)
    return root / DUCKDB_FILE


__all__ = ["COMPRESSION", "GLOB_CHARS", "check_store_path", "ensure_store", "store_meta_current",
           "write_duckdb_file"]
