"""Schema versions of a store: read an older store right or upgrade it, refuse a newer one.

Where a store records its version (`schema.SCHEMA_VERSION` of the writer):
- every run folder's `_run.json` (`schema_version`; a marker without it is version 0, the
  format before versions were recorded): the version of the run's segments on disk;
- every segment's Parquet metadata (`k2repro.schema_version`): that segment's own version,
  so an interrupted upgrade resumes segment by segment and never transforms one twice;
- `_k2repro/schema/VERSION` (the schema stubs of the query layer): the newest reader that
  opened the store. The `runs.schema_version` column keeps the writer's version as history.

Rules. A run folder of a *newer* version than this k2repro knows is refused with a clear
message (a newer writer may have changed a column's type or meaning: reading it with today's
views could misread it). An *older* run is read as is when every migration step from its
version is `read_compatible` (additive: today's views, which read with `union_by_name`, see
the right values); otherwise it is refused until `k2repro gc --migrate` has rewritten it.
`migrate_store` rewrites each table folder of an older run through the compaction swap
(`audit.compact.swap_table_dir`: readers never see a half-migrated table), then the marker.

Importing this module does not import pyarrow (`open_store` calls `check_store`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2repro.audit import schema as S
from k2repro.audit.writer import utcnow
from k2repro.core.atomic import atomic_write_bytes
from k2repro.core.layout import META_DIR, RUN_MARKER, STUB_DIR
from k2repro.errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

META_KEY = b"k2repro.schema_version"


class SchemaTooNew(BadInputError):
    """The store was written by a newer k2repro: reading it could misread changed columns."""


class NeedsMigration(BadInputError):
    """The store holds runs of an older version that today's views cannot read as is."""


@dataclass(frozen=True)
class Migration:
    """One step from `from_version` to `from_version + 1`.

    `read_compatible`: the old segments read right through today's views without rewriting
    (only nullable columns were added). `transform(table, segment)` turns one old segment
    into the next version's form (None: the columns are unchanged)."""

    from_version: int
    summary: str
    read_compatible: bool
    transform: Callable[[str, pa.Table], pa.Table] | None = None


#: from_version -> the step to from_version + 1. Every SCHEMA_VERSION bump adds one entry here.
MIGRATIONS: dict[int, Migration] = {
    0: Migration(0, "version 0 (markers without `schema_version`, from before versions were "
                    "recorded) has the columns of version 1: the step stamps the version",
                 read_compatible=True),
    1: Migration(1, "version 2 adds nullable `spikes` columns (signal, baseline, peak_value, excess, "
                    "max_z, reason), defines `spikes.magnitude` as peak / baseline everywhere and "
                    "allows the `run_end` status `interrupted`: version 1 segments read as they are",
                 read_compatible=True),
}


def chain_from(version: int, migrations: Mapping[int, Migration] | None = None,
               target: int = S.SCHEMA_VERSION) -> list[Migration]:
    """The steps from `version` up to `target`; BadInputError when one is missing."""
    migs = MIGRATIONS if migrations is None else migrations
    out = []
    for v in range(version, target):
        if v not in migs:
            raise BadInputError(f"no migration from schema version {v} to {v + 1} in this k2repro")
        out.append(migs[v])
    return out


# ----------------------------------------------------------------------------- reading versions

def marker_version(run_dir: Path) -> int:
    """The on-disk schema version of a run folder (0 when the marker does not say)."""
    try:
        data = json.loads((Path(run_dir) / RUN_MARKER).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInputError(f"run marker {Path(run_dir) / RUN_MARKER} is unreadable: {exc}") from None
    v = data.get("schema_version", 0) if isinstance(data, dict) else 0
    try:
        return int(v)
    except (TypeError, ValueError):
        raise BadInputError(f"run marker {Path(run_dir) / RUN_MARKER}: schema_version {v!r} is not an integer") from None


def stamp_version(root: Path) -> int | None:
    """The version in `_k2repro/schema/VERSION`, None when there is none."""
    try:
        text = (Path(root) / STUB_DIR / "VERSION").read_text().split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


def run_markers(root: Path) -> list[Path]:
    """Run folders (holding `_run.json`) at any depth; dot folders and table folders skipped."""
    out: list[Path] = []
    root = Path(root)
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        if RUN_MARKER in filenames:
            out.append(Path(dirpath))
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in S.TABLES
                       and d != META_DIR and d != "checkpoints"]
    return sorted(out)


def store_versions(root: Path) -> dict[int, list[Path]]:
    """version -> run folders of that version."""
    out: dict[int, list[Path]] = {}
    for d in run_markers(root):
        out.setdefault(marker_version(d), []).append(d)
    return out


def check_store(root: str | Path, migrations: Mapping[int, Migration] | None = None,
                current: int = S.SCHEMA_VERSION) -> dict[int, list[Path]]:
    """Refuse a store this k2repro would misread; return its versions. Raises SchemaTooNew for
    a newer stamp or run, NeedsMigration for an older run that is not read-compatible."""
    root = Path(root)
    stamp = stamp_version(root)
    if stamp is not None and stamp > current:
        raise SchemaTooNew(f"store {root} was written by a newer k2repro (schema version {stamp}; this "
                           f"k2repro reads versions up to {current}): upgrade k2repro to read it")
    versions = store_versions(root)
    newer = sorted(v for v in versions if v > current)
    if newer:
        d = versions[newer[-1]][0]
        raise SchemaTooNew(f"store {root}: run folder {d} was written with schema version {newer[-1]}, "
                           f"newer than this k2repro's {current}: upgrade k2repro to read it")
    for v in sorted(x for x in versions if x < current):
        steps = chain_from(v, migrations, current)
        if not all(m.read_compatible for m in steps):
            d = versions[v][0]
            raise NeedsMigration(f"store {root}: run folder {d} has schema version {v}, which this k2repro "
                                 f"reads only after an upgrade: run `k2repro gc --migrate --store {root}`")
    return versions


# ----------------------------------------------------------------------------- upgrading

def segment_version(path: Path, default: int) -> int:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(META_KEY)
    try:
        return int(raw) if raw is not None else default
    except ValueError:
        return default


def stamp_table(tbl: pa.Table, version: int) -> pa.Table:
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
    from k2repro.audit.writer import ensure_store

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


__all__ = ["MIGRATIONS", "Migration", "SchemaTooNew", "NeedsMigration", "check_store", "migrate_store",
           "plan_migration", "migrate_run", "apply_migrations", "store_versions", "marker_version"]
