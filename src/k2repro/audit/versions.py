"""Schema versions of a store: which versions it holds, and the refusal of a store this
k2repro would misread. Upgrading an older store is audit/migrate.py's job.

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
`MIGRATIONS`, the list of version steps, is here because that refusal needs it; every
SCHEMA_VERSION bump adds one step.

Separate from the upgrade because the query side checks versions on every `open_store`
(shared audit layer, no pyarrow at import), while rewriting segments is store maintenance.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from k2repro.audit import schema as S
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




def segment_version(path: Path, default: int) -> int:
    """The version a segment's Parquet metadata records (`default` when it records none)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(META_KEY)
    try:
        return int(raw) if raw is not None else default
    except ValueError:
        return default


__all__ = ["META_KEY", "MIGRATIONS", "Migration", "SchemaTooNew", "NeedsMigration", "chain_from", "check_store",
           "marker_version", "stamp_version", "run_markers", "store_versions", "segment_version"]
