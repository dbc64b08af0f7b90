"""What a run's history looks like from the store: its chain of parents, the data deferrals
in force at a step, and where its checkpoints lie now.

No torch here: `k2repro batch` and `k2repro diff` use these and must stay fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from k2repro.audit.store import Store

CKPT_MANIFEST = "manifest.json"


def step_dirname(step: int) -> str:
    """Name of a checkpoint folder (the trainer's layout: `step_%08d`)."""
    return f"step_{step:08d}"


def chain(store: Store, run_id: str) -> list[dict[str, Any]]:
    """The run and its ancestors through `parent_run_id`, root first. Parents that are not in
    this store end the chain."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    cur: str | None = run_id
    while cur and cur not in seen:
        seen.add(cur)
        row = store.execute(
            "SELECT run_id, parent_run_id, resumed_from_step, source, world_size FROM runs_raw "
            "WHERE run_id = ? LIMIT 1", [cur]).fetchone()
        if row is None:
            break
        out.append(dict(zip(("run_id", "parent_run_id", "resumed_from_step", "source", "world_size"), row)))
        cur = row[1]
    return out[::-1]


def deferred_at(store: Store, run_id: str) -> list[int]:
    """The deferred data positions in force for this run's steps.

    A run's deferral list is fixed when it starts: the list in the checkpoint it resumed from
    (inherited from its ancestors) joined with its own `train.defer_positions` (a guard
    rollback starts a child run whose config records the whole list). So the union of
    `train.defer_positions` along the chain of parents is the list its steps drew data with.
    """
    out: set[int] = set()
    for r in chain(store, run_id):
        row = store.execute("SELECT value FROM hparams WHERE run_id = ? AND key = 'train.defer_positions'",
                            [r["run_id"]]).fetchone()
        if row and row[0]:
            try:
                out.update(int(x) for x in json.loads(row[0]))
            except (json.JSONDecodeError, TypeError, ValueError):
                continue
    return sorted(out)


def run_dir(store: Store, run_id: str) -> Path | None:
    """The folder of this run in the store (any depth), if it is there."""
    for d in store.run_dirs():
        if d.name == run_id:
            return d
    return None


def checkpoint_dir(store: Store, run_id: str, step: int, recorded: str | None = None,
                   ckpt_base: str | None = None) -> Path | None:
    """Where the checkpoint of `step` of this run lies now: the run's own folder in this store
    first (a copied or moved store carries its checkpoints), then `ckpt.dir/<run_id>`, then
    the path the run recorded. None when none of them exists (pruned by `ckpt.keep_last`)."""
    name = step_dirname(step)
    cands: list[Path] = []
    rd = run_dir(store, run_id)
    if rd is not None:
        cands.append(rd / "checkpoints" / name)
    if ckpt_base:
        cands.append(Path(ckpt_base) / run_id / "checkpoints" / name)
    if recorded:
        cands.append(Path(recorded))
    for c in cands:
        if c.is_dir():
            return c
    return None
