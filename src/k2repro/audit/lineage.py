"""What a run's history looks like from the store: its chain of parents, the launches of
its logical run (a resume or a guard rollback continues it; a replay does not), its family
(restart segments and forks, with step ranges), the data deferrals in force at a step, and
where its checkpoints lie now.

The query side of the audit store, below everything that reads a run's history (replay,
batch, export, bundles, forensics): one walker of `parent_run_id` chains (`ancestors`), so
replay, `k2repro batch` and the release bundle agree on what a run descends from. It reads the
store only and imports nothing of the record side. No torch here: `k2repro batch` and
`k2repro diff` use these and must stay fast.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2repro.core.layout import step_dirname
from k2repro.errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    from k2repro.audit.store import Store

CKPT_MANIFEST = "manifest.json"

#: Keys of each row `chain` returns.
CHAIN_KEYS = ("run_id", "parent_run_id", "resumed_from_step", "source", "world_size")
#: Keys of each row `logical_chain` returns (`cut` added): the `runs` view's, status included.
LOGICAL_KEYS = ("run_id", "name", "parent_run_id", "resumed_from_step", "source", "status", "config_json",
                "config_hash", "world_size", "started_at", "ended_at")


def is_replay(row: dict[str, Any]) -> bool:
    """A replay re-runs steps of its parent to check them: it is not part of its logical run."""
    return (row.get("source") or "train") == "replay"


def ancestors(lookup: Callable[[str], dict[str, Any] | None], run_id: str,
              stop: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
    """The run and its ancestors through `parent_run_id`, root first: THE walk of a chain of
    parents. `lookup(run_id)` gives a run's row (a dict with `parent_run_id`) or None; a parent
    it does not know ends the chain, and so does a cycle. `stop(row)` true: that row is the
    last one walked (its parent is not followed)."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    cur: str | None = run_id
    while cur and cur not in seen:
        seen.add(cur)
        row = lookup(cur)
        if row is None:
            break
        out.append(row)
        if stop is not None and stop(row):
            break
        cur = row["parent_run_id"]
    return out[::-1]


def chain(store: Store, run_id: str) -> list[dict[str, Any]]:
    """The run and its ancestors through `parent_run_id`, root first (across replays too).
    Parents that are not in this store end the chain."""
    def lookup(rid: str) -> dict[str, Any] | None:
        row = store.execute(f"SELECT {', '.join(CHAIN_KEYS)} FROM runs_raw WHERE run_id = ? LIMIT 1",
                            [rid]).fetchone()
        return None if row is None else dict(zip(CHAIN_KEYS, row))

    return ancestors(lookup, run_id)


def logical_chain(store: Store, ref: str) -> list[dict[str, Any]]:
    """The launches that make up the logical run `ref` belongs to, root first: its ancestors
    (through `parent_run_id`, not across a replay) and its descendants while each has exactly
    one child that is not a replay (several: BadInputError naming them). Each row holds
    LOGICAL_KEYS and `cut`: the last step of this launch that the logical run keeps (None:
    all; the `lineage_steps` view's rule)."""
    rid = store.resolve_run_id(ref)
    rows = {r[0]: dict(zip(LOGICAL_KEYS, r))
            for r in store.execute(f"SELECT {', '.join(LOGICAL_KEYS)} FROM runs").fetchall()}
    out = ancestors(rows.get, rid, stop=is_replay)
    while not is_replay(out[-1]):
        kids = sorted(r["run_id"] for r in rows.values() if r["parent_run_id"] == out[-1]["run_id"]
                      and (r.get("source") or "train") == "train")
        if not kids or kids[0] in {r["run_id"] for r in out}:  # none, or a cycle of parents (forged)
            break
        if len(kids) > 1:
            raise BadInputError(f"run {out[-1]['run_id']} has several continuations ({', '.join(kids)}): "
                                f"export the one that heads the logical run")
        out.append(rows[kids[0]])
    for i, r in enumerate(out):
        nxt = out[i + 1] if i + 1 < len(out) else None
        r["cut"] = None if nxt is None or nxt["resumed_from_step"] is None else int(nxt["resumed_from_step"])
    return out


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


#: Keys of each row `family` and `branches_overlapping` return.
FAMILY_KEYS = ("run_id", "name", "source", "parent_run_id", "resumed_from_step", "first_step",
               "last_step", "n_steps", "depth", "relation")


def family(store_or_con: Any, run_id: str) -> list[dict[str, Any]]:
    """Every run of `run_id`'s logical run: the whole tree under its lineage root (parents,
    restart segments, forks, and their forks), each with its step range and how it relates to
    `run_id`, ordered by first step.

    Why: a restart is evidence. A spike that recurs on the branch restarted before it points at
    the data; one the branch did not repeat points at the state the run had (PaLM's finding),
    and either way the run was restarted, so the spike mattered. Forensics asks this to find
    those branches; imports link them (importers/stitch.py), the trainer links resumes.

    `store_or_con` is a `Store` or any DuckDB connection with the store's views (`lineage`,
    `runs_raw`, `steps`). `relation` is `self`, `parent`, `ancestor`, `child`, `descendant`,
    `sibling` (same parent) or `relative` (same root otherwise). `first_step`/`last_step` are
    None for a run without steps. An unknown run gives []."""
    row = store_or_con.execute("SELECT lineage_root, lineage_path FROM lineage WHERE run_id = ? LIMIT 1",
                               [run_id]).fetchone()
    if row is None:
        return []
    root, own_path = row[0], list(row[1] or [])
    rows = store_or_con.execute(
        "WITH fam AS (SELECT run_id, parent_run_id, resumed_from_step, source, depth, lineage_path "
        "             FROM lineage WHERE lineage_root = ?), "
        "rng AS (SELECT run_id, min(step) AS first_step, max(step) AS last_step, count(*) AS n "
        "        FROM steps WHERE run_id IN (SELECT run_id FROM fam) GROUP BY run_id), "
        "nm AS (SELECT run_id, any_value(name) AS name FROM runs_raw "
        "       WHERE run_id IN (SELECT run_id FROM fam) GROUP BY run_id) "
        "SELECT fam.run_id, nm.name, fam.source, fam.parent_run_id, fam.resumed_from_step, "
        "       rng.first_step, rng.last_step, coalesce(rng.n, 0), fam.depth, fam.lineage_path "
        "FROM fam LEFT JOIN rng USING (run_id) LEFT JOIN nm USING (run_id)", [root]).fetchall()
    own_parent = own_path[-2] if len(own_path) > 1 else None
    out = []
    for r in rows:
        d = dict(zip(FAMILY_KEYS[:-1], r[:9], strict=True))
        path = list(r[9] or [])
        if d["run_id"] == run_id:
            rel = "self"
        elif d["run_id"] == own_parent:
            rel = "parent"
        elif d["run_id"] in own_path:
            rel = "ancestor"
        elif d["parent_run_id"] == run_id:
            rel = "child"
        elif run_id in path:
            rel = "descendant"
        elif own_parent is not None and d["parent_run_id"] == own_parent:
            rel = "sibling"
        else:
            rel = "relative"
        d["relation"] = rel
        for k in ("first_step", "last_step", "resumed_from_step", "n_steps", "depth"):
            d[k] = None if d[k] is None else int(d[k])
        out.append(d)
    big = float("inf")
    out.sort(key=lambda d: (big if d["first_step"] is None else d["first_step"], d["depth"], d["run_id"]))
    return out


def branches_overlapping(store_or_con: Any, run_id: str, first_step: int | None = None,
                         last_step: int | None = None) -> list[dict[str, Any]]:
    """The other runs of `run_id`'s logical run (`family`) that logged steps inside
    [first_step, last_step] (default: `run_id`'s own step range): the branches that went over
    the same steps again (a restart before a spike, the original a restart replaced), with the
    keys of `family`. Empty when the run has no steps and no window is given."""
    fam = family(store_or_con, run_id)
    me = next((d for d in fam if d["run_id"] == run_id), None)
    if me is None:
        return []
    lo = first_step if first_step is not None else me["first_step"]
    hi = last_step if last_step is not None else me["last_step"]
    if lo is None or hi is None:
        return []
    return [d for d in fam if d["run_id"] != run_id and d["first_step"] is not None
            and d["first_step"] <= hi and d["last_step"] >= lo]
