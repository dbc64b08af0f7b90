"""The one transaction that writes an import: every run of it, or none.

Separate from parsing and from table building because it is the only part of an import that
touches the store: it takes the store's import lock, decides whether the content is already
there (report it: idempotent) or there with other options (refuse: no duplicates), builds
every table before the first write, writes each run with
`k2repro.audit.writer.write_run_tables` (a dot folder renamed into place) and removes the runs
it wrote when a later one fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2repro.errors import BadInputError
from k2repro.importers.parsed import ImportedRun
from k2repro.importers.tables import build_tables, jsonable
from k2repro.importers.values import check_run_values

if TYPE_CHECKING:  # pragma: no cover
    from k2repro.importers.stitch import Link

#: identity -> (run_id, name, options hash) of a run already imported into the store
Prior = dict[str, tuple[str, str | None, str | None]]
#: (parsed run, run id, name, its tables; None when the run is in the store already)
Planned = tuple[ImportedRun, str, str, dict[str, Any] | None]


@dataclass
class ImportResult:
    run_id: str
    name: str
    source_run: str | None
    steps: int
    created: bool
    kind: str

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "name": self.name, "source_run": self.source_run,
                "steps": self.steps, "created": self.created, "source": f"import:{self.kind}"}


def identity(run: ImportedRun) -> str:
    """What makes two imports 'the same content': kind, file bytes, and which run of the file."""
    return hashlib.sha256(json.dumps([run.kind, run.content_sha256, run.source_run]).encode()).hexdigest()


def options_hash(options: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(jsonable(dict(options)), sort_keys=True, default=str)
                          .encode()).hexdigest()


def _existing(store_root: Path, identities: list[str]) -> Prior:
    """identity -> (run_id, name, options hash) of runs already imported into the store."""
    if not store_root.is_dir() or not identities:
        return {}
    from k2repro.audit.store import open_store

    store = open_store(store_root)
    try:
        rows = store.execute(
            "SELECT i.value, i.run_id, r.name, o.value FROM hparams i "
            "LEFT JOIN runs_raw r USING (run_id) "
            "LEFT JOIN (SELECT run_id, value FROM hparams WHERE key = 'import.options_sha256') o "
            "USING (run_id) WHERE i.key = 'import.identity' AND list_contains(?, i.value)",
            [identities]).fetchall()
    finally:
        store.close()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def run_name(base: str, run: ImportedRun, n_runs: int) -> str:
    return base if n_runs == 1 or not run.source_run else f"{base}/{run.source_run}"


def commit_runs(store_root: str | Path, runs: Sequence[ImportedRun], name: str,
                options: Mapping[str, Any], argv: Sequence[str] | None = None,
                links: Sequence[Link] = ()) -> list[ImportResult]:
    """Write parsed runs to the store as one transaction: every table is built first, runs
    already imported with the same options are reported (idempotent), content already
    imported with other options is refused (BadInputError), and if writing run k fails the
    runs written before it are removed again. `links` (importers/stitch.py) set each linked
    run's parent and resume step and add a `stitch` event to it; what they link is part of the
    options hash, so the same content linked differently is refused, not duplicated."""
    from k2repro.audit.storemeta import check_store_path

    root = check_store_path(store_root)
    if not runs:
        raise BadInputError("nothing to import")
    for r in runs:  # every value against its column's limits, before anything is written
        check_run_values(r)
    if links:
        from k2repro.importers.stitch import describe

        options = {**options, "links": describe(runs, links)}
    opt_hash = options_hash(options)
    ids = [identity(r) for r in runs]
    with import_lock(root):
        return _commit_locked(root, runs, name, opt_hash, ids, argv, links)


@contextlib.contextmanager
def import_lock(root: Path) -> Iterator[None]:
    """One import at a time per store: "already imported?" and the write are one step, so
    identical imports started together make one run (without it, four made two in one try
    of three). An flock on the store folder itself: nothing is created in the store, and the
    kernel drops the lock when a killed import dies."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _commit_locked(root: Path, runs: Sequence[ImportedRun], name: str, opt_hash: str, ids: list[str],
                   argv: Sequence[str] | None, links: Sequence[Link]) -> list[ImportResult]:
    """commit_runs under the store's import lock."""
    prior = _existing(root, ids)
    _refuse_other_options(runs, ids, prior, opt_hash)
    planned = _plan(root, runs, name, opt_hash, ids, prior, argv, links)
    return _write(root, planned)


def _refuse_other_options(runs: Sequence[ImportedRun], ids: list[str], prior: Prior, opt_hash: str) -> None:
    """Content already in the store under other options: refused, never a second copy."""
    for r, ident in zip(runs, ids, strict=True):
        if ident in prior and prior[ident][2] != opt_hash:
            rid, rname, _ = prior[ident]
            raise BadInputError(
                f"{r.path}: this content{f' (run {r.source_run!r})' if r.source_run else ''} was "
                f"already imported as run {rid} ({rname}) with other options; remove that run "
                "first to import it differently")


def _plan(root: Path, runs: Sequence[ImportedRun], name: str, opt_hash: str, ids: list[str], prior: Prior,
          argv: Sequence[str] | None, links: Sequence[Link]) -> list[Planned]:
    """Run ids, names and every table of the runs to write, before anything is written; a run
    in the store already keeps its id and name (and gets no tables)."""
    from k2repro.core.ids import new_run_id

    run_ids = [prior[ident][0] if ident in prior else new_run_id() for ident in ids]
    link_of = {lk.child: lk for lk in links}
    planned: list[Planned] = []
    for i, (r, ident) in enumerate(zip(runs, ids, strict=True)):
        nm = run_name(name, r, len(runs))
        if ident in prior:
            planned.append((r, run_ids[i], prior[ident][1] or nm, None))
            continue
        r.hparams["import.identity"] = ident
        r.hparams["import.options_sha256"] = opt_hash
        parent = resumed = None
        if (lk := link_of.get(i)) is not None:
            parent = lk.external if lk.parent is None else run_ids[lk.parent]
            resumed = lk.resumed_from_step
            r.event("stitch", step=resumed, **lk.detail(runs, parent))
        planned.append((r, run_ids[i], nm, build_tables(r, run_ids[i], nm, root, argv, parent, resumed)))
    return planned


def _write(root: Path, planned: list[Planned]) -> list[ImportResult]:
    """Write each planned run; if one fails, remove the runs written before it."""
    from k2repro.audit.writer import write_run_tables

    written: list[Path] = []
    results = []
    try:
        for r, run_id, nm, tables in planned:
            if tables is not None:
                written.append(write_run_tables(root, run_id, tables))
            results.append(ImportResult(run_id, nm, r.source_run, r.n_steps, tables is not None, r.kind))
    except BaseException:
        for p in written:
            shutil.rmtree(p, ignore_errors=True)
        raise
    return results
