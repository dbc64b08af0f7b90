"""The journal of a table folder swap (compaction, migration) and the recovery of a swap that
was interrupted: finished when its new folder is in place or complete, rolled back when the
old folder never left.

Why apart from compaction. Every `open_store` (the query side), every `verify-store` and every
`gc` first finishes interrupted swaps, so that no query answers from a table whose rows sit in
a hidden `.<table>.old-*` folder; the query side must not import the compaction code that
made them (docs/architecture.md, "Layers"). audit/compact.py writes the journal through
`write_journal` before its first rename and finishes a failed swap with `finish_swap`.

Journal format: `<store>/_k2repro/journal/swap-<time_ns>-<hex>.json`, one JSON object
{"run_dir" (relative to the store), "table", "new" (the swap folder's name), "old" (the
offline rename's hidden folder, or null), "new_names" (segments only the new folder has),
"done" (the old segments the new folder accounts for)}; written temp + rename + fsync.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path

from k2repro.audit import schema as S
from k2repro.core.layout import META_DIR, STUB_DIR
from k2repro.errors import BadInputError

JOURNAL_DIR = f"{META_DIR}/journal"


def segment_files(table_dir: Path) -> list[Path]:
    """The segments a view reads in a table folder (files in flight and dot files left out)."""
    return sorted(f for f in table_dir.iterdir()
                  if f.is_file() and f.name.endswith(".parquet") and not f.name.startswith("."))


def store_root_of(path: Path) -> Path:
    """The store root above `path` (the folder holding the schema stubs); else the folder
    above the run folder, where a store root normally is."""
    for parent in Path(path).resolve().parents:
        if (parent / STUB_DIR).is_dir():
            return parent
    return Path(path).resolve().parent.parent


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_journal(table_dir: Path, new: Path, old: Path | None, new_names: list[str],
                  done: list[str]) -> Path:
    """Record an exchange before its first rename, so an interrupted one can be finished or
    rolled back (`recover_swaps`): without it, a kill between the offline renames left the
    table folder gone and its rows in a hidden `.<table>.old-*` folder that no query reads."""
    root = store_root_of(table_dir)
    jdir = root / JOURNAL_DIR
    jdir.mkdir(parents=True, exist_ok=True)
    body = {"run_dir": os.path.relpath(table_dir.parent.resolve(), root), "table": table_dir.name,
            "new": new.name, "old": old.name if old else None, "new_names": new_names, "done": done}
    path = jdir / f"swap-{time.time_ns():020d}-{secrets.token_hex(4)}.json"
    tmp = jdir / f".{path.name}.tmp"
    with open(tmp, "w") as f:
        json.dump(body, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(jdir)
    return path


class InterruptedSwap(BadInputError):
    """A folder swap was interrupted and could not be finished here (a read-only store)."""


def pending_swaps(root: Path) -> list[Path]:
    """Journals of swaps that have not finished (cheap: one folder listing)."""
    jdir = Path(root) / JOURNAL_DIR
    return sorted(jdir.glob("swap-*.json")) if jdir.is_dir() else []


def finish_swap(root: Path, journal: Path) -> str:
    """Finish (the new folder is in place or complete beside it) or roll back (the old folder
    never left) one journaled swap; returns what was done."""
    from k2repro.audit.manifest import record

    j = json.loads(journal.read_text())
    run_dir = (root / j["run_dir"]).resolve()
    for key in ("table", "new"):
        if not isinstance(j.get(key), str) or "/" in j[key] or j[key] in ("", ".", ".."):
            raise ValueError(f"journal {journal.name}: bad {key}")
    if root.resolve() not in run_dir.parents:
        raise ValueError(f"journal {journal.name}: run folder outside the store")
    table_dir, new = run_dir / j["table"], run_dir / j["new"]
    old = run_dir / j["old"] if j.get("old") else None
    new_names = set(j.get("new_names") or [])
    done = set(j.get("done") or [])
    if not table_dir.exists():  # killed between the offline renames: the new folder is complete
        if new.is_dir():
            os.rename(new, table_dir)
        elif old is not None and old.is_dir():
            os.rename(old, table_dir)
    if not table_dir.is_dir():
        raise ValueError(f"journal {journal.name}: {table_dir.name} is gone with no copy to restore")
    present = {f.name for f in segment_files(table_dir)}
    if new_names and not (new_names & present):  # the old folder never left: roll back
        shutil.rmtree(new, ignore_errors=True)
        record(run_dir, "compact", [(f"{j['table']}/{n}", None, -1) for n in sorted(new_names)], fsync=True)
        action = "rolled back"
    else:
        for side in (new, old):  # the old folder: anything that slipped in moves over, then it goes
            if side is None or not side.is_dir():
                continue
            for f in segment_files(side):
                if f.name not in done and f.name not in present:
                    os.rename(f, table_dir / f.name)
            shutil.rmtree(side, ignore_errors=True)
        action = "finished"
    journal.unlink(missing_ok=True)
    return f"{action} the interrupted compaction of {os.path.relpath(table_dir, root)}"


def restore_hidden_tables(run_dir: Path) -> list[str]:
    """Put back a table folder that an unjournaled swap (a k2repro before the journal, killed
    between its offline renames) left only as a hidden `.<table>.old-*` (or `.swap-*`)
    folder. The `.old-*` folder is the complete old table; it wins over a swap folder."""
    run_dir = Path(run_dir)
    restored: list[str] = []
    for table in S.TABLES:
        if (run_dir / table).exists():
            continue
        hidden = sorted(run_dir.glob(f".{table}.old-*")) or sorted(run_dir.glob(f".{table}.swap-*"))
        hidden = [h for h in hidden if h.is_dir() and not h.is_symlink()]
        if hidden:
            os.rename(hidden[0], run_dir / table)
            restored.append(f"{run_dir.name}/{table} from {hidden[0].name}")
    return restored


def recover_swaps(root: str | Path) -> list[str]:
    """Finish or roll back every interrupted folder swap of the store. Raises InterruptedSwap
    (one line, with what to run) when that cannot be done here, so that no query answers
    from a table whose rows sit in a hidden folder."""
    root = Path(root)
    done: list[str] = []
    for journal in pending_swaps(root):
        try:
            done.append(finish_swap(root, journal))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InterruptedSwap(f"store {root}: an interrupted compaction ({journal.name}) could not be "
                                  f"finished ({exc}); run `k2repro gc --compact` with write access to the "
                                  f"store") from None
    return done


__all__ = ["JOURNAL_DIR", "InterruptedSwap", "segment_files", "store_root_of", "write_journal", "pending_swaps",
           "finish_swap", "restore_hidden_tables", "recover_swaps"]
