"""The store's lifecycle: remove runs (by id, name pattern, age), compact small segments,
migrate older schema versions. See docs/store-lifecycle.md.

`plan_gc` decides everything (which runs, which folders, what is kept and why); `apply_gc`
removes exactly the plan's folders, so `--dry-run` shows what the real call removes. A run
whose derived status is `running` is never removed or compacted. Each folder goes in two
steps: renamed to a dot name (readers stop seeing the run at once: views skip dot folders)
and then deleted.

No torch here.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from k2repro.audit import schema as S
from k2repro.core.ids import check_run_id
from k2repro.core.layout import META_DIR, inside_dir
from k2repro.errors import BadInputError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SKIP_DIRS = {META_DIR, "checkpoints", "_heartbeat"}


def parse_age(text: str) -> float:
    """'7d', '12h', '30m', '90s', '2w' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not m:
        raise BadInputError(f"--older-than {text!r}: expected a number and a unit (s, m, h, d, w), e.g. 7d")
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_folders(root: Path) -> dict[str, list[Path]]:
    """run id -> every folder of that run in the store: its own folder and the ones other
    stages appended to (any folder named after a run that holds table folders), at any depth.
    Dot folders (staging, removal in progress) are skipped."""
    out: dict[str, list[Path]] = {}
    root = Path(root)
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here != root and ("_run.json" in filenames or any(d in S.TABLES for d in dirnames)):
            out.setdefault(here.name, []).append(here)
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS]
    return out


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


@dataclass
class GcPlan:
    store: Path
    remove: list[dict[str, Any]] = field(default_factory=list)
    kept: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def paths(self) -> list[str]:
        return [p for r in self.remove for p in r["paths"]]

    def to_dict(self) -> dict[str, Any]:
        return {"store": str(self.store), "remove": self.remove, "kept": self.kept, "notes": self.notes,
                "paths": self.paths(), "bytes": sum(r["bytes"] for r in self.remove)}


def _ckpt_dir_of(config_json: str | None, run_id: str) -> Path | None:
    """`<ckpt.dir>/<run_id>` when the run kept its checkpoints outside the store (a claim of a
    stored row: `_trainer_checkpoints` decides whether that folder may go)."""
    if not config_json:
        return None
    try:
        d = (json.loads(config_json).get("ckpt") or {}).get("dir") or ""
        check_run_id(run_id)
    except (json.JSONDecodeError, AttributeError, BadInputError):
        return None
    return Path(d) / run_id if d and isinstance(d, str) else None


_STEP_DIR = re.compile(r"^step_\d+$")
_STEP_TMP = re.compile(r"^\.step_\d+\.tmp$")


def _trainer_checkpoints(ck: Path, run_id: str) -> str | None:
    """None when `ck` (`<ckpt.dir>/<run_id>`, outside the store) holds exactly what the trainer
    writes there for this run: `checkpoints/` with `step_N/` folders whose manifest names this
    run (and `.step_N.tmp` leftovers of an interrupted save). Otherwise why it is left alone:
    the path comes from a stored row, which an imported bundle could have forged, so gc never
    deletes a folder outside the store that is not provably this run's checkpoints."""
    if ck.is_symlink() or not ck.is_dir():
        return "not a plain folder"
    top = sorted(os.listdir(ck))
    if top != ["checkpoints"] or (ck / "checkpoints").is_symlink():
        return f"it holds {', '.join(top[:3]) or 'nothing'}, not only checkpoints/"
    for name in sorted(os.listdir(ck / "checkpoints")):
        d = ck / "checkpoints" / name
        if d.is_symlink() or not d.is_dir():
            return f"checkpoints/{name} is not a checkpoint folder"
        if _STEP_TMP.match(name):
            continue
        if not _STEP_DIR.match(name):
            return f"checkpoints/{name} is not a checkpoint folder"
        try:
            owner = json.loads((d / "manifest.json").read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            return f"checkpoints/{name} has no readable manifest.json"
        if owner != run_id:
            return f"checkpoints/{name} belongs to run {owner!r}"
    return None


def plan_gc(store_root: str | Path, run_ids: list[str] | None = None, name: str | None = None,
            older_than_s: float | None = None, now: datetime | None = None) -> GcPlan:
    """Select runs by id (exact, unique prefix or unique name), name glob and age (every
    given criterion must hold), and list every folder that removing them deletes."""
    from k2repro.audit.store import open_store

    if not run_ids and name is None and older_than_s is None:
        raise BadInputError("gc: say which runs to remove: --run ID, --name PATTERN or --older-than AGE")
    root = Path(store_root)
    if not root.is_dir():
        raise BadInputError(f"store {root} does not exist")
    now = now or datetime.now(timezone.utc)
    plan = GcPlan(root)
    with open_store(root) as store:
        wanted: set[str] | None = None
        if run_ids:
            wanted = {store.resolve_run_id(r) for r in run_ids}
        rows = store.execute(
            "SELECT run_id, name, status, started_at, ended_at, config_json FROM runs ORDER BY started_at, run_id"
        ).fetchall()
        children = dict(store.execute(
            "SELECT parent_run_id, list(run_id ORDER BY run_id) FROM runs_raw "
            "WHERE parent_run_id IS NOT NULL GROUP BY parent_run_id").fetchall())
    folders = run_folders(root)
    for run_id, rname, status, started, ended, config_json in rows:
        if wanted is not None and run_id not in wanted:
            continue
        if name is not None and not fnmatch.fnmatchcase(rname or "", name):
            continue
        if older_than_s is not None:
            ref = ended or started
            age = (now - ref).total_seconds() if ref is not None else None
            if age is None or age < older_than_s:
                continue
        if status == "running":
            plan.kept.append({"run_id": run_id, "name": rname, "reason": "running"})
            continue
        paths = list(folders.get(run_id, []))
        ck = _ckpt_dir_of(config_json, run_id)
        if ck is not None and ck.is_dir() and not any(inside_dir(ck, p) for p in paths):
            why = _trainer_checkpoints(ck, run_id)
            if why is None:
                paths.append(ck)
            else:
                plan.notes.append(f"run {run_id}: left {ck} (named by its ckpt.dir, not a run folder of the store): "
                                  f"{why}")
        plan.remove.append({
            "run_id": run_id, "name": rname, "status": status,
            "started_at": started.isoformat() if started else None,
            "paths": [str(p) for p in paths], "bytes": sum(_du(p) for p in paths)})
    removed = {r["run_id"] for r in plan.remove}
    _whole_imports(plan, removed)
    for r in plan.remove:
        left = [c for c in children.get(r["run_id"], []) if c not in removed]
        if left:
            plan.notes.append(f"run {r['run_id']} is the parent of {', '.join(left)}: their replays from "
                              f"its checkpoints will no longer find them")
    return plan


def _whole_imports(plan: GcPlan, removed: set[str]) -> None:
    """A bundle import (`<store>/bundle-*/` with `_import.json`) whose every launch goes is
    removed whole, its shipped data included; otherwise only the launches' folders go."""
    containers: dict[Path, list[dict[str, Any]]] = {}
    for r in plan.remove:
        for p in r["paths"]:
            parent = Path(p).parent
            # only a bundle-* folder strictly inside the store is an import container
            if parent.name.startswith("bundle-") and parent.resolve() != plan.store.resolve() \
                    and inside_dir(parent, plan.store) and (parent / "_import.json").is_file():
                containers.setdefault(parent, []).append(r)
    for c, entries in containers.items():
        try:
            runs = json.loads((c / "_import.json").read_text()).get("runs", [])
        except (OSError, json.JSONDecodeError):
            continue
        if not runs or not set(runs) <= removed:
            continue
        inner = {str(c / rid) for rid in runs}
        for r in entries:
            r["paths"] = [p for p in r["paths"] if p not in inner]
        entries[-1]["paths"].append(str(c))
        entries[-1]["bytes"] = entries[-1]["bytes"] + _du(c / "data") + _du(c / "_import.json")


def apply_gc(plan: GcPlan) -> dict[str, Any]:
    """Remove exactly the plan's folders (re-checking that no run started running meanwhile)."""
    from k2repro.audit.store import open_store

    ids = [r["run_id"] for r in plan.remove]
    if ids:
        with open_store(plan.store) as store:
            running = {r[0] for r in store.execute(
                "SELECT run_id FROM runs WHERE status = 'running' AND list_contains(?, run_id)", [ids]).fetchall()}
    else:
        running = set()
    removed: list[dict[str, Any]] = []
    for r in plan.remove:
        if r["run_id"] in running:
            plan.kept.append({"run_id": r["run_id"], "name": r["name"], "reason": "running"})
            continue
        for p in r["paths"]:
            remove_tree(Path(p))
        removed.append(r)
    out = plan.to_dict()
    out["remove"] = removed
    out["paths"] = [p for r in removed for p in r["paths"]]
    out["bytes"] = sum(r["bytes"] for r in removed)
    out["removed_run_ids"] = [r["run_id"] for r in removed]
    out["dry_run"] = False
    return out


def remove_tree(path: Path) -> None:
    """Rename to a dot name first (one atomic step out of every view), then delete."""
    if not path.exists():
        return
    hidden = path.parent / f".k2gc-{path.name}-{secrets.token_hex(4)}"
    os.rename(path, hidden)
    shutil.rmtree(hidden)


def compact(store_root: str | Path, run_ids: list[str] | None = None, dry_run: bool = False,
            small_bytes: int | None = None, offline: bool = False) -> dict[str, Any]:
    """Merge small segments of every non-running run (or the given ones)."""
    from k2repro.audit import compact as C
    from k2repro.audit.store import open_store
    from k2repro.audit.swaps import restore_hidden_tables

    root = Path(store_root)
    if not root.is_dir():
        raise BadInputError(f"store {root} does not exist")
    small = C.SMALL_BYTES if small_bytes is None else int(small_bytes)
    with open_store(root) as store:
        wanted = {store.resolve_run_id(r) for r in run_ids} if run_ids else None
        status = dict(store.execute("SELECT run_id, status FROM runs").fetchall())
    folders = run_folders(root)
    report: dict[str, Any] = {"store": str(root), "dry_run": dry_run, "runs": [], "kept": []}
    if not dry_run:
        C.require_exchange(root, offline)
    report["restored"] = []
    for run_id, dirs in sorted(folders.items()):
        if wanted is not None and run_id not in wanted:
            continue
        st = status.get(run_id)
        if st == "running":
            report["kept"].append({"run_id": run_id, "reason": "running"})
            continue
        for d in dirs:
            if not dry_run:  # a table an older, unjournaled compaction left hidden comes back first
                report["restored"] += restore_hidden_tables(d)
            plan = C.plan_run(d, small)
            if not plan:
                continue
            entry: dict[str, Any] = {"run_id": run_id, "run_dir": str(d), "plan": plan}
            if not dry_run:
                entry.update(C.compact_run(d, small, offline=offline))
            report["runs"].append(entry)
    report["segments_merged"] = sum(p["segments"] for r in report["runs"] for p in r["plan"])
    return report


__all__ = ["GcPlan", "plan_gc", "apply_gc", "compact", "parse_age", "run_folders", "remove_tree"]
