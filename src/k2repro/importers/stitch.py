"""Restarts and forks within one import: which runs of a source are segments of one logical run.

A tracker often holds one training run as several runs: a job restarted from a checkpoint
becomes a new W&B run covering the next step range (OLMo-7B is 37 of them), and a run rolled
back past a loss spike is a branch that covers the same steps again. Imported unlinked, each
looks like a short separate run, and the evidence a restart carries (the branch did not spike)
is lost. This module decides, from the parsed runs alone, which run continues or branches
from which; `commit_runs` then writes `parent_run_id` / `resumed_from_step` and a `stitch`
event per link, so the store's `lineage` view sees one logical run and its forks.

The rule (docs/importers.md, "Restarts and forks"):

* `auto` (the default) links runs whose source names share a stem: the name with a restart
  or segment suffix taken off (`-run-002`, `_seg3`, ` restart`, `-resumed-2`, `(2)`, a
  separator and a number), or one stem followed by a separator at the start of the other
  (`65b` and `65b-spike-branch`). Names alone never link: the runs must also be placeable by
  their steps (below). Runs with unrelated names are left apart (a chart export comparing
  experiments is the common case); a log line says when their steps would chain.
* `stitch` (`--stitch`) places every run of the import, names ignored.
* `none` (`--no-stitch`) links nothing.

Placement, in order of first step: a run B that starts after run A started and inside A's
step range (first(A) < first(B) <= last(A)) is a *fork* of A (of the latest-starting such A
when several cover it); a run that starts after every earlier run ended *continues* the one
that ended last. `resumed_from_step` is the parent's last logged step before B's first step:
the trainer's meaning (a run resumed from the checkpoint of step k logs k+1 first), so the
`lineage_steps` view replaces the parent's later steps with B's and holds no step twice. A run
that starts at the same step as the earliest run cannot continue anything: `auto` leaves it a
root, `stitch` refuses the import.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from k2repro.errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    from k2repro.importers.parsed import ImportedRun

log = logging.getLogger(__name__)

MODES = ("auto", "stitch", "none")
EVENT_KIND = "stitch"

_SEP = r"[\s_\-.:#/]"
# One restart/segment suffix at the end of a name: a keyword with an optional number
# (`-restart`, `_resumed2`, ` branch 3`), a segment word with a number (`-run-002`, `seg3`,
# `-part_2`), a bare number after a separator (`-002`), or one in brackets (`(2)`).
_SUFFIX = re.compile(
    rf"(?:{_SEP}*(?:restart(?:ed)?|resume[ds]?|fork(?:ed)?|branch|rerun|retry|cont(?:inued|inuation)?)"
    rf"(?:{_SEP}*\d+)?"
    rf"|{_SEP}*(?:run|seg|segment|part|attempt|try|chunk){_SEP}*\d+"
    rf"|{_SEP}+\d+"
    r"|\s*[(\[]\s*\d+\s*[)\]])\s*$",
    re.IGNORECASE)


def stem(label: str) -> str:
    """A run name without its restart/segment suffixes, lower-cased (`OLMo-7B-run-002` ->
    `olmo-7b`, `65b restart 2` -> `65b`, `run_3` -> ``)."""
    s = label.strip().lower()
    while True:
        t = _SUFFIX.sub("", s).rstrip()
        if t == s:
            return s
        s = t


def related(a: str, b: str) -> bool:
    """Whether two stems name one logical run: equal, or one is the other plus a separator and
    more (`65b` / `65b-spike-branch`)."""
    if a == b:
        return True
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return bool(short) and long_.startswith(short) and bool(re.match(_SEP, long_[len(short)]))


@dataclass(frozen=True)
class Link:
    """Run `child` (an index into the import's runs) continues or branches from `parent` (an
    index), or from the store run `external` (`--parent`)."""

    child: int
    parent: int | None
    resumed_from_step: int
    rule: str          # auto | stitch | parent
    relation: str      # continuation | fork
    external: str | None = None
    stem: str | None = None

    def detail(self, runs: Sequence[ImportedRun], parent_id: str) -> dict[str, Any]:
        """The `stitch` event's detail: what forensics cites for this link."""
        c = runs[self.child]
        d: dict[str, Any] = {"parent": parent_id, "resumed_from_step": self.resumed_from_step,
                             "rule": self.rule, "relation": self.relation,
                             "source_run": c.source_run, "first_step": _first(c),
                             "last_step": _last(c)}
        if self.parent is not None:
            p = runs[self.parent]
            d.update(parent_source_run=p.source_run, parent_first_step=_first(p),
                     parent_last_step=_last(p))
        if self.stem is not None:
            d["stem"] = self.stem
        return d


def _first(r: ImportedRun) -> int:
    return int(r.steps[0].as_py())


def _last(r: ImportedRun) -> int:
    return int(r.steps[-1].as_py())


def _last_before(r: ImportedRun, step: int) -> int | None:
    import numpy as np

    s = r.steps.to_numpy(zero_copy_only=False)
    i = int(np.searchsorted(s, step, side="left"))
    return int(s[i - 1]) if i > 0 else None


def _families(runs: Sequence[ImportedRun], idx: list[int]) -> list[list[int]]:
    """Groups of runs whose names are related (connected through `related`)."""
    stems = {i: stem(runs[i].source_run or "") for i in idx}
    group = {i: i for i in idx}

    def find(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for a_pos, a in enumerate(idx):
        for b in idx[a_pos + 1:]:
            if related(stems[a], stems[b]):
                group[find(b)] = find(a)
    out: dict[int, list[int]] = {}
    for i in idx:
        out.setdefault(find(i), []).append(i)
    return list(out.values())


def _place(runs: Sequence[ImportedRun], members: list[int]) -> list[tuple[int, int | None, str]]:
    """(child, parent or None, relation) for each member, in order of first step."""
    order = sorted(members, key=lambda i: (_first(runs[i]), _last(runs[i]), i))
    out: list[tuple[int, int | None, str]] = []
    for pos, b in enumerate(order):
        fb = _first(runs[b])
        earlier = [a for a in order[:pos] if _first(runs[a]) < fb]
        if not earlier:
            out.append((b, None, ""))
            continue
        covering = [a for a in earlier if _last(runs[a]) >= fb]
        if covering:
            parent = max(covering, key=lambda a: (_first(runs[a]), a))
            out.append((b, parent, "fork"))
        else:
            parent = max(earlier, key=lambda a: (_last(runs[a]), _first(runs[a]), a))
            out.append((b, parent, "continuation"))
    return out


def plan(runs: Sequence[ImportedRun], mode: str = "auto") -> list[Link]:
    """The links between the runs of one import (never to a run outside it). BadInputError
    when `stitch` is asked for and the runs cannot form one lineage."""
    if mode not in MODES:
        raise BadInputError(f"stitch mode must be one of {', '.join(MODES)}, got {mode!r}")
    idx = [i for i, r in enumerate(runs) if r.n_steps]
    if mode == "none" or len(idx) < 2:
        return []
    if mode == "stitch":
        groups, rule = [idx], "stitch"
    else:
        groups, rule = _families(runs, idx), "auto"
    links: list[Link] = []
    for members in groups:
        placed = _place(runs, members)
        roots = [runs[b].source_run for b, p, _ in placed if p is None]
        if mode == "stitch" and len(roots) > 1:
            raise BadInputError(
                f"--stitch: runs {', '.join(repr(r) for r in roots)} all start at step "
                f"{_first(runs[placed[0][0]])}, so none of them continues another; import them "
                "apart (--no-stitch) or one at a time (--run)")
        if mode == "auto" and len(roots) > 1:
            log.info("runs %s share a name stem but start at the same step: left unlinked", roots)
        st = stem(runs[members[0]].source_run or "") if rule == "auto" else None
        for b, p, relation in placed:
            if p is None:
                continue
            k = _last_before(runs[p], _first(runs[b]))
            if k is None:  # cannot happen: the parent started before the child
                continue
            links.append(Link(b, p, k, rule, relation, stem=st))
    if mode == "auto" and len(groups) > 1:
        loose = _place(runs, idx)
        if any(p is not None for _, p, _ in loose):
            log.warning("some runs of this import look like restarts by their steps but their "
                        "names share no stem; pass --stitch to link them")
    return sorted(links, key=lambda lk: (_first(runs[lk.child]), lk.child))


def roots(runs: Sequence[ImportedRun], links: Sequence[Link]) -> list[int]:
    """Indices of the runs (with steps) that have no parent in `links`."""
    children = {lk.child for lk in links}
    return sorted((i for i, r in enumerate(runs) if r.n_steps and i not in children),
                  key=lambda i: (_first(runs[i]), i))


def link_to_store(store_root: Any, runs: Sequence[ImportedRun], links: Sequence[Link],
                  ref: str) -> Link:
    """The link `--parent REF` adds: the import's root continues the store run REF from REF's
    last logged step before the root's first step. BadInputError (one line) when REF is not a
    run of the store, when the import has several roots, or when REF has no step before."""
    from pathlib import Path

    root_dir = Path(store_root)
    if not root_dir.is_dir():
        raise BadInputError(f"--parent {ref}: no run '{ref}' (store {root_dir} does not exist)")
    from k2repro.audit.store import open_store

    store = open_store(root_dir)
    try:
        parent_id = store.resolve_run_id(ref)
        top = roots(runs, links)
        if not top:
            raise BadInputError(f"--parent {ref}: the import has no steps to continue from it")
        if len(top) > 1:
            names = ", ".join(repr(runs[i].source_run) for i in top[:5])
            raise BadInputError(f"--parent {ref}: this import holds {len(top)} unlinked runs "
                                f"({names}); link them with --stitch or import one with --run")
        first = _first(runs[top[0]])
        row = store.execute("SELECT max(step) FROM steps WHERE run_id = ? AND step < ?",
                            [parent_id, first]).fetchone()
    finally:
        store.close()
    k = row[0] if row else None
    if k is None:
        raise BadInputError(f"--parent {ref}: run {parent_id} has no step before step {first}, "
                            "where this import starts")
    return Link(top[0], None, int(k), "parent", "continuation", external=parent_id)


def describe(runs: Sequence[ImportedRun], links: Sequence[Link]) -> list[list[Any]]:
    """The links as plain data for the import's options hash: what the store will hold
    (child, parent, resume step), not which rule found it."""
    return [[runs[lk.child].source_run,
             runs[lk.parent].source_run if lk.parent is not None else f"run:{lk.external}",
             lk.resumed_from_step] for lk in links]
