"""Replay: re-run a recorded step range and prove, step by step, that it reproduces.

`plan_replay` does every check that needs no training (run, steps, starting state, checkpoint
manifest, data manifest, world size) and raises a one-line error (exit 2) on the first
problem, so nothing is launched against a tampered checkpoint or changed data. `run_replay`
then trains the range as a new run (`source=replay`, `parent_run_id` = the replayed run)
through `k2repro train --params` (torchrun for several ranks) and compares every step with
`tools.compare.compare_steps`.

The starting state is the newest checkpoint of a step before A (step 0: the initial state,
rebuilt from the seed), so that steps A..B are all re-run; steps between that checkpoint and
A are re-run but not compared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2repro.audit import lineage
from k2repro.errors import BadInputError, CheckpointError, K2ReproError
from k2repro.tools.compare import Comparison, compare_steps

if TYPE_CHECKING:  # pragma: no cover
    from k2repro.audit.store import Store

Progress = Callable[[str], None]


class ReplayTrainingFailed(K2ReproError):
    """The replay's training process failed (its own error was printed above)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code if exit_code in (2, 3) else 2


@dataclass
class ReplayPlan:
    """Everything decided before training: what runs, from where, at which world size."""

    run_id: str
    store_root: Path
    from_step: int
    to_step: int
    start_step: int  # 0: the initial state
    checkpoint: Path | None
    checkpoint_run_id: str | None
    world_size: int  # the original's
    nproc: int  # the replay's
    tolerance: float
    config: dict[str, Any]
    threads: str | None
    data_checked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def not_compared(self) -> list[int]:
        """Steps re-run on the way to A but not compared."""
        return list(range(self.start_step + 1, self.from_step))


def _node(d: dict, dotted: str) -> tuple[dict, str]:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    return d, leaf


def set_key(d: dict, dotted: str, value: Any) -> None:
    node, leaf = _node(d, dotted)
    node[leaf] = value


def get_key(d: dict, dotted: str, default: Any = None) -> Any:
    node: Any = d
    for p in dotted.split("."):
        if not isinstance(node, dict) or p not in node:
            return default
        node = node[p]
    return node


def verify_data(store: Store, run_id: str, packed_dir: str | None) -> list[str]:
    """Check every data artefact the run recorded against the files now; raise naming the
    first one whose sha256 changed or that is missing. Returns the artefacts checked.

    Artefacts of earlier stages (corpus, dedup output) that are not on this machine are
    skipped unless they are packed training data, which training reads."""
    from k2repro.core.hashing import sha256_file

    rows = store.execute("SELECT artifact, path, sha256 FROM data_manifest WHERE run_id = ? ORDER BY artifact",
                         [run_id]).fetchall()
    if not rows:
        raise BadInputError(f"run '{run_id}' recorded no data manifest: its data cannot be verified")
    checked: list[str] = []
    seen: set[str] = set()
    for artifact, path, sha in rows:
        if artifact in seen:
            continue
        seen.add(artifact)
        cands = [Path(path)] if path else []
        if path and not os.path.isabs(path) and packed_dir:
            cands.append(Path(packed_dir) / path)
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            if str(artifact).startswith("packed/train"):
                raise BadInputError(f"data artefact {artifact} of run '{run_id}' is missing: {path} not found "
                                    f"(paths are relative to the working directory the run started in)")
            continue
        now = sha256_file(found)
        if sha and now != sha:
            raise BadInputError(f"data artefact {artifact} ({found}) changed since run '{run_id}': "
                                f"sha256 {now[:12]}… now, {sha[:12]}… recorded")
        checked.append(str(artifact))
    return checked


def _recorded_steps(store: Store, run_id: str) -> list[int]:
    return [int(r[0]) for r in store.execute(
        "SELECT DISTINCT step FROM steps WHERE run_id = ? ORDER BY step", [run_id]).fetchall()]


def _start_candidates(store: Store, row: dict, cfg: dict, from_step: int) -> list[tuple[int, str | None, str | None]]:
    """(step, run id, recorded path) of every state before `from_step` in this run's history;
    run id None for the initial state."""
    rid = row["run_id"]
    cands: list[tuple[int, str | None, str | None]] = []
    for step, path in store.execute("SELECT step, path FROM checkpoints WHERE run_id = ? ORDER BY step",
                                    [rid]).fetchall():
        if int(step) <= from_step - 1:
            cands.append((int(step), rid, path))
    k = row.get("resumed_from_step")
    parent = row.get("parent_run_id")
    if k is not None and parent:
        # the state this run started from: its parent's checkpoint of step k
        hint = None
        ev = store.execute("SELECT detail FROM events WHERE run_id = ? AND kind = 'resume' LIMIT 1", [rid]).fetchone()
        if ev and ev[0]:
            hint = json.loads(ev[0]).get("checkpoint")
        if int(k) <= from_step - 1:
            cands.append((int(k), parent, hint))
    else:
        cands.append((0, None, None))  # a fresh run: the initial state (its deferrals are in its config)
    return cands


def plan_replay(store: Store, ref: str, from_step: int, to_step: int, tolerance: float = 0.0,
                allow_reshard: bool = False, nproc: int | None = None,
                progress: Progress | None = None) -> ReplayPlan:
    """Decide and verify everything before training; raises BadInputError/CheckpointError
    (exit 2) naming the problem. The checks run in this order, and the first failing one
    is the error: what the run is and holds, its config, the step range, the starting
    state, the data, the world size."""
    say = progress or (lambda _m: None)
    rid = store.resolve_run_id(ref)
    row = store.run(rid)
    cfg, typed, notes = _replay_config(rid, row, from_step, to_step)
    _check_range(store, rid, row, typed, from_step, to_step)
    start, ckpt_path, ckpt_run = _starting_state(store, rid, row, cfg, from_step, notes)
    _verify_start(ckpt_path, start, say)
    checked = verify_data(store, rid, get_key(cfg, "data.packed_dir"))
    say(f"data manifest verified: {', '.join(checked)}")
    ws, target = _world_sizes(rid, row, nproc, allow_reshard, tolerance)
    env = store.env(rid, 0)
    return ReplayPlan(run_id=rid, store_root=Path(store.root), from_step=from_step, to_step=to_step,
                      start_step=start, checkpoint=ckpt_path, checkpoint_run_id=ckpt_run, world_size=ws,
                      nproc=target, tolerance=tolerance, config=cfg, threads=env.get("torch.num_threads"),
                      data_checked=checked, notes=notes)


def _replay_config(rid: str, row: dict, from_step: int, to_step: int) -> tuple[dict, Any, list[str]]:
    """(stored config, typed config, notes) of a run that can be replayed over A..B; a config
    that rebuilds to another hash is a note, not an error."""
    from k2repro.audit.capability import capability_line
    from k2repro.config.load import config_hash, from_dict
    from k2repro.errors import ConfigError

    source = row.get("source") or "train"
    refuse = capability_line("replay", rid, source)
    if refuse:
        raise BadInputError(refuse)
    if not row.get("config_json"):
        raise BadInputError(f"run '{rid}' recorded no config: nothing to replay")
    if from_step < 1 or to_step < from_step:
        raise BadInputError(f"--from-step {from_step} --to-step {to_step}: need 1 <= A <= B")
    cfg = json.loads(row["config_json"])
    try:
        typed = from_dict(cfg)  # the saved config merged onto the schema: types survive
    except ConfigError as exc:
        raise BadInputError(f"the stored config of run '{rid}' no longer fits the schema: {exc}") from None
    notes: list[str] = []
    if row.get("config_hash") and config_hash(typed) != row["config_hash"]:
        notes.append(f"the rebuilt config hashes to {config_hash(typed)}, the run recorded {row['config_hash']} "
                     f"(schema defaults changed, or a value was redacted)")
    return cfg, typed, notes


def _check_range(store: Store, rid: str, row: dict, typed: Any, from_step: int, to_step: int) -> None:
    """A..B must lie within the steps the run recorded and its train.max_steps."""
    steps = _recorded_steps(store, rid)
    if not steps:
        raise BadInputError(f"run '{rid}' recorded no steps")
    if from_step < steps[0] or to_step > steps[-1]:
        why = (f" (it resumed from step {row['resumed_from_step']} of run '{row['parent_run_id']}': replay that run "
               f"for earlier steps)" if row.get("resumed_from_step") is not None and from_step < steps[0] else "")
        raise BadInputError(f"run '{rid}' recorded steps {steps[0]}..{steps[-1]}; cannot compare "
                            f"{from_step}..{to_step}{why}")
    if to_step > typed.train.max_steps:
        raise BadInputError(f"--to-step {to_step} is beyond the run's train.max_steps={typed.train.max_steps}")


def _starting_state(store: Store, rid: str, row: dict, cfg: dict, from_step: int,
                    notes: list[str]) -> tuple[int, Path | None, str | None]:
    """(step, checkpoint folder, its run) of the newest usable state before A; (0, None, None)
    for the initial state. A pruned checkpoint is a note, and the search goes further back."""
    cands = sorted(_start_candidates(store, row, cfg, from_step), key=lambda c: c[0], reverse=True)
    ckpt_base = get_key(cfg, "ckpt.dir") or None
    for step, crun, recorded in cands:
        if crun is None:
            return 0, None, None
        path = lineage.checkpoint_dir(store, crun, step, recorded, ckpt_base)
        if path is None:
            notes.append(f"checkpoint of step {step} (run {crun}) is gone (pruned?): looking further back")
            continue
        return step, path, crun
    raise BadInputError(f"no usable checkpoint of run '{rid}' before step {from_step}: it resumed from step "
                        f"{row['resumed_from_step']} of run '{row.get('parent_run_id')}', whose checkpoint "
                        f"is gone, and its own checkpoints before step {from_step} are gone too")


def _verify_start(ckpt_path: Path | None, start: int, say: Progress) -> None:
    """Every file of the starting checkpoint against its manifest, and the step it holds."""
    if ckpt_path is None:
        say("starting from the initial state (step 0, rebuilt from the seed)")
        return
    from k2repro.core.ckpt_manifest import verify_checkpoint

    manifest = verify_checkpoint(ckpt_path)
    if int(manifest.get("step", -1)) != start:
        raise CheckpointError(f"checkpoint {ckpt_path} holds step {manifest.get('step')}, not {start}")
    say(f"checkpoint of step {start} verified: {ckpt_path} ({len(manifest['files'])} files)")


def _world_sizes(rid: str, row: dict, nproc: int | None, allow_reshard: bool,
                 tolerance: float) -> tuple[int, int]:
    """(the run's world size, the replay's): another one needs --allow-reshard and a tolerance,
    since the reduction order changes."""
    ws = int(row.get("world_size") or 1)
    target = int(nproc or ws)
    if target < 1:
        raise BadInputError(f"--nproc {target}: must be >= 1")
    if target != ws:
        if not allow_reshard:
            raise BadInputError(f"run '{rid}' trained at world size {ws}; --nproc {target} needs --allow-reshard")
        if tolerance <= 0:
            raise BadInputError(f"a replay at world size {target} of a world-size-{ws} run changes the reduction "
                                f"order and cannot be bit-exact: give --tolerance")
    return ws, target


def launch_config(plan: ReplayPlan, out_store: Path, checkpoints: bool = True,
                  overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The replay's config: the run's own, resumed from the plan's state, stopping at B,
    writing to `out_store`. Process faults (SIGKILL) inside the range are cleared: they stop
    a process, they do not change its numbers. `overrides` (dotted key -> value) are applied
    last: a counterfactual replay (forensics' causal check) changes what it tests."""
    cfg = json.loads(json.dumps(plan.config))
    set_key(cfg, "train.resume", str(plan.checkpoint.resolve()) if plan.checkpoint else "")
    set_key(cfg, "train.stop_at_step", plan.to_step)
    set_key(cfg, "train.dry_run", False)
    set_key(cfg, "audit.enabled", True)
    set_key(cfg, "audit.store", str(out_store.resolve()))
    set_key(cfg, "ckpt.dir", "")
    set_key(cfg, "parallel.nproc", plan.nproc)
    set_key(cfg, "run.name", f"{get_key(cfg, 'run.name', 'run')}-replay")
    if not checkpoints:
        set_key(cfg, "ckpt.interval", 0)
        set_key(cfg, "ckpt.final", False)
    kill = int(get_key(cfg, "faults.kill_step", 0) or 0)
    if plan.start_step < kill <= plan.to_step:
        set_key(cfg, "faults.kill_step", 0)
    for k, v in (overrides or {}).items():
        set_key(cfg, k, v)
    return cfg


def train_replay(plan: ReplayPlan, out_store: Path, checkpoints: bool = True,
                 progress: Progress | None = None, overrides: dict[str, Any] | None = None) -> tuple[str, float]:
    """Train the plan's range as a new run; returns (replay run id, wall seconds)."""
    import yaml

    say = progress or (lambda _m: None)
    cfg = launch_config(plan, out_store, checkpoints, overrides)
    from k2repro.train.launchenv import PER_LAUNCH, LaunchEnv

    env = dict(os.environ, **LaunchEnv(source="replay", parent_run_id=plan.run_id).to_environ(), PYTHONUNBUFFERED="1")
    if plan.threads and plan.nproc == 1:
        env["OMP_NUM_THREADS"] = plan.threads  # the thread count can change CPU reduction order
    for k in PER_LAUNCH:  # a replay is a launch of its own
        env.pop(k, None)
    with tempfile.TemporaryDirectory(prefix="k2repro-replay-") as tmp:
        params = Path(tmp) / "config.yaml"
        params.write_text(yaml.safe_dump(cfg, sort_keys=True))
        errlog = Path(tmp) / "stderr.log"
        cmd = [sys.executable, "-m", "k2repro", "train", "--params", str(params)]
        say(f"training steps {plan.start_step + 1}..{plan.to_step} at world size {plan.nproc}")
        t0 = time.perf_counter()
        replay_id = None
        with open(errlog, "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                if line.startswith("run_id="):
                    replay_id = line.split("=", 1)[1]
                    say(f"replay run {replay_id}")
                elif line.startswith("step "):
                    say(line)
            code = proc.wait()
        wall = time.perf_counter() - t0
        if code != 0 or replay_id is None:
            tail = [ln for ln in errlog.read_text(errors="replace").splitlines() if ln.strip()][-1:]
            raise ReplayTrainingFailed(f"replay training exited with code {code}"
                                       + (f": {tail[0]}" if tail else ""), code)
    return replay_id, wall


def compare_replay(store: Store, plan: ReplayPlan, out: Store, replay_id: str) -> Comparison:
    """Every step of [A, B]: the replay against the original."""
    a, b = plan.run_id, replay_id
    lo, hi = plan.from_step, plan.to_step
    q_steps = "SELECT * FROM steps WHERE run_id = ? AND step BETWEEN ? AND ?"
    q_layers = "SELECT * FROM layer_stats WHERE run_id = ? AND step BETWEEN ? AND ?"
    return compare_steps(store.sql(q_steps, [a, lo, hi]), out.sql(q_steps, [b, lo, hi]),
                         store.sql(q_layers, [a, lo, hi]), out.sql(q_layers, [b, lo, hi]),
                         lo, hi, plan.tolerance)


def replay(store_path: str | Path | None, ref: str, from_step: int, to_step: int, tolerance: float = 0.0,
           allow_reshard: bool = False, nproc: int | None = None, out_store: str | Path | None = None,
           checkpoints: bool = True, progress: Progress | None = None,
           overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plan, verify, train, compare. Returns the report (`--json`'s object); its `exit_code`
    is 0 when every step matched within the tolerance, 1 when not. `overrides` (dotted config
    keys) make a counterfactual replay; the report then lists them."""
    from k2repro.audit.store import open_store
    from k2repro.core.layout import default_store

    root = Path(store_path) if store_path is not None else default_store()
    if not root.is_dir():
        raise BadInputError(f"store {root} does not exist")
    with open_store(root) as store:
        plan = plan_replay(store, ref, from_step, to_step, tolerance, allow_reshard, nproc, progress)
        for n in plan.notes:
            (progress or (lambda _m: None))(f"note: {n}")
        dest = Path(out_store) if out_store is not None else root
        replay_id, wall = train_replay(plan, dest, checkpoints, progress, overrides)
        if progress:
            progress(f"comparing steps {from_step}..{to_step}")
        with open_store(dest) as out:
            cmp = compare_replay(store, plan, out, replay_id)
    report: dict[str, Any] = {
        "run_id": plan.run_id, "replay_run_id": replay_id, "store": str(root), "out_store": str(dest),
        "from_step": from_step, "to_step": to_step, "start_step": plan.start_step,
        "checkpoint": str(plan.checkpoint) if plan.checkpoint else None,
        "checkpoint_run_id": plan.checkpoint_run_id,
        "rerun_not_compared": plan.not_compared, "world_size": plan.world_size, "replay_world_size": plan.nproc,
        "data_verified": plan.data_checked, "notes": plan.notes, "train_wall_s": wall,
        "overrides": dict(overrides or {}),
        **cmp.to_dict(),
    }
    report["exit_code"] = 0 if cmp.within_tolerance and cmp.steps_compared > 0 else 1
    return report


__all__ = ["ReplayPlan", "plan_replay", "launch_config", "train_replay", "compare_replay", "replay",
           "verify_data", "ReplayTrainingFailed"]
