"""Upgrading an older store: every segment of an older run folder rewritten to today's schema
version, table by table, then the run's marker.

`migrate_store` rewrites each table folder of an older run through the compaction swap
(`audit.compact.swap_table_dir`: readers never see a half-migrated table), then the marker.
Runs that are still running are refused (their writer writes its own version). Which versions
a store holds, the steps between them (`MIGRATIONS`) and the refusal of a store that would be
misread are in audit/versions.py, which the query side uses on every open.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2repro.audit import schema as S
from k2repro.audit.storemeta import ensure_store
from k2repro.audit.versions import (
    META_KEY,
    Migration,
    SchemaTooNew,
    chain_from,
    marker_version,
    segment_version,
    stamp_version,
    store_versions,
)
from k2repro.audit.writer import utcnow
from k2repro.core.atomic import atomic_write_bytes
from k2repro.core.layout import RUN_MARKER
from k2repro.errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa


def stamp_table(tbl: pa.Table, version: int) -> pa.Table:
    """`tbl` with its schema metadata saying `version` (read back by `versions.segment_version`)."""
    meta = dict(tbl.schema.metadata or {})
    meta[META_KEY] = str(version).encode()
    return tbl.replace_schema_metadata(meta)


def apply_migrations(table: str, tbl: pa.Table, from_version: int,
                     migrations: Mapping[int, Migration] | None = None,
                     target: int = S.SCHEMA_VERSION) -> pa.Table:
    """One segment of `table`, from `from_version` to `target`, stamped with `target`."""
    for m in chain_from(from_version, migrations, target):
        if m.transform is not None:
            tbl = m.transform(table, tbl)
    return stamp_table(tbl, target)


def plan_migration(root: str | Path, migrations: Mapping[int, Migration] | None = None,
                   target: int = S.SCHEMA_VERSION) -> list[dict[str, Any]]:
    """Every run folder below `target`: its path, version and the steps it needs."""
    root = Path(root)
    stamp = stamp_version(root)
    if stamp is not None and stamp > target:
        raise SchemaTooNew(f"store {root} was written by a newer k2repro (schema version {stamp}); "
                           f"this k2repro cannot migrate it")
    plan = []
    for v, dirs in sorted(store_versions(root).items()):
        if v > target:
            raise SchemaTooNew(f"store {root}: run folder {dirs[0]} has schema version {v}, newer than "
                               f"this k2repro's {target}: upgrade k2repro")
        if v == target:
            continue
        steps = chain_from(v, migrations, target)
        for d in dirs:
            plan.append({"run_dir": str(d), "from_version": v, "to_version": target,
                         "steps": [m.summary for m in steps]})
    return plan


def migrate_run(run_dir: Path, migrations: Mapping[int, Migration] | None = None,
                target: int = S.SCHEMA_VERSION) -> dict[str, Any]:
    """Rewrite every segment of an older run folder to `target`, table by table through the
    compaction swap (readers see the old table or the new one, never a mix), then its marker."""
    import pyarrow.parquet as pq

    from k2repro.audit.compact import new_segment_name, swap_table_dir

    run_dir = Path(run_dir)
    base = marker_version(run_dir)
    tables = 0
    segments = 0
    for tdir in sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name in S.TABLES):
        files = sorted(f for f in tdir.iterdir() if f.is_file() and f.name.endswith(".parquet")
                       and not f.name.startswith("."))
        todo = [(f, segment_version(f, base)) for f in files]
        if not any(v < target for _, v in todo):
            continue

        def build(new_dir: Path, todo: list = todo, table: str = tdir.name) -> list[str]:
            names = []
            for f, v in todo:
                if v >= target:
                    os.link(f, new_dir / f.name)
                    names.append(f.name)
                    continue
                tbl = apply_migrations(table, pq.read_table(f), v, migrations, target)
                name = new_segment_name(f.name)
                pq.write_table(tbl, new_dir / f".{name}.tmp", compression="zstd")
                os.replace(new_dir / f".{name}.tmp", new_dir / name)
                names.append(name)
            return [f.name for f, _ in todo]

        swap_table_dir(tdir, build)
        tables += 1
        segments += sum(1 for _, v in todo if v < target)
    marker = json.loads((run_dir / RUN_MARKER).read_text())
    marker.update(schema_version=target, migrated_from=base, migrated_at=utcnow().isoformat())
    atomic_write_bytes(run_dir / RUN_MARKER, json.dumps(marker).encode())
    return {"run_dir": str(run_dir), "from_version": base, "to_version": target, "tables": tables,
            "segments": segments}


def migrate_store(root: str | Path, dry_run: bool = False,
                  migrations: Mapping[int, Migration] | None = None,
                  target: int = S.SCHEMA_VERSION) -> dict[str, Any]:
    """Upgrade every older run folder of the store (running runs are written by a writer of
    their own version and are refused). Returns the plan, and what was done unless dry_run."""
    root = Path(root)
    plan = plan_migration(root, migrations, target)
    report: dict[str, Any] = {"store": str(root), "schema_version": target, "plan": plan, "migrated": []}
    if dry_run or not plan:
        return report
    _refuse_running(root, [Path(p["run_dir"]).name for p in plan])
    for p in plan:
        report["migrated"].append(migrate_run(Path(p["run_dir"]), migrations, target))
    if target == S.SCHEMA_VERSION:
        ensure_store(root)
    return report


def _refuse_running(root: Path, run_ids: Iterable[str]) -> None:
    from k2repro.audit.store import open_store

    ids = list(run_ids)
    with open_store(root, check_version=False) as store:
        rows = store.execute("SELECT run_id FROM runs WHERE status = 'running' AND list_contains(?, run_id)",
                             [ids]).fetchall()
    if rows:
        raise BadInputError(f"run {rows[0][0]} is still running: migrate after it ends")


__all__ = ["migrate_store", "plan_migration", "migrate_run", "apply_migrations", "stamp_table"]
