"""`make faults`: a seeded fault campaign against real processes, files and filesystems, with
figures written to reports/reliability.{md,json}.

Sections (each can be run alone with --sections):
- kills:   SIGKILLs at seeded moments of tiny runs (`faults.kill_step/rank/phase` inside a step,
           during a flush, during a checkpoint write), each followed by a resume; counts the runs
           whose store opened, whose flushed rows are there exactly once, whose checkpoints are
           whole and valid or absent, and whose resumed losses are bit-identical to one
           uninterrupted reference run. Kills are chained (a resume is itself killed later), so
           20 kills cost about 23 launches.
- dvc:     SIGKILL of the whole process group of `dvc repro train` from outside, in a temporary
           git repo with a slice of the corpus; then `dvc repro train` again must recover.
- disk:    a full disk (a small tmpfs when mount is allowed, else a per-file size limit) while
           the audit sink and the checkpointer write.
- corrupt: truncated, flipped and deleted checkpoints, store segments and data artefacts.
- inputs:  bad inputs across the CLI, configs, imports and SQL: exit code, message, and the
           sha256 of the store and working folder before and after.
- load:    4 reader processes querying at 10 queries/s while 2 runs train into one store.
- forged:  forged bundles (issue 24's findings 1-5 and 8, built by tests/integration/forge.py from a
           real export and resealed): each refused by `verify-bundle` / `import bundle`, nothing
           written outside the store, no row of a run already there changed.
- secrets: fake credentials planted in env, argv, a config value, a tag, an exception message and
           the git diff of a real run, then resumed, reported and exported: every byte of the
           store (decoded Parquet too), the reports and the bundle is searched; any hit fails.
- maintenance: `gc --compact` (offline and online) SIGKILLed at each point of its journaled swap;
           the next open or gc must bring back every row (count and hash per table).

    .venv/bin/python scripts/fault_campaign.py                      # the full campaign
    .venv/bin/python scripts/fault_campaign.py --kills 3 --bad-inputs 5 --nproc 1 \\
        --sections kills,inputs --out /tmp/small                      # what `make test` runs
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import machine  # noqa: E402
from tests.conftest import dirty_repo, make_packed, tiny_overrides  # noqa: E402

PY = sys.executable
SECTIONS = ("kills", "dvc", "disk", "corrupt", "inputs", "load", "forged", "secrets", "maintenance")
PHASES = ("step", "flush", "checkpoint")
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "K2REPRO_STORE"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1", **extra)
    env["PATH"] = str(Path(PY).parent) + os.pathsep + env.get("PATH", "")
    return env


def first_line(text: str, limit: int = 240) -> str:
    """The last meaningful line of stderr (DuckDB appends `LINE 1: ...` and a `^^^` marker)."""
    lines = [ln.strip() for ln in text.strip().splitlines()
             if ln.strip() and not ln.strip().startswith(("^", "LINE "))]
    return (lines[-1] if lines else "")[:limit]


def exc_line(exc: BaseException, limit: int = 240) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:limit]


def kill_group(pid: int) -> None:
    """SIGKILL a process group this script started (its own session); gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@dataclass
class Launch:
    rc: int
    run_id: str | None
    stdout: str
    stderr: str
    seconds: float


def k2(args: list[str], cwd: Path = REPO, timeout: float = 600, env: dict | None = None) -> Launch:
    """Run the real CLI in its own session; whatever it leaves behind is killed afterwards."""
    t = time.time()
    proc = subprocess.Popen([PY, "-m", "k2repro", *args], cwd=cwd, env=env or child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        out, err = proc.communicate()
        err += f"\n[campaign] timed out after {timeout} s"
    finally:
        kill_group(proc.pid)
    m = re.search(r"run_id=(\S+)", out)
    return Launch(proc.returncode, m.group(1) if m else None, out, err, time.time() - t)


def copy_store(src: Path, dst: Path) -> None:
    """A copy of a store without the checkpoint folders (the `checkpoints` table stays)."""
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n.startswith(("step_", ".step_"))])


def tree_hash(root: Path) -> str:
    """sha256 over every file's relative path and content (and every folder's name)."""
    if not root.exists():
        return "absent"
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            h.update(f"d:{rel}\n".encode())
        elif p.is_file():
            h.update(f"f:{rel}:{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def bits(values) -> list[int]:  # noqa: ANN001
    return np.asarray(values, dtype=np.float64).view(np.int64).tolist()


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


# ------------------------------------------------------------------------------- run inspection
@dataclass
class RunCheck:
    """What the store and the checkpoint folder say about one run after a kill or a resume."""

    run_id: str
    store_opened: bool = False
    store_error: str = ""
    status: str = ""
    parent_run_id: str | None = None
    resumed_from_step: int | None = None
    steps: list[int] = field(default_factory=list)
    loss_bits: list[int] = field(default_factory=list)
    grad_bits: list[int] = field(default_factory=list)
    batch_hash: list[str] = field(default_factory=list)
    row_problems: list[str] = field(default_factory=list)
    ckpt_final: list[int] = field(default_factory=list)
    ckpt_tmp: int = 0
    ckpt_tmp_complete: int = 0
    ckpt_problems: list[str] = field(default_factory=list)

    @property
    def rows_once(self) -> bool:
        return self.store_opened and not self.row_problems

    @property
    def ckpt_ok(self) -> bool:
        return self.store_opened and not self.ckpt_problems

    @property
    def max_step(self) -> int:
        return self.steps[-1] if self.steps else 0


def wait_not_running(store: Path, run_id: str, timeout: float = 15.0) -> str:
    import k2repro

    deadline = time.time() + timeout
    status = "?"
    while time.time() < deadline:
        with k2repro.open_store(store) as s:
            status = s.run(run_id)["status"]
        if status != "running":
            break
        time.sleep(0.3)
    return status


def inspect_run(store: Path, run_id: str, start: int, nproc: int, global_batch: int,
                layer_every: int, cwd: Path = REPO) -> RunCheck:
    """Open the store and check every invariant of a (possibly killed) run."""
    import k2repro
    from k2repro.core.ckpt_manifest import list_checkpoints, verify_checkpoint
    from k2repro.errors import CheckpointError

    rc = RunCheck(run_id)
    try:
        status = wait_not_running(store, run_id)
        with k2repro.open_store(store) as s:
            row = s.run(run_id)
            st = s.sql("SELECT step, loss, grad_norm, batch_hash FROM steps WHERE run_id = ? ORDER BY step",
                       [run_id])
            smp = s.sql("""SELECT rank, step, count(*) AS n, count(DISTINCT sample_id) AS d FROM sample_stats
                           WHERE run_id = ? GROUP BY rank, step ORDER BY rank, step""", [run_id])
            dup_pos = int(s.sql("""SELECT count(*) - count(DISTINCT (step, sample_id)) FROM sample_stats
                                   WHERE run_id = ?""", [run_id]).iloc[0, 0])
            lay = s.sql("""SELECT step, count(*) AS n, count(DISTINCT param) AS d FROM layer_stats
                           WHERE run_id = ? GROUP BY step ORDER BY step""", [run_id])
            ck_rows = s.sql("SELECT step, path FROM checkpoints WHERE run_id = ? ORDER BY step", [run_id])
        rc.store_opened = True
    except Exception as exc:  # the campaign counts it; it must not stop the campaign
        rc.store_error = exc_line(exc)
        return rc
    rc.status = status
    rc.parent_run_id = row.get("parent_run_id")
    rfs = row.get("resumed_from_step")
    rc.resumed_from_step = None if rfs is None or rfs != rfs else int(rfs)
    rc.steps = [int(x) for x in st["step"]]
    rc.loss_bits = bits(st["loss"])
    rc.grad_bits = bits(st["grad_norm"])
    rc.batch_hash = [str(x) for x in st["batch_hash"]]
    p = rc.row_problems
    if rc.steps != list(range(start + 1, start + 1 + len(rc.steps))):
        p.append(f"steps not each once from {start + 1}: {rc.steps[:4]}...{rc.steps[-3:]}")
    if st["loss"].isna().any() or st["batch_hash"].isna().any():
        p.append("torn steps rows (NULL loss or batch_hash)")
    per_rank = global_batch // nproc
    for r in range(nproc):
        sub = smp[smp["rank"] == r]
        got = [int(x) for x in sub["step"]]
        if got != list(range(start + 1, start + 1 + len(got))):
            p.append(f"rank {r} sample_stats steps not each once from {start + 1}")
        if len(sub) and not ((sub["n"] == per_rank) & (sub["d"] == per_rank)).all():
            p.append(f"rank {r} sample_stats: a step without exactly {per_rank} distinct samples")
    if dup_pos:
        p.append(f"{dup_pos} duplicate (step, sample_id) sample rows")
    if len(lay):
        if not (lay["n"] == lay["d"]).all() or lay["n"].nunique() != 1:
            p.append("layer_stats: a (step, param) twice or a step with missing tensors")
        lsteps = [int(x) for x in lay["step"]]
        first = (start // layer_every + 1) * layer_every
        if lsteps != list(range(first, first + layer_every * len(lsteps), layer_every)):
            p.append(f"layer_stats steps not each once: {lsteps[:4]}")
    # checkpoints: whole and valid under their final name, or absent; temp folders never listed
    ck_dir = store / run_id / "checkpoints"
    finals = sorted(d for d in ck_dir.glob("step_*") if d.is_dir()) if ck_dir.is_dir() else []
    tmps = sorted(d for d in ck_dir.glob(".step_*") if d.is_dir()) if ck_dir.is_dir() else []
    for d in finals:
        try:
            verify_checkpoint(d)
        except CheckpointError as exc:
            rc.ckpt_problems.append(f"final checkpoint {d.name} does not verify: {exc}")
    listed = {p_.name for _, p_ in list_checkpoints(ck_dir)}
    if listed != {d.name for d in finals}:
        rc.ckpt_problems.append(f"listed checkpoints {sorted(listed)} != final folders")
    for t in tmps:
        try:
            verify_checkpoint(t)
            rc.ckpt_tmp_complete += 1
        except CheckpointError:
            pass
    rc.ckpt_tmp = len(tmps)
    rc.ckpt_final = [int(d.name[5:]) for d in finals]
    for step, path in zip(ck_rows["step"], ck_rows["path"]):
        if not (cwd / path / "manifest.json").exists():  # a relative path is relative to where it trained
            rc.ckpt_problems.append(f"checkpoints row of step {step} points at a missing folder")
    return rc


def compare(ref: RunCheck, run: RunCheck) -> dict:
    """Bitwise loss, grad norm and batch hash of every step `run` recorded, against `ref`."""
    idx = {s: i for i, s in enumerate(ref.steps)}
    mism = [s for i, s in enumerate(run.steps) if s not in idx
            or ref.loss_bits[idx[s]] != run.loss_bits[i] or ref.grad_bits[idx[s]] != run.grad_bits[i]
            or ref.batch_hash[idx[s]] != run.batch_hash[i]]
    return {"steps_compared": len(run.steps), "mismatched_steps": mism[:10],
            "bit_identical": bool(run.steps) and not mism}


# ------------------------------------------------------------------------------------ kills
@dataclass
class KillPlan:
    steps: int
    flush_every: int
    ckpt_every: int
    nproc: int

    def pick(self, rng: np.random.Generator, start: int) -> dict | None:
        """A seeded kill after `start` (the resume point), late enough that the resumed run
        records at least one flush before it dies; None when the run is too close to its end."""
        lo = start + self.flush_every + 2
        hi = min(self.steps, lo + 2 * self.flush_every + 2)
        if lo > self.steps - self.flush_every:  # too close to the end: the chain's final resume
            return None
        phase = PHASES[int(rng.integers(len(PHASES)))]
        rank = int(rng.integers(self.nproc))
        every = {"flush": self.flush_every, "checkpoint": self.ckpt_every}.get(phase, 1)
        # not a checkpoint kill at the last step: a rank > 0 killed there leaves the final
        # checkpoint whole, and a resume from it has no step left to compare
        last = hi - 1 if phase == "checkpoint" and hi == self.steps else hi
        cands = [k for k in range(lo, last + 1) if k % every == 0]
        if not cands:
            phase, cands = "step", list(range(lo, hi + 1))
        return {"step": int(cands[int(rng.integers(len(cands)))]), "phase": phase, "rank": rank}


def newest_checkpoint(store: Path, run_ids: list[str]) -> tuple[int, str | None]:
    from k2repro.core.ckpt_manifest import list_checkpoints

    best: tuple[int, str | None] = (0, None)
    for rid in run_ids:
        for step, _ in list_checkpoints(store / rid / "checkpoints"):
            if step > best[0]:
                best = (step, rid)
    return best


def kills_section(work: Path, packed: Path, rng: np.random.Generator, n_kills: int, nproc: int,
                  steps: int) -> dict:
    store = work / "kills" / "store"
    plan = KillPlan(steps=steps, flush_every=4, ckpt_every=8, nproc=nproc)
    base = {"parallel.nproc": nproc, "train.max_steps": steps, "ckpt.interval": plan.ckpt_every,
            "audit.flush_every": plan.flush_every, "audit.layer_stats_every": plan.flush_every,
            "run.name": "campaign"}
    gb = 8

    def overrides(**extra: object) -> list[str]:
        return tiny_overrides(packed, store, **{**base, **extra})

    log(f"kills: reference run ({nproc} rank(s), {steps} steps) in the background")
    ref_proc = subprocess.Popen([PY, "-m", "k2repro", "train", *overrides(**{"run.name": "reference"})],
                                cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    launches: list[dict] = []  # every launch, in order, with what it was and what it left
    kills: list[dict] = []
    chain = 0
    while len(kills) < n_kills:
        chain += 1
        start, holder, chain_runs, prev = 0, None, [], None
        while len(kills) < n_kills:
            spec = plan.pick(rng, start)
            if spec is None:
                break
            extra = {"faults.kill_step": spec["step"], "faults.kill_phase": spec["phase"],
                     "faults.kill_rank": spec["rank"]}
            if holder:
                extra["train.resume"] = holder
            L = k2(["train", *overrides(**extra)], timeout=600)
            fired = L.rc != 0
            log(f"kills: #{len(kills) + 1} chain {chain}: {spec['phase']:>10} step {spec['step']:>3} "
                f"rank {spec['rank']} from step {start}: rc={L.rc} ({L.seconds:.0f} s) run {L.run_id}")
            rec = {"index": len(kills) + 1, "chain": chain, "kill": spec, "start_step": start,
                   "resume_target": holder, "run_id": L.run_id, "rc": L.rc, "fired": fired,
                   "seconds": round(L.seconds, 1), "stderr_tail": first_line(L.stderr)}
            if L.run_id is None:
                rec["check"] = {"store_opened": False, "store_error": "no run_id printed: " + first_line(L.stderr)}
                kills.append(rec)
                launches.append({"kind": "kill", "rec": rec, "check": None, "start": start})
                break
            chk = inspect_run(store, L.run_id, start, nproc, gb, plan.flush_every)
            completed = spec["step"] - 1 if spec["phase"] == "step" else spec["step"]
            rec.update(status=chk.status, store_opened=chk.store_opened, store_error=chk.store_error,
                       rows_once=chk.rows_once, row_problems=chk.row_problems,
                       recorded_to_step=chk.max_step, lost_steps=max(0, completed - chk.max_step),
                       ckpt_ok=chk.ckpt_ok, ckpt_problems=chk.ckpt_problems, ckpt_final=chk.ckpt_final,
                       ckpt_tmp=chk.ckpt_tmp, ckpt_tmp_complete=chk.ckpt_tmp_complete,
                       parent_run_id=chk.parent_run_id, resumed_from_step=chk.resumed_from_step)
            rec["lost_within_contract"] = fired and rec["lost_steps"] <= plan.flush_every
            if prev is not None:
                prev["resume_run_id"] = L.run_id
            launches.append({"kind": "kill", "rec": rec, "check": chk, "start": start, "holder": holder})
            kills.append(rec)
            prev = rec
            chain_runs.append(L.run_id)
            start, holder = newest_checkpoint(store, chain_runs)
        # the chain's last kill is followed by a resume that runs to the end
        extra = {"train.resume": holder} if holder else {}
        L = k2(["train", *overrides(**extra)], timeout=600)
        log(f"kills: chain {chain} final resume from step {start}: rc={L.rc} ({L.seconds:.0f} s) run {L.run_id}")
        chk = inspect_run(store, L.run_id, start, nproc, gb, plan.flush_every) if L.run_id else None
        fin = {"chain": chain, "run_id": L.run_id, "rc": L.rc, "start_step": start, "resume_target": holder,
               "seconds": round(L.seconds, 1), "stderr_tail": first_line(L.stderr)}
        if prev is not None:
            prev["resume_run_id"] = L.run_id
        launches.append({"kind": "final", "rec": fin, "check": chk, "start": start, "holder": holder})
    out, err = ref_proc.communicate(timeout=900)
    kill_group(ref_proc.pid)
    m = re.search(r"run_id=(\S+)", out)
    if ref_proc.returncode != 0 or not m:
        raise RuntimeError(f"reference run failed ({ref_proc.returncode}): {err[-2000:]}")
    ref = inspect_run(store, m.group(1), 0, nproc, gb, plan.flush_every)
    log(f"kills: reference {ref.run_id}: {len(ref.steps)} steps, status {ref.status}")
    # every launch's recorded steps against the reference, and the resume bookkeeping
    by_run = {la["rec"]["run_id"]: la for la in launches}
    for la in launches:
        if la["check"] is not None:
            la["rec"]["vs_reference"] = compare(ref, la["check"])
    for rec in kills:
        nxt = by_run.get(rec.get("resume_run_id"))
        if nxt is None:
            rec["resumed_bit_identical"] = False
            rec["resume"] = {"error": "no resume launch"}
            continue
        chk, nrec = nxt["check"], nxt["rec"]
        lineage_ok = chk is not None and (nxt["holder"] is None or (
            chk.parent_run_id == nxt["holder"] and chk.resumed_from_step == nxt["start"]))
        vs = nrec.get("vs_reference", {})
        rec["resume"] = {"run_id": nrec["run_id"], "rc": nrec["rc"], "from_step": nxt["start"],
                         "lineage_ok": lineage_ok, **vs}
        rec["resumed_bit_identical"] = bool(vs.get("bit_identical")) and lineage_ok
    for la in launches:
        if la["kind"] == "final":
            chk, fin = la["check"], la["rec"]
            fin["completed"] = bool(chk and fin["rc"] == 0 and chk.status == "completed"
                                    and chk.max_step == steps and chk.rows_once and chk.ckpt_ok)
    for rec in kills:
        rec["survived"] = all(rec.get(k) for k in ("fired", "store_opened", "rows_once", "ckpt_ok",
                                                    "resumed_bit_identical"))
    finals = [la["rec"] for la in launches if la["kind"] == "final"]
    return {"config": {"nproc": nproc, "max_steps": steps, "flush_every": plan.flush_every,
                       "ckpt_interval": plan.ckpt_every, "global_batch": gb, "model": "tiny_overrides (d_model 32)"},
            "reference_run": ref.run_id, "reference_steps": len(ref.steps), "kills": kills, "finals": finals,
            "launches": len(launches) + 1, "counts": kill_counts(kills)}


def kill_counts(kills: list[dict]) -> dict:
    n = len(kills)
    c = {k: sum(1 for r in kills if r.get(k)) for k in (
        "fired", "store_opened", "rows_once", "ckpt_ok", "resumed_bit_identical", "lost_within_contract",
        "survived")}
    c["kills"] = n
    c["by_phase"] = {p: sum(1 for r in kills if r.get("kill", {}).get("phase") == p) for p in PHASES + ("outside",)}
    return c


# -------------------------------------------------------------------------------------- dvc
DVC_SLICE = """
data:
  max_docs: 150
train:
  max_steps: 40
  global_batch_size: 8
  micro_batch_size: 4
  seq_len: 64
ckpt:
  interval: 10
parallel:
  nproc: 2
audit:
  flush_every: 5
"""


def dvc_section(work: Path, rng: np.random.Generator) -> dict:
    """SIGKILL of `dvc repro`'s whole process group during the train stage, then repro again."""
    import yaml

    repo = work / "dvc" / "repo"
    repo.mkdir(parents=True)
    for name in ("conf", "data/sample", "src", "scripts", ".dvc/config", "dvc.yaml", ".gitignore", ".dvcignore"):
        src, dst = REPO / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            shutil.copy2(src, dst)
    pipe = repo / "conf" / "pipeline.yaml"
    body = yaml.safe_load(pipe.read_text())
    for group, values in yaml.safe_load(DVC_SLICE).items():
        body.setdefault(group, {}).update(values)
    pipe.write_text(yaml.safe_dump(body, sort_keys=False))
    env = child_env(GIT_AUTHOR_NAME="c", GIT_AUTHOR_EMAIL="c@example.com", GIT_COMMITTER_NAME="c",
                    GIT_COMMITTER_EMAIL="c@example.com")

    def sh(*cmd: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)

    for cmd in ([PY, "scripts/compose_params.py", "params.yaml"], ["git", "init", "-q", "-b", "main"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        r = sh(*cmd)
        if r.returncode != 0:
            raise RuntimeError(f"{cmd}: {r.stderr[-1000:]}")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    every = int(params["audit"]["layer_stats_every"]) or 10**9
    dvc = str(Path(PY).parent / "dvc")
    train_store = repo / "pipeline" / "train"
    log_path = work / "dvc" / "first.log"
    delay = float(rng.uniform(0.3, 2.5))
    log(f"dvc: dvc repro train (prepare, dedup, tokenize, pack, then train at 2 ranks); SIGKILL of the "
        f"process group {delay:.1f} s after the first steps segment")
    t = time.time()
    with open(log_path, "w") as fh:
        proc = subprocess.Popen([dvc, "repro", "train"], cwd=repo, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 900
        seen = False
        while time.time() < deadline and proc.poll() is None:
            if train_store.is_dir() and any(train_store.glob("*/steps/*.parquet")):
                seen = True
                break
            time.sleep(0.1)
        time.sleep(delay)
        killed_while_running = proc.poll() is None
        kill_group(proc.pid)
        proc.wait(timeout=60)
    first_s = time.time() - t
    res: dict = {"delay_s": round(delay, 2), "saw_steps": seen, "killed_while_running": killed_while_running,
                 "first_repro_rc": proc.returncode, "first_repro_s": round(first_s, 1)}
    runs = [d.name for d in train_store.iterdir() if (d / "_run.json").exists()] if train_store.is_dir() else []
    res["killed_runs"] = runs
    chk = inspect_run(train_store, runs[0], 0, 2, 8, every, cwd=repo) if len(runs) == 1 else None
    if chk is not None:
        res.update(run_id=chk.run_id, status=chk.status, store_opened=chk.store_opened, rows_once=chk.rows_once,
                   row_problems=chk.row_problems, recorded_to_step=chk.max_step, ckpt_ok=chk.ckpt_ok,
                   ckpt_problems=chk.ckpt_problems, ckpt_final=chk.ckpt_final, ckpt_tmp=chk.ckpt_tmp)
    log(f"dvc: killed at recorded step {res.get('recorded_to_step')} (status {res.get('status')}); dvc repro train again")
    r2 = sh(dvc, "repro", "train")
    ran = sorted({ln.split("'")[1] for ln in r2.stdout.splitlines() if ln.startswith("Running stage '")})
    res.update(second_repro_rc=r2.returncode, second_repro_ran=ran, second_repro_tail=first_line(r2.stderr or r2.stdout))
    runs2 = [d.name for d in train_store.iterdir() if (d / "_run.json").exists()] if train_store.is_dir() else []
    res["runs_after"] = len(runs2)
    if r2.returncode == 0 and len(runs2) == 1:
        chk2 = inspect_run(train_store, runs2[0], 0, 2, 8, every, cwd=repo)
        res["recovered_problems"] = chk2.row_problems + chk2.ckpt_problems
        res["recovered_status"] = chk2.status
        res["recovered_steps"] = len(chk2.steps)
        res["recovered_ok"] = chk2.status == "completed" and chk2.max_step == 40 and chk2.rows_once and chk2.ckpt_ok
        if chk is not None:
            res["vs_rerun"] = compare(chk2, chk)
    r3 = sh(dvc, "repro", "train")
    ran3 = sorted({ln.split("'")[1] for ln in r3.stdout.splitlines() if ln.startswith("Running stage '")})
    res.update(third_repro_rc=r3.returncode, third_repro_ran=ran3)
    res["recovered_cleanly"] = bool(r2.returncode == 0 and res.get("recovered_ok") and r3.returncode == 0
                                    and not ran3)
    res["survived"] = bool(killed_while_running and res.get("store_opened") and res.get("rows_once")
                           and res.get("ckpt_ok") and res.get("vs_rerun", {}).get("bit_identical")
                           and res["recovered_cleanly"])
    log(f"dvc: second repro rc={r2.returncode} ran {ran}; third ran {ran3 or 'nothing'}; survived={res['survived']}")
    return res


# ------------------------------------------------------------------------------------- disk
@contextlib.contextmanager
def small_filesystem(path: Path, size_kb: int):
    """A tmpfs of `size_kb` at `path` (needs mount permission); yields True if mounted."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                       capture_output=True, text=True)
    try:
        yield r.returncode == 0
    finally:
        if r.returncode == 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(mount: Path, leave_bytes: int) -> int:
    st = os.statvfs(mount)
    free = st.f_bavail * st.f_frsize
    n = max(0, free - leave_bytes)
    with open(mount / "filler.bin", "wb") as fh:
        fh.write(b"\0" * n)
    return n


def disk_section(work: Path, packed: Path) -> dict:
    """The audit sink and the checkpointer meet a full disk."""
    import k2repro
    from k2repro.audit.storemeta import ensure_store
    from k2repro.core.ckpt_manifest import verify_checkpoint
    from k2repro.errors import CheckpointError

    out: dict = {}
    sink = {"ckpt.interval": 0, "audit.flush_every": 2, "audit.layer_stats_every": 1, "train.max_steps": 400}
    ckpt = {"ckpt.interval": 5, "audit.flush_every": 5, "train.max_steps": 400}
    scenarios = {  # a few amounts of free space each: where the disk fills up decides what fits after
        # the sink's segments fill the disk (no checkpoints; layer stats every step)
        **{f"audit_sink, {kb} KB free": {"extra": sink, "leave_kb": kb} for kb in (64, 96, 160)},
        # the second checkpoint does not fit (each is ~0.7 MB at this size)
        **{f"checkpointer, {kb} KB free": {"extra": ckpt, "leave_kb": kb} for kb in (900, 1100)},
    }
    for name, sc in scenarios.items():
        mnt = work / "disk" / re.sub(r"\W+", "_", name)
        with small_filesystem(mnt, 6 * 1024) as mounted:
            if not mounted:
                out[name] = {"skipped": "cannot mount a tmpfs here (needs root); see docs/reliability.md"}
                log(f"disk: {name}: skipped (no mount permission)")
                continue
            store = mnt / "store"
            ensure_store(store)
            filled = _fill(mnt, sc["leave_kb"] * 1024)
            log(f"disk: {name}: {sc['leave_kb']} KB left free on a 6 MB tmpfs; training into it")
            L = k2(["train", *tiny_overrides(packed, store, **{"run.name": "disk", **sc["extra"]})],
                   timeout=600)
            res = {"rc": L.rc, "seconds": round(L.seconds, 1), "run_id": L.run_id, "filled_bytes": filled,
                   "message": first_line(L.stderr, 500), "traceback": "Traceback" in L.stderr}
            res["mentions_no_space"] = any(t in L.stderr for t in ("No space left", "ENOSPC", "Errno 28", "disk is full"))
            if L.run_id:
                try:
                    with k2repro.open_store(store) as s:
                        res["status"] = s.run(L.run_id)["status"]
                        st = s.sql("SELECT step, loss FROM steps WHERE run_id = ? ORDER BY step", [L.run_id])
                        err = s.sql("SELECT detail FROM events WHERE run_id = ? AND kind = 'error'", [L.run_id])
                    res["store_opened"] = True
                    steps = [int(x) for x in st["step"]]
                    res["steps_recorded"] = len(steps)
                    res["steps_intact"] = steps == list(range(1, len(steps) + 1)) and not st["loss"].isna().any()
                    res["error_event"] = first_line(str(err["detail"].iloc[0])) if len(err) else None
                except Exception as exc:
                    res["store_opened"] = False
                    res["store_error"] = exc_line(exc)
                ck = store / L.run_id / "checkpoints"
                good, bad = [], []
                for d in sorted(ck.glob("step_*")) if ck.is_dir() else []:
                    try:
                        verify_checkpoint(d)
                        good.append(d.name)
                    except CheckpointError as exc:
                        bad.append(str(exc))
                res["checkpoints_valid"], res["checkpoints_invalid"] = good, bad
                res["tmp_left"] = [p.name for p in ck.glob(".step_*")] if ck.is_dir() else []
                if good:  # earlier data intact: free the disk and resume from the last good checkpoint
                    (mnt / "filler.bin").unlink()
                    R = k2(["train", *tiny_overrides(packed, store, **{
                        "run.name": "disk-resume", **sc["extra"], "train.max_steps": int(good[-1][5:]) + 5,
                        "train.resume": L.run_id})], timeout=600)
                    res["resume_after_freeing_rc"] = R.rc
            res["marked_failed"] = res.get("status") == "failed"
            res["ok"] = bool(L.rc != 0 and res["mentions_no_space"] and res["marked_failed"] and not res["traceback"]
                             and res.get("steps_intact") and not res.get("checkpoints_invalid")
                             and res.get("resume_after_freeing_rc", 0) == 0)
            log(f"disk: {name}: rc={L.rc} status={res.get('status')} steps={res.get('steps_recorded')} "
                f"ok={res['ok']}: {res['message'][:120]}")
            out[name] = res
    return out


# ---------------------------------------------------------------------------------- corrupt
def damage(path: Path, kind: str, rng: np.random.Generator) -> str:
    if kind == "delete":
        path.unlink()
        return "deleted"
    data = bytearray(path.read_bytes())
    if kind == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
        return f"truncated {len(data)} -> {len(data) // 2} bytes"
    pos = int(rng.integers(len(data)))
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))
    return f"flipped byte {pos} of {len(data)}"


def probe(fn: Callable[[], object], ok_text: str) -> tuple[bool, bool, str]:
    """(detected, with a clean K2ReproError, message)."""
    from k2repro.errors import K2ReproError

    try:
        fn()
        return False, False, ok_text
    except K2ReproError as exc:
        return True, True, str(exc)
    except Exception as exc:
        return True, False, exc_line(exc, 400)


def corrupt_section(work: Path, packed: Path, fixture_store: Path, run_id: str, rng: np.random.Generator) -> dict:
    import k2repro
    from k2repro.core.ckpt_manifest import list_checkpoints, verify_checkpoint
    from k2repro.data.packed import PackedDataset

    cases: list[dict] = []
    base = work / "corrupt"
    base.mkdir(parents=True)
    src_ck = list_checkpoints(fixture_store / run_id / "checkpoints")[-1][1]
    # checkpoints: every file kind x truncate / flip / delete, through verify_checkpoint
    ck_store: list[dict] = []
    for fname in sorted(p.name for p in src_ck.iterdir()):
        for kind in ("truncate", "flip", "delete"):
            # the damaged checkpoint sits where the trainer keeps it, in a copy of the store
            root = base / f"ck-{len(cases):02d}"
            copy_store(fixture_store, root)
            d = root / run_id / "checkpoints" / src_ck.name
            shutil.copytree(src_ck, d)
            what = damage(d / fname, kind, rng)
            detected, clean, msg = probe(lambda d=d: verify_checkpoint(d), "verified OK")
            cases.append({"artefact": "checkpoint", "file": fname, "damage": kind, "what": what, "detected": detected,
                          "clean_error": clean, "named": fname in msg, "how": "verify_checkpoint",
                          "message": first_line(msg), "dir": str(d)})
            v = k2(["verify-store", "--store", str(root), "--run", run_id], timeout=120)
            ck_store.append({"artefact": "checkpoint (in the store)", "file": fname, "damage": kind, "what": what,
                             "how": "k2repro verify-store", "rc": v.rc, "detected": v.rc == 1,
                             "clean_error": v.rc == 1 and "Traceback" not in v.stderr
                             and len(v.stderr.strip().splitlines()) == 1,
                             "named": v.rc == 1 and fname in v.stdout + v.stderr,
                             "message": first_line(v.stderr) or f"exit {v.rc}: {first_line(v.stdout)}"})
    # the CLI and a resume on a few of them
    for c in [c for c in cases if c["damage"] == "flip" and c["file"].endswith(".distcp")][:1] + \
             [c for c in cases if c["damage"] == "truncate" and c["file"] == "manifest.json"][:1]:
        v = k2(["verify-checkpoint", c["dir"]], timeout=300)
        cases.append({**c, "how": "k2repro verify-checkpoint", "rc": v.rc, "detected": v.rc != 0,
                      "clean_error": v.rc == 1 and "Traceback" not in v.stderr,
                      "named": c["file"] in v.stderr, "message": first_line(v.stderr)})
        r = k2(["train", *tiny_overrides(packed, base / "resume-store", **{"train.resume": c["dir"],
                                                                           "train.max_steps": 20})], timeout=300)
        cases.append({**c, "how": "k2repro train train.resume=<damaged>", "rc": r.rc, "detected": r.rc == 2,
                      "clean_error": r.rc == 2 and "Traceback" not in r.stderr,
                      "named": c["file"] in r.stderr, "message": first_line(r.stderr),
                      "traceback": "Traceback" in r.stderr,
                      "nothing_written": not (base / "resume-store").exists()
                      or not any((base / "resume-store").glob("run-*"))})
    log(f"corrupt: checkpoints: {sum(c['detected'] for c in cases)}/{len(cases)} detected")
    cases += ck_store
    log(f"corrupt: checkpoints in the store, verify-store: {sum(c['detected'] for c in ck_store)}/{len(ck_store)}")
    # store segments
    n0 = len(cases)
    for table in ("steps", "sample_stats", "layer_stats", "run_end", "runs"):
        segs = sorted((fixture_store / run_id / table).glob("*.parquet"))
        if not segs:
            continue
        for kind in ("truncate", "flip", "delete"):
            root = base / f"store-{len(cases):02d}"
            copy_store(fixture_store, root)
            victim = root / run_id / table / segs[0].name
            with k2repro.open_store(root) as s:
                before = s.sql(f"SELECT * FROM {table} WHERE run_id = ? ORDER BY ALL", [run_id])  # noqa: S608
            what = damage(victim, kind, rng)
            got: dict = {}

            def query(root: Path = root, table: str = table, got: dict = got) -> None:
                with k2repro.open_store(root) as s:
                    got["rows"] = s.sql(f"SELECT * FROM {table} WHERE run_id = ? ORDER BY ALL", [run_id])
                    s.run(run_id)

            detected, clean, msg = probe(query, "query succeeded")
            changed = "rows" in got and not before.equals(got["rows"])
            if not detected:
                msg += " with different rows (silent)" if changed else " with the same rows"
            cli = k2(["sql", f"SELECT count(*) FROM {table}", "--store", str(root)], timeout=120)
            cases.append({"artefact": f"store segment ({table})", "file": victim.name, "damage": kind, "what": what,
                          "detected": detected, "clean_error": clean, "named": detected and victim.name in msg,
                          "how": "open_store + query",
                          "silently_changed": changed, "message": first_line(msg),
                          "cli_rc": cli.rc, "cli_traceback": "Traceback" in cli.stderr,
                          "cli_message": first_line(cli.stderr or cli.stdout)})
            v = k2(["verify-store", "--store", str(root), "--run", run_id], timeout=120)
            cases.append({"artefact": f"store segment ({table})", "file": victim.name, "damage": kind, "what": what,
                          "how": "k2repro verify-store", "rc": v.rc, "detected": v.rc == 1,
                          "clean_error": v.rc == 1 and "Traceback" not in v.stderr
                          and len(v.stderr.strip().splitlines()) == 1,
                          "named": v.rc == 1 and victim.name in v.stdout + v.stderr,
                          "message": first_line(v.stderr) or f"exit {v.rc}: {first_line(v.stdout)}"})
    seg_cases = cases[n0:]
    for how in ("open_store + query", "k2repro verify-store"):
        mine = [c for c in seg_cases if c["how"] == how]
        log(f"corrupt: store segments, {how}: {sum(c['detected'] for c in mine)}/{len(mine)} detected")
    # data artefacts (the packed corpus): verify() and a training launch
    n1 = len(cases)
    for fname in ("train.bin", "train.docs.parquet", "manifest.json"):
        for kind in ("truncate", "flip", "delete"):
            d = base / f"data-{len(cases):02d}" / "packed"
            shutil.copytree(packed, d)
            what = damage(d / fname, kind, rng)
            detected, clean, msg = probe(lambda d=d: PackedDataset(d).verify(), "verify() passed")
            cases.append({"artefact": "packed data", "file": fname, "damage": kind, "what": what, "detected": detected,
                          "clean_error": clean, "named": fname in msg, "how": "PackedDataset(dir).verify()",
                          "message": first_line(msg), "dir": str(d)})
    for c in [c for c in cases[n1:] if c["file"] == "train.bin" and c["damage"] in ("flip", "delete")]:
        st = Path(c["dir"]).parent / "store"
        r = k2(["train", *tiny_overrides(Path(c["dir"]), st, **{"train.max_steps": 3})], timeout=300)
        cases.append({**c, "how": "k2repro train on the damaged data", "rc": r.rc, "detected": r.rc == 2,
                      "clean_error": r.rc == 2 and "Traceback" not in r.stderr,
                      "named": c["file"] in r.stderr,
                      "message": first_line(r.stderr) or f"exit {r.rc}: trained to the end without an error",
                      "traceback": "Traceback" in r.stderr})
    log(f"corrupt: data: {sum(c['detected'] for c in cases[n1:])}/{len(cases) - n1} detected")
    for c in cases:
        c.pop("dir", None)
    # Issue 24 #13: a verification that says OK must mean every byte was checked, so every store
    # corruption verify-store misses is a campaign failure, not a statistic.
    vs = [c for c in seg_cases + ck_store if c["how"] == "k2repro verify-store"]
    missed = [f"{c['artefact']} {c['file']} {c['damage']}" for c in vs if not c["detected"]]
    return {"cases": cases, "detected": sum(c["detected"] for c in cases),
            "named": sum(c["named"] for c in cases), "clean": sum(bool(c.get("clean_error")) for c in cases),
            "total": len(cases), "verify_store": {"detected": len(vs) - len(missed), "total": len(vs),
                                                  "missed": missed}}


# ----------------------------------------------------------------------------------- inputs
@dataclass
class Case:
    id: str
    area: str
    args: list[str]
    expect: int
    setup: Callable[[Path], None] | None = None
    what: str = ""


def _write(name: str, text: str) -> Callable[[Path], None]:
    def f(cwd: Path) -> None:
        p = cwd / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return f


def _mkdir_with_file(name: str) -> Callable[[Path], None]:
    def f(cwd: Path) -> None:
        (cwd / name).mkdir(parents=True, exist_ok=True)
        (cwd / name / "keep.txt").write_text("x\n")
    return f


def bad_input_cases(run_id: str, packed: Path) -> list[Case]:
    S = ["--store", "store"]
    tiny = tiny_overrides(packed, Path("runs"), **{"train.max_steps": 2})
    cases = [
        Case("cli-unknown-command", "cli", ["frobnicate"], 2),
        Case("cli-bad-choice", "cli", ["runs", *S, "--status", "bogus"], 2),
        Case("cli-missing-argument", "cli", ["sql", *S], 2),
        Case("cli-json-and-csv", "cli", ["runs", *S, "--json", "--csv"], 2),
        Case("cli-replay-unknown-run", "cli", ["replay", "no-such-run", "--from-step", "1", "--to-step", "2", *S], 2),
        Case("cli-replay-reversed-range", "cli", ["replay", run_id, "--from-step", "5", "--to-step", "2", *S], 2),
        Case("cli-replay-beyond-run", "cli", ["replay", run_id, "--from-step", "1", "--to-step", "99999", *S], 2),
        Case("cli-diff-unknown-run", "cli", ["diff", run_id, "no-such-run", *S], 2),
        Case("cli-batch-step-0", "cli", ["batch", run_id, "--step", "0", *S], 2),
        Case("cli-batch-step-beyond", "cli", ["batch", run_id, "--step", "99999", *S], 2),
        Case("cli-batch-step-not-int", "cli", ["batch", run_id, "--step", "ten", *S], 2),
        Case("cli-forensics-unknown-run", "cli", ["forensics", "no-such-run", *S], 2),
        Case("cli-report-unknown-run", "cli", ["report", "no-such-run", *S], 2),
        Case("cli-eval-unknown-run", "cli", ["eval", "no-such-run", *S], 2),
        Case("cli-export-unknown-run", "cli", ["export", "no-such-run", "--out", "bundle", *S], 2),
        Case("cli-export-out-exists", "cli", ["export", run_id, "--out", "existing", *S], 2,
             _mkdir_with_file("existing")),
        Case("cli-export-bad-checkpoints", "cli", ["export", run_id, "--out", "bundle", "--checkpoints",
                                                   "every:0", *S], 2),
        Case("cli-verify-bundle-not-a-bundle", "cli", ["verify-bundle", "notabundle"], 2,
             _mkdir_with_file("notabundle")),
        Case("cli-gc-bad-age", "cli", ["gc", *S, "--older-than", "5parsecs"], 2),
        Case("cli-gc-unknown-run", "cli", ["gc", *S, "--run", "no-such-run"], 2),
        Case("cli-verify-checkpoint-missing", "cli", ["verify-checkpoint", "no/such/step_00000010"], 2),
        Case("cli-data-missing-params", "cli", ["data", "pack", "--params", "missing.yaml"], 2),
        Case("cfg-negative-lr", "config", ["train", *tiny, "optim.lr=-1"], 2),
        Case("cfg-zero-steps", "config", ["train", *tiny, "train.max_steps=0"], 2),
        Case("cfg-unknown-key", "config", ["train", *tiny, "+nosuch.key=1"], 2),
        Case("cfg-unknown-key-no-plus", "config", ["train", *tiny, "optim.lrr=0.1"], 2),
        Case("cfg-heads-not-dividing", "config", ["train", *tiny, "model.n_heads=3"], 2),
        Case("cfg-bad-precision", "config", ["train", *tiny, "train.precision=fp8"], 2),
        Case("cfg-bad-backend", "config", ["train", *tiny, "parallel.backend=mpi"], 2),
        Case("cfg-bad-guard-action", "config", ["train", *tiny, "guard.action=explode"], 2),
        Case("cfg-bad-kill-phase", "config", ["train", *tiny, "faults.kill_phase=later"], 2),
        Case("cfg-batch-not-multiple", "config", ["train", *tiny, "train.global_batch_size=7"], 2),
        Case("cfg-wrong-type", "config", ["train", *tiny, "train.seq_len=abc"], 2),
        Case("cfg-unknown-group-option", "config", ["train", *tiny, "model=nosuch"], 2),
        Case("cfg-unknown-config-name", "config", ["train", "--config-name", "nosuch", *tiny], 2),
        Case("cfg-malformed-params-file", "config", ["train", "--params", "bad.yaml"], 2,
             _write("bad.yaml", "train: {max_steps: 3\nmodel: [unclosed\n")),
        Case("cfg-unknown-option", "config", ["train", "--bogus-flag", *tiny], 2),
        Case("cfg-seq-longer-than-model", "config", ["train", *tiny, "train.seq_len=1000"], 2),
        Case("cfg-zero-ranks", "config", ["train", *tiny, "parallel.nproc=0"], 2),
        Case("cfg-missing-packed-data", "config", ["train", *tiny, "data.packed_dir=no/such/dir"], 2),
        Case("cfg-resume-unknown-run", "config", ["train", *tiny, "train.resume=no-such-run"], 2),
        Case("imp-missing-file", "import", ["import", "csv", "missing.csv", "--name", "x", *S], 2),
        Case("imp-csv-bad-value", "import", ["import", "csv", "bad.csv", "--name", "x", *S], 2,
             _write("bad.csv", "step,loss\n1,2.5\n2,abc\n3,2.1\n")),
        Case("imp-csv-no-step", "import", ["import", "csv", "nostep.csv", "--name", "x", *S], 2,
             _write("nostep.csv", "epoch_fraction,loss\n0.1,2.5\n0.2,2.4\n")),
        Case("imp-jsonl-broken-line", "import", ["import", "csv", "broken.jsonl", "--name", "x", *S], 2,
             _write("broken.jsonl", '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": \n{"step": 3, "loss": 2.1}\n')),
        Case("imp-csv-header-only", "import", ["import", "csv", "empty.csv", "--name", "x", *S], 2,
             _write("empty.csv", "step,loss\n")),
        Case("imp-csv-negative-step", "import", ["import", "csv", "neg.csv", "--name", "x", *S], 2,
             _write("neg.csv", "step,loss\n-1,2.5\n2,2.4\n")),
        Case("imp-wandb-bad-header", "import", ["import", "wandb-csv", "w.csv", "--name", "x", *S], 2,
             _write("w.csv", '"Step","nonsense"\n1,2.0\n')),
        Case("imp-megatron-no-iterations", "import", ["import", "megatron-log", "m.log", "--name", "x", *S], 2,
             _write("m.log", "hello\nthis is not a training log\n")),
        Case("imp-tensorboard-empty-dir", "import", ["import", "tensorboard", "tb", "--name", "x", *S], 2,
             _mkdir_with_file("tb")),
        Case("imp-bundle-not-a-bundle", "import", ["import", "bundle", "notabundle", *S], 2,
             _mkdir_with_file("notabundle")),
        Case("imp-bad-map", "import", ["import", "csv", "ok.csv", "--name", "x", "--map", "nonsense", *S], 2,
             _write("ok.csv", "step,loss\n1,2.5\n2,2.4\n")),
        Case("imp-unknown-kind", "import", ["import", "excel", "ok.csv", *S], 2,
             _write("ok.csv", "step,loss\n1,2.5\n")),
        Case("sql-delete", "sql", ["sql", "DELETE FROM steps", *S], 2),
        Case("sql-drop-view", "sql", ["sql", "DROP VIEW steps", *S], 2),
        Case("sql-create-table", "sql", ["sql", "CREATE TABLE x AS SELECT 1", *S], 2),
        Case("sql-insert", "sql", ["sql", "INSERT INTO steps (run_id) VALUES ('x')", *S], 2),
        Case("sql-copy-to-file", "sql", ["sql", "COPY (SELECT 1) TO 'out.csv'", *S], 2),
        Case("sql-attach", "sql", ["sql", "ATTACH 'other.duckdb' AS o", *S], 2),
        Case("sql-install-extension", "sql", ["sql", "INSTALL httpfs", *S], 2),
        Case("sql-load-extension", "sql", ["sql", "LOAD httpfs", *S], 2),
        Case("sql-set-option", "sql", ["sql", "SET threads = 1", *S], 2),
        Case("sql-read-outside-store", "sql", ["sql", "SELECT * FROM read_csv('outside.csv')", *S], 2,
             _write("outside.csv", "a,b\n1,2\n")),
        Case("sql-two-statements", "sql", ["sql", "SELECT 1; DELETE FROM steps", *S], 2),
        Case("sql-syntax-error", "sql", ["sql", "SELEC 1", *S], 2),
        Case("sql-unknown-table", "sql", ["sql", "SELECT * FROM nosuch_table", *S], 2),
        Case("sql-missing-parameter", "sql", ["sql", "SELECT * FROM steps WHERE step = ?", *S], 2),
        Case("sql-export-database", "sql", ["sql", "EXPORT DATABASE 'dump'", *S], 2),
        Case("sql-checkpoint", "sql", ["sql", "CHECKPOINT", *S], 2),
    ]
    return cases


def pick_small(cases: list[Case], n: int, rng: np.random.Generator) -> list[Case]:
    """n cases, at least one of each area when n allows, seeded."""
    areas = sorted({c.area for c in cases})
    out: list[Case] = []
    for a in areas[:n]:
        pool = [c for c in cases if c.area == a and not c.args[0] == "train"] or [c for c in cases if c.area == a]
        out.append(pool[int(rng.integers(len(pool)))])
    rest = [c for c in cases if c not in out and c.args[0] != "train"]
    while len(out) < n and rest:
        out.append(rest.pop(int(rng.integers(len(rest)))))
    return out


def run_case(case: Case, work: Path, fixture_store: Path) -> dict:
    cwd = work / "inputs" / case.id
    cwd.mkdir(parents=True)
    shutil.copytree(fixture_store, cwd / "store")
    if case.setup:
        case.setup(cwd)
    before = tree_hash(cwd)
    L = k2(case.args, cwd=cwd, timeout=300)
    after = tree_hash(cwd)
    lines = [ln for ln in L.stderr.splitlines() if ln.strip()]
    msg = first_line(L.stderr, 300)
    shown = [a.replace(str(REPO), "<repo>").replace(str(work), "<work>") for a in case.args]
    if case.args[0] == "train":
        shown = ["train", "<tiny test overrides>", *[a for a in shown[1:] if a not in
                                                     tiny_overrides(Path("x"), Path("x")) and "packed_dir" not in a
                                                     and "audit.store" not in a and "max_steps=2" not in a]]
    res = {"id": case.id, "area": case.area, "argv": "k2repro " + " ".join(shown), "expected_rc": case.expect,
           "rc": L.rc, "message": msg.replace(str(cwd), "<cwd>").replace(str(REPO), "<repo>"),
           "stderr_lines": len(lines), "traceback": "Traceback" in L.stderr, "nothing_written": before == after,
           "hash_before": before[:16], "hash_after": after[:16], "seconds": round(L.seconds, 1)}
    if before != after:
        new = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*"))
        res["tree_after"] = new[:20]
    res["ok"] = bool(L.rc == case.expect and msg and not res["traceback"] and res["nothing_written"])
    return res


def inputs_section(work: Path, packed: Path, fixture_store: Path, run_id: str, n: int | None,
                   rng: np.random.Generator) -> dict:
    import k2repro

    with k2repro.open_store(fixture_store):  # the fixture store is current: opening it writes nothing
        pass
    cases = bad_input_cases(run_id, packed)
    if n is not None and n < len(cases):
        cases = pick_small(cases, n, rng)
    log(f"inputs: {len(cases)} bad inputs, 2 at a time, each in its own folder with its own store copy")
    results: list[dict] = []
    lock = threading.Lock()

    def one(c: Case) -> dict:
        r = run_case(c, work, fixture_store)
        with lock:
            results.append(r)
            log(f"inputs: {r['id']:<34} rc={r['rc']} {'ok' if r['ok'] else 'FAIL'}  {r['message'][:90]}")
        return r

    with ThreadPoolExecutor(max_workers=2) as ex:
        list(ex.map(one, cases))
    order = {c.id: i for i, c in enumerate(cases)}
    results.sort(key=lambda r: order[r["id"]])
    return {"cases": results, "total": len(results), "ok": sum(r["ok"] for r in results),
            "nothing_written": sum(r["nothing_written"] for r in results),
            "expected_rc": sum(r["rc"] == r["expected_rc"] for r in results),
            "no_traceback": sum(not r["traceback"] for r in results)}


# ------------------------------------------------------------------------------------- load
def reader_main(store: str, out: str, stop: str, rate: float) -> int:
    """One reader process: in-process queries at `rate`/s until the stop file appears."""
    import k2repro

    queries = [
        ("max_step", "SELECT run_id, max(step) FROM steps GROUP BY run_id"),
        ("status", "SELECT run_id, status FROM runs"),
        ("samples", "SELECT run_id, count(*) FROM sample_stats GROUP BY run_id"),
        ("layers", "SELECT step, max(update_ratio) FROM layer_stats GROUP BY step ORDER BY step DESC LIMIT 5"),
    ]
    lat: list[float] = []
    opens: list[float] = []
    errors: list[str] = []
    stale: list[str] = []
    last_step: dict[str, int] = {}
    done: set[str] = set()
    t = time.perf_counter()
    s = k2repro.open_store(store)
    opens.append(time.perf_counter() - t)
    period, nxt, i = 1.0 / rate, time.perf_counter(), 0
    while not os.path.exists(stop):
        if i and i % 50 == 0:  # a fresh connection now and then (what a new CLI call does)
            s.close()
            t = time.perf_counter()
            s = k2repro.open_store(store)
            opens.append(time.perf_counter() - t)
        name, q = queries[i % len(queries)]
        t = time.perf_counter()
        try:
            rows = s.execute(q).fetchall()
            lat.append(time.perf_counter() - t)
            if name == "max_step":
                for rid, m in rows:
                    if m < last_step.get(rid, 0):
                        stale.append(f"{rid}: max(step) {last_step[rid]} -> {m}")
                    last_step[rid] = max(m, last_step.get(rid, 0))
            elif name == "status":
                for rid, status in rows:
                    if rid in done and status != "completed":
                        stale.append(f"{rid}: status completed -> {status}")
                    if status == "completed":
                        done.add(rid)
        except Exception as exc:
            lat.append(time.perf_counter() - t)
            errors.append(exc_line(exc, 200))
        i += 1
        nxt += period
        time.sleep(max(0.0, nxt - time.perf_counter()))
    s.close()
    Path(out).write_text(json.dumps({"latency_s": lat, "open_s": opens, "errors": errors, "stale": stale,
                                     "last_step": last_step}))
    return 0


def load_section(work: Path, packed: Path, steps: int) -> dict:
    from k2repro.audit.storemeta import ensure_store

    store = work / "load" / "store"
    ensure_store(store)
    stop = work / "load" / "stop"
    env = child_env()
    log(f"load: 2 runs x {steps} steps into one store, 4 readers at 10 queries/s, `k2repro sql` now and then")
    trainers = [subprocess.Popen([PY, "-m", "k2repro", "train", *tiny_overrides(packed, store, **{
        "train.max_steps": steps, "train.seed": seed, "audit.flush_every": 5, "audit.layer_stats_every": 5,
        "run.name": f"load-{seed}"})], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True) for seed in (1, 2)]
    readers = [subprocess.Popen([PY, str(Path(__file__).resolve()), "--reader", str(store),
                                 str(work / "load" / f"r{i}.json"), str(stop), "10"], cwd=REPO, env=env,
                                start_new_session=True) for i in range(4)]
    cli_lat, cli_err, cli_stale, last = [], [], [], {}
    t_start = time.time()
    outs = [None, None]

    def wait_trainer(i: int) -> None:
        outs[i] = trainers[i].communicate(timeout=900)

    waiters = [threading.Thread(target=wait_trainer, args=(i,)) for i in range(2)]
    for w in waiters:
        w.start()
    while any(w.is_alive() for w in waiters):
        L = k2(["sql", "SELECT run_id, max(step) AS m FROM steps GROUP BY run_id", "--store", str(store), "--json"],
               timeout=120)
        if L.rc != 0:
            cli_err.append(first_line(L.stderr))
        else:
            cli_lat.append(L.seconds)
            for row in json.loads(L.stdout):
                if row["m"] < last.get(row["run_id"], 0):
                    cli_stale.append(row)
                last[row["run_id"]] = row["m"]
        time.sleep(1.0)
    train_s = time.time() - t_start
    stop.write_text("stop")
    for r in readers:
        r.wait(timeout=120)
        kill_group(r.pid)
    for t in trainers:
        kill_group(t.pid)
    rep = [json.loads((work / "load" / f"r{i}.json").read_text()) for i in range(4)
           if (work / "load" / f"r{i}.json").exists()]
    lat = [x for r in rep for x in r["latency_s"]]
    opens = [x for r in rep for x in r["open_s"]]
    import k2repro

    with k2repro.open_store(store) as s:
        final = s.sql("SELECT run_id, status, (SELECT count(*) FROM steps st WHERE st.run_id = r.run_id) AS n "
                      "FROM runs r ORDER BY run_id")
    res = {
        "trainers_rc": [t.returncode for t in trainers], "train_wall_s": round(train_s, 1),
        "readers": len(rep), "queries": len(lat), "queries_per_s_per_reader": round(len(lat) / max(train_s, 1e-9) / 4, 2),
        "errors": sum(len(r["errors"]) for r in rep), "error_samples": [e for r in rep for e in r["errors"]][:5],
        "stale_reads": sum(len(r["stale"]) for r in rep), "stale_samples": [e for r in rep for e in r["stale"]][:5],
        "latency_ms": {"p50": round(1000 * percentile(lat, 50), 2) if lat else None,
                       "p99": round(1000 * percentile(lat, 99), 2) if lat else None,
                       "max": round(1000 * max(lat), 2) if lat else None},
        "open_store_ms": {"p50": round(1000 * percentile(opens, 50), 2) if opens else None,
                          "p99": round(1000 * percentile(opens, 99), 2) if opens else None, "n": len(opens)},
        "cli_sql": {"calls": len(cli_lat) + len(cli_err), "errors": len(cli_err), "error_samples": cli_err[:3],
                    "stale_reads": len(cli_stale),
                    "wall_s_p50": round(statistics.median(cli_lat), 2) if cli_lat else None,
                    "wall_s_max": round(max(cli_lat), 2) if cli_lat else None},
        "final": final.to_dict(orient="records"),
    }
    res["ok"] = bool(res["trainers_rc"] == [0, 0] and res["errors"] == 0 and res["stale_reads"] == 0
                     and res["cli_sql"]["errors"] == 0 and res["cli_sql"]["stale_reads"] == 0
                     and all(r["status"] == "completed" and r["n"] == steps for r in res["final"]))
    log(f"load: {res['queries']} queries, {res['errors']} errors, {res['stale_reads']} stale, "
        f"p50 {res['latency_ms']['p50']} ms, p99 {res['latency_ms']['p99']} ms; ok={res['ok']}")
    return res


# ----------------------------------------------------------------------------------- forged
class _Dirs:
    """What tests/integration/bundle_fixture.real_bundle needs of pytest's tmp_path_factory."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def mktemp(self, name: str) -> Path:
        p = self.base / name
        p.mkdir(parents=True)
        return p


def _outside_hash(root: Path, store: Path) -> str:
    """tree_hash of everything under `root` except `store` (what an import may write)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p == store or store in p.parents:
            continue
        rel = str(p.relative_to(root))
        if p.is_symlink():
            h.update(f"l:{rel}:{os.readlink(p)}\n".encode())
        elif p.is_dir():
            h.update(f"d:{rel}\n".encode())
        elif p.is_file():
            h.update(f"f:{rel}:{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def forged_section(work: Path) -> dict:
    """Forgeries of issue 24's findings 1-5 and 8, built by tests/integration/forge.py from a
    real export (a 2-rank run, 3 checkpoints, packed data with its tokenizer) and resealed with
    k2repro's own manifest code; each must be refused by `verify-bundle` or `import bundle`
    (exit 1 or 2, one line, no traceback) with nothing written outside the store."""
    from tests.integration import forge as F
    from tests.integration.bundle_fixture import real_bundle

    base = work / "forged"
    ex = real_bundle(_Dirs(base))
    rid, bundle = ex["rid"], ex["bundle"]
    log(f"forged: real export of {rid}")
    cases: list[dict] = []

    def case(name: str, finding: int, build: Callable[[Path], Path], key: Path | None = None,
             victim: bool = False, after: Callable[[Path], dict] | None = None) -> None:
        d = base / "cases" / name
        d.mkdir(parents=True)
        store = d / "store"
        victim_rows = None
        if victim:  # the store already holds the real run: the forgery must not touch its rows
            k = k2(["import", "bundle", str(bundle), "--store", str(store)], timeout=300)
            if k.rc != 0:
                raise RuntimeError(f"victim import failed: {k.stderr[-1000:]}")
            victim_rows = _rows(store, rid)
        b = build(d)
        before = _outside_hash(base, store)
        store_before = tree_hash(store)
        kargs = ["--key", str(key)] if key else []
        v = k2(["verify-bundle", str(b), *kargs], timeout=300)
        i = k2(["import", "bundle", str(b), "--store", str(store), *kargs], timeout=300)
        rec = {"case": name, "finding": finding, "verify_rc": v.rc,
               "verify_message": first_line(v.stderr) or first_line(v.stdout),
               "import_rc": i.rc, "import_message": first_line(i.stderr) or first_line(i.stdout),
               "traceback": "Traceback" in v.stderr + i.stderr}
        rec["refused"] = i.rc == 2 and v.rc in (0, 1)  # integrity may hold; the import must refuse
        rec["verify_refused"] = v.rc == 1
        if after:
            rec.update(after(store))
        rec["nothing_outside"] = _outside_hash(base, store) == before
        rec["store_unchanged"] = tree_hash(store) == store_before
        rec["escaped"] = [str(p.relative_to(base)) for p in base.rglob("escaped")]
        if victim_rows is not None:
            rec["victim_rows_unchanged"] = _rows(store, rid) == victim_rows
        rec["ok"] = (rec["refused"] and not rec["traceback"] and rec["nothing_outside"] and rec["store_unchanged"]
                     and not rec["escaped"] and rec.get("victim_rows_unchanged", True)
                     and rec.get("gc_spared_outside", True))
        cases.append(rec)
        log(f"forged: {name}: {'ok' if rec['ok'] else 'FAILED'} (verify rc {v.rc}, import rc {i.rc})")

    outside = base / "outside"
    (outside / "victim_project").mkdir(parents=True)
    (outside / "victim_project" / "notes.txt").write_text("someone's work")

    def gc_after(store: Path) -> dict:  # finding 1's second half: gc on whatever the import left
        if not store.exists():
            return {"gc_spared_outside": (outside / "victim_project" / "notes.txt").exists()}
        g = k2(["gc", "--store", str(store), "--older-than", "30d", "--json"], timeout=300)
        return {"gc_rc": g.rc, "gc_spared_outside": (outside / "victim_project" / "notes.txt").exists()}

    case("1 runs row naming victim_project, ckpt.dir outside", 1,
         lambda d: F.forge_victim_runs_row(bundle, d / "b", rid, outside), after=gc_after)
    case("2 chain id walking out of the store", 2, lambda d: F.forge_walk_out(bundle, d / "b", "chain"))
    case("2 checkpoint run id walking out of the store", 2,
         lambda d: F.forge_walk_out(bundle, d / "b", "checkpoint"))
    theirs = sorted((ex["store"] / rid / "checkpoints").glob("step_*"))[-1]
    case("3 checkpoint dcp path absolute, outside the bundle", 3,
         lambda d: F.forge_absolute_dcp(bundle, d / "b", theirs))
    case("3 data/packed a symlink to a folder outside", 3,
         lambda d: F.forge_symlinked_data(bundle, d / "b", d / "elsewhere"))
    case("4 rows of the run already in the store under a new chain id", 4,
         lambda d: F.forge_takeover(bundle, d / "b", rid), victim=True)
    # finding 5: export into the store itself
    store = ex["store"]
    rows = _rows(store, rid)
    before = _outside_hash(base, base / "no-store")
    outs = []
    for out in (store / "bundle", store / "deeper" / "bundle"):
        e = k2(["export", rid, "--store", str(store), "--out", str(out), "--checkpoints", "none", "--no-data"],
               cwd=ex["root"], timeout=300)
        outs.append({"out": str(out.relative_to(base)), "rc": e.rc, "message": first_line(e.stderr),
                     "traceback": "Traceback" in e.stderr})
    rec = {"case": "5 export --out inside the store", "finding": 5, "exports": outs,
           "refused": all(o["rc"] == 2 for o in outs), "traceback": any(o["traceback"] for o in outs),
           "nothing_outside": _outside_hash(base, base / "no-store") == before, "store_unchanged": True,
           "rows_unchanged": _rows(store, rid) == rows, "escaped": [],
           "import_message": outs[0]["message"], "verify_message": "-", "import_rc": outs[0]["rc"], "verify_rc": None}
    rec["ok"] = rec["refused"] and not rec["traceback"] and rec["nothing_outside"] and rec["rows_unchanged"]
    cases.append(rec)
    log(f"forged: finding 5: {'ok' if rec['ok'] else 'FAILED'}")
    # finding 8: origin. A signed export, changed and resealed; an unsigned one; someone else's key.
    keys = base / "keys"
    keys.mkdir()
    priv, pub, other = F.make_keys(keys)
    signed = base / "signed"
    e = k2(["export", rid, "--store", str(store), "--out", str(signed), "--checkpoints", "none", "--no-data",
            "--sign", str(priv)], cwd=ex["root"], timeout=300)
    if e.rc != 0:
        raise RuntimeError(f"signed export failed: {e.stderr[-1000:]}")
    case("8 signed bundle changed and resealed, --key of the signer", 8,
         lambda d: F.forge_after_signing(signed, d / "b"), key=pub)
    case("8 unsigned bundle, --key given", 8, lambda d: F.forge(bundle, d / "b"), key=pub)
    case("8 signed by someone else, --key of the publisher", 8, lambda d: F.forge(signed, d / "b"), key=other)
    for c in cases:
        if c["finding"] == 8:  # with a key, verify-bundle must refuse too
            c["ok"] = c["ok"] and c["verify_refused"]
    return {"cases": cases, "ok": sum(c["ok"] for c in cases), "total": len(cases),
            "verify_refused": sum(bool(c.get("verify_refused")) for c in cases),
            "failed": [c["case"] for c in cases if not c["ok"]]}


def _rows(store: Path, rid: str) -> dict:
    """Row counts and a content hash of a run's steps and runs rows (to show nothing changed)."""
    import k2repro

    with k2repro.open_store(store) as s:
        steps = s.sql("SELECT * FROM steps WHERE run_id = ? ORDER BY ALL", [rid])
        n_runs = s.execute("SELECT count(*) FROM runs_raw WHERE run_id = ?", [rid]).fetchone()[0]
    return {"steps": len(steps), "runs_rows": int(n_runs),
            "steps_sha256": hashlib.sha256(steps.to_csv(index=False).encode()).hexdigest()}


# ---------------------------------------------------------------------------------- secrets
def secrets_section(work: Path, packed: Path) -> dict:
    """Credentials planted (tests/integration/planted.py) in the environment, argv, a config value,
    a tag, an exception message and the git diff of a real training run, which is then resumed
    (the resume dies on an error naming a token) and exported with its checkpoints and data and
    reported on: every byte of the store (decoded Parquet too), the reports, the bundle and the
    CLI output is searched. Any hit is a failure."""
    from tests.integration import planted as P

    base = work / "secrets"
    repo = dirty_repo(base / "repo", "train_notes.py",
                      f"x = 1\nHUB = '{P.HF}'\nCI = '{P.GITLAB}'\nKEYFILE = '''{P.PRIVATE}'''\n")
    store = base / "store"
    env = child_env(K2REPRO_DB_URL=f"postgres://admin:{P.DB_PW}@db/x", SLURM_JOB_COMMENT=f"token={P.GH}",
                    MY_SESSION=P.JWT)
    planted = {"env": ["K2REPRO_DB_URL (URL password)", "SLURM_JOB_COMMENT (GitHub token)", "MY_SESSION (JWT)"],
               "argv / tag": ["+run.tags.note (OpenAI-style key)", "+run.tags.extra (Anthropic key)"],
               "config value": ["data.source (URL with user:password)"],
               "git diff": ["Hugging Face token", "GitLab token", "private-key block"],
               "exception message": ["ckpt.dir naming a Slack token, a file where a folder must go"]}
    a = k2(["train", *tiny_overrides(packed, store, **{"train.max_steps": 8, "ckpt.interval": 4,
                                                       "audit.flush_every": 4, "run.name": "secrets",
                                                       "data.source": f"https://reader:{P.DB_PW}@data.example/x",
                                                       "+run.tags.note": P.OPENAI, "+run.tags.extra": P.ANTHROPIC})],
           cwd=repo, env=env, timeout=600)
    if a.rc != 0 or not a.run_id:
        raise RuntimeError(f"secrets run failed: {_scrubbed_tail(a.stderr)}")
    blocker = base / f"ck-{P.SLACK}"
    blocker.write_text("a file where the checkpoint folder must go\n")
    ck = sorted((store / a.run_id / "checkpoints").glob("step_*"))[-1]
    b = k2(["train", *tiny_overrides(packed, store, **{"train.max_steps": 12, "ckpt.interval": 4,
                                                       "audit.flush_every": 4, "run.name": "secrets",
                                                       "train.resume": str(ck), "ckpt.dir": str(blocker)})],
           cwd=repo, env=env, timeout=600)
    rid_b, status_b = b.run_id or "", None
    with contextlib.suppress(Exception):
        import k2repro

        with k2repro.open_store(store) as s:
            rid_b = rid_b or s.execute("SELECT run_id FROM runs WHERE run_id <> ? ORDER BY started_at DESC LIMIT 1",
                                       [a.run_id]).fetchone()[0]
            status_b = s.execute("SELECT status FROM runs WHERE run_id = ?", [rid_b]).fetchone()[0]
    reports = base / "reports"
    outputs = [a, b]
    for rid in (a.run_id, rid_b):
        outputs.append(k2(["report", rid, "--store", str(store), "--out", str(reports)], cwd=repo, env=env))
    bundle = base / "bundle"
    ex = k2(["export", rid_b or a.run_id, "--store", str(store), "--out", str(bundle), "--checkpoints", "all",
             "--reports", str(reports), "--allow-incomplete"], cwd=repo, env=env, timeout=600)
    outputs.append(ex)
    bad = k2(["sql", f"SELECT * FROM no_such_table_{P.GH}", "--store", str(store)], cwd=repo, env=env)
    outputs.append(bad)
    (base / "cli-output.txt").write_text("\n".join(o.stdout + o.stderr for o in outputs))
    hits = {name: P.scan(root) for name, root in (("store", store), ("reports", reports), ("bundle", bundle),
                                                ("CLI output", base / "cli-output.txt")) if root.exists()}
    n_files = {name: sum(1 for p in root.rglob("*") if p.is_file()) if root.is_dir() else 1
               for name, root in (("store", store), ("reports", reports), ("bundle", bundle)) if root.exists()}
    n_parquet = sum(1 for root in (store, bundle) if root.exists() for _ in root.rglob("*.parquet"))
    redacted = any(b"REDACTED" in p.read_bytes() for p in store.rglob("*") if p.is_file()) or any(
        "REDACTED" in str(_decoded(p)) for p in store.rglob("*.parquet"))
    res = {"planted": planted, "run": a.run_id, "resumed_run": rid_b, "resumed_rc": b.rc,
           "resumed_status": status_b, "resumed_message": "(holds a planted token)"
           if P.SLACK in first_line(b.stderr) else first_line(b.stderr),
           "report_rcs": [o.rc for o in outputs[2:4]], "export_rc": ex.rc, "export_message": first_line(ex.stderr),
           "files_searched": n_files, "parquet_decoded": n_parquet, "redaction_marker_in_store": redacted,
           "hits": {k: [f"{f}: {kind}" for f, kind in v] for k, v in hits.items()}}
    # the brief of issue 24 #7: store, reports and bundle; the commands' own output (stderr) is
    # counted apart, a finding for the launcher's error path rather than for what is kept
    res["total_hits"] = sum(len(v) for k, v in hits.items() if k != "CLI output")
    res["cli_output_hits"] = len(hits.get("CLI output", []))
    # the run really happened and shipped: a section that searched an empty bundle proves nothing
    res["ok"] = (res["total_hits"] == 0 and ex.rc == 0 and b.rc != 0 and redacted and bundle.is_dir()
                 and all(rc == 0 for rc in res["report_rcs"]))
    log(f"secrets: {res['total_hits']} hit(s) in {sum(n_files.values())} files ({n_parquet} Parquet decoded); "
        f"resume rc {b.rc}, export rc {ex.rc}")
    return res


def _scrubbed_tail(text: str) -> str:
    """The end of a failed launch's stderr for the report, through the project's redactor."""
    from k2repro.audit.redact import scrub_text

    return scrub_text(text[-1500:])


def _decoded(p: Path) -> list:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(p).to_pylist()
    except Exception:  # noqa: BLE001
        return []


# ------------------------------------------------------------------------------ maintenance
def _table_digest(store: Path, run_id: str) -> dict:
    """Per table: row count and sha256 of its sorted rows (through a fresh open, which is also
    what finishes or rolls back an interrupted swap)."""
    import k2repro
    from k2repro.audit import schema as S

    out = {}
    with k2repro.open_store(store) as s:
        for t in S.TABLES:
            with contextlib.suppress(Exception):
                df = s.sql(f"SELECT * FROM {t} WHERE run_id = ? ORDER BY ALL", [run_id])  # noqa: S608
                out[t] = [len(df), hashlib.sha256(df.to_csv(index=False).encode()).hexdigest()[:16]]
    return out


def maintenance_section(work: Path, packed: Path) -> dict:
    """SIGKILL of `gc --compact` (offline: two renames; online: one exchange) at each point of
    its journaled folder swap (audit/compact.py's K2REPRO_SWAP_FAULT hook), on a copy of a
    store of a real run with many small segments; then the next open (a query) or the next gc
    must finish or roll back the swap: every table's rows, by count and content hash, as before,
    and verify-store clean."""
    from k2repro.audit import compact as C
    from k2repro.audit.swaps import pending_swaps

    base = work / "maintenance"
    tpl = base / "template"
    L = k2(["train", *tiny_overrides(packed, tpl, **{"train.max_steps": 240, "ckpt.interval": 120,
                                                     "audit.flush_every": 1, "audit.layer_stats_every": 1,
                                                     "run.name": "maint"})], timeout=600)
    if L.rc != 0 or not L.run_id:
        raise RuntimeError(f"maintenance run failed: {L.stderr[-2000:]}")
    rid = L.run_id
    # the sink merges flushes when its writer falls behind, so how many segments a run leaves
    # varies; with nothing to compact no swap happens and every kill would miss its point
    if not C.plan_run(tpl / rid):
        raise RuntimeError(f"the maintenance run left nothing to compact ({sum(1 for _ in (tpl / rid).glob('*/*'))} "
                           "files): no swap to interrupt")
    before = _table_digest(tpl, rid)
    segs = sum(1 for _ in (tpl / rid).glob("*/*.parquet"))
    cases = []
    points = [("offline", p) for p in ("journaled", "renamed-old", "renamed-new")] + \
             [("online", p) for p in ("journaled", "exchanged")]
    for mode, point in points:
        for recovery in ("open", "gc"):
            store = base / f"{mode}-{point}-{recovery}"
            shutil.copytree(tpl, store)
            env = child_env(**{C.FAULT_ENV: f"{point}:60"})
            args = [PY, "-m", "k2repro", "gc", "--compact", "--store", str(store)] + \
                   (["--offline"] if mode == "offline" else [])
            p = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                 start_new_session=True)
            reached = False
            try:
                line = p.stderr.readline()
                reached = f"swap fault point {point} reached" in line
                kill_group(p.pid)
                p.wait(timeout=60)
            finally:
                kill_group(p.pid)
            journals = len(pending_swaps(store))
            hidden = [h.name for h in (store / rid).glob(".*") if h.is_dir() and (".old-" in h.name or ".swap-" in h.name)]
            if recovery == "gc":
                g = k2(["gc", "--compact", "--store", str(store)] + (["--offline"] if mode == "offline" else []),
                       timeout=300)
                rec_rc = g.rc
            else:
                rec_rc = 0
            after = _table_digest(store, rid)
            v = k2(["verify-store", "--store", str(store)], timeout=300)
            lost = {t: [before[t], after.get(t)] for t in before if after.get(t) != before[t]}
            c = {"mode": mode, "point": point, "recovery": recovery, "killed_at_point": reached,
                 "rc_killed": p.returncode, "journals_left": journals, "hidden_folders_left_by_kill": hidden,
                 "recovery_rc": rec_rc, "tables_equal": not lost, "differences": lost, "verify_rc": v.rc,
                 "verify_message": first_line(v.stderr) if v.rc else "",
                 "journals_after": len(pending_swaps(store)),
                 "hidden_after": [h.name for h in (store / rid).glob(".*.old-*")] + [
                     h.name for h in (store / rid).glob(".*.swap-*")]}
            c["ok"] = (reached and journals >= 1 and rec_rc == 0 and not lost and v.rc == 0
                       and c["journals_after"] == 0 and not c["hidden_after"])
            cases.append(c)
            log(f"maintenance: {mode} {point}, recovered by {recovery}: {'ok' if c['ok'] else 'FAILED'}")
    return {"run": rid, "segments": segs, "tables": {t: v[0] for t, v in before.items()}, "cases": cases,
            "ok": sum(c["ok"] for c in cases), "total": len(cases),
            "failed": [f"{c['mode']} {c['point']} ({c['recovery']})" for c in cases if not c["ok"]]}


# ----------------------------------------------------------------------------------- report
def fixture_run(work: Path, packed: Path, kills: dict | None) -> tuple[Path, str]:
    """A store holding one finished run with checkpoints (the kill reference when there is one)."""
    store = work / "fixture" / "store"
    if kills:  # the reference run alone, with its last two checkpoints (each case copies the store)
        from k2repro.audit.storemeta import ensure_store

        rid = kills["reference_run"]
        src = work / "kills" / "store" / rid
        keep = {p.name for p in sorted((src / "checkpoints").glob("step_*"))[-2:]}
        shutil.copytree(src, store / rid, ignore=lambda d, names: [
            n for n in names if n.startswith(("step_", ".step_")) and n not in keep])
        ensure_store(store)
        return store, rid
    L = k2(["train", *tiny_overrides(packed, store, **{"train.max_steps": 16, "ckpt.interval": 8,
                                                       "audit.flush_every": 4, "run.name": "fixture"})])
    if L.rc != 0 or not L.run_id:
        raise RuntimeError(f"fixture run failed: {L.stderr[-2000:]}")
    return store, L.run_id


def render_md(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Reliability: the fault campaign",
        "",
        f"Generated by `{res['command']}` (scripts/fault_campaign.py, seed {res['seed']}) on "
        f"{res['date']} in {res['wall_s'] / 60:.1f} min.",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, Python {m['python']}, {m['platform']}; "
        f"load average {res['load_before']} before, {res['load_after']} after (a shared machine).",
        "How to read it and what each check means: [docs/reliability.md](../docs/reliability.md).",
        "",
        "## Summary",
        "",
        "| section | result |",
        "|---|---|",
    ]
    for name, text in res["summary"].items():
        lines.append(f"| {name} | {text} |")
    k = res.get("kills")
    if k:
        c = k["counts"]
        cfg = k["config"]
        lines += ["", "## SIGKILLs and resumes", "",
                  f"{c['kills']} kills of tiny runs at world size {cfg['nproc']} ({cfg['max_steps']} steps, flush "
                  f"every {cfg['flush_every']}, checkpoint every {cfg['ckpt_interval']}), chained: each kill is "
                  f"followed by a resume from the newest valid checkpoint of its chain, which may itself be "
                  f"killed later; {k['launches']} launches in all. Every recorded step of every launch is compared "
                  f"bit for bit (loss, grad norm, batch hash) with one uninterrupted reference run "
                  f"(`{k['reference_run']}`)."
                  + (" One more kill, from outside, is in the DVC section." if res.get("dvc") else ""), "",
                  "| count | of kills |", "|---|---|"]
        for key, label in (("fired", "the kill fired (non-zero exit)"), ("store_opened", "store opened"),
                           ("rows_once", "flushed rows each present exactly once (steps, samples per rank, layers)"),
                           ("lost_within_contract", f"lost at most flush_every = {cfg['flush_every']} steps"),
                           ("ckpt_ok", "checkpoints whole and valid or absent"),
                           ("resumed_bit_identical", "resume bit-identical to the reference, lineage recorded"),
                           ("survived", "**all of the above**")):
            lines.append(f"| {c[key]} / {c['kills']} | {label} |")
        lines += ["", "| # | chain | phase | step | rank | from | rc | status | recorded to | lost | ckpts (final / tmp) "
                      "| resumed steps compared | bit-identical | survived |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in k["kills"]:
            kk = r["kill"]
            rs = r.get("resume", {})
            lines.append(
                f"| {r['index']} | {r['chain']} | {kk['phase']} | {kk['step']} | {kk['rank']} | {r['start_step']} | "
                f"{r['rc']} | {r.get('status', '?')} | {r.get('recorded_to_step', '?')} | {r.get('lost_steps', '?')} | "
                f"{len(r.get('ckpt_final', []))} / {r.get('ckpt_tmp', 0)} | {rs.get('steps_compared', 0)} | "
                f"{'yes' if r.get('resumed_bit_identical') else 'NO'} | {'yes' if r.get('survived') else '**NO**'} |")
        bad = [r for r in k["kills"] if not r.get("survived")]
        for r in bad:
            why = r.get("row_problems", []) + r.get("ckpt_problems", [])
            if not r.get("fired"):
                why.append(f"the kill did not fire (rc {r['rc']})")
            if r.get("store_error"):
                why.append(r["store_error"])
            rs = r.get("resume", {})
            if not r.get("resumed_bit_identical"):
                why.append(f"resume: {json.dumps(rs)[:300]}")
            lines.append(f"- kill {r['index']} failed: {'; '.join(why)[:600]}")
        fins = k.get("finals", [])
        lines += ["", f"Final resumes that ran to step {cfg['max_steps']} and completed: "
                      f"{sum(1 for f in fins if f.get('completed'))} / {len(fins)}."]
        tmp = sum(r.get("ckpt_tmp", 0) for r in k["kills"])
        tmpc = sum(r.get("ckpt_tmp_complete", 0) for r in k["kills"])
        lines.append(f"Temporary checkpoint folders left by kills: {tmp} ({tmpc} of them whole, killed between "
                     "the manifest and the rename); none is listed or picked by `train.resume=<run id>`.")
    d = res.get("dvc")
    if d:
        lines += ["", "## SIGKILL of `dvc repro` from outside", "",
                  f"`dvc repro train` in a temporary git repo (corpus slice, train at 2 ranks, 40 steps): the whole "
                  f"process group (dvc, the stage's shell, torchrun, both ranks) got SIGKILL {d.get('delay_s')} s "
                  f"after the first steps segment appeared.", "",
                  "| check | result |", "|---|---|",
                  f"| killed while running | {d.get('killed_while_running')} |",
                  f"| store opened, status | {d.get('store_opened')}, {d.get('status')} |",
                  f"| steps recorded before the kill | {d.get('recorded_to_step')} |",
                  f"| rows each once | {d.get('rows_once')} {d.get('row_problems') or ''} |",
                  f"| checkpoints whole or absent | {d.get('ckpt_ok')} (final {d.get('ckpt_final')}, tmp "
                  f"{d.get('ckpt_tmp')}) |",
                  f"| second `dvc repro train` | rc {d.get('second_repro_rc')}, ran {d.get('second_repro_ran')}; "
                  f"run {d.get('recovered_status')} with {d.get('recovered_steps')} steps |",
                  f"| killed run's steps vs the rerun, bitwise | {d.get('vs_rerun')} |",
                  f"| third `dvc repro train` | rc {d.get('third_repro_rc')}, ran {d.get('third_repro_ran') or 'nothing'} |",
                  f"| **survived** | **{d.get('survived')}** |",
                  "", "DVC removes a stage's outputs before it runs the stage again, so the recovery is a "
                  "clean rerun from step 0 (the killed run's folder goes with it), not a resume."]
    disk = res.get("disk")
    if disk:
        lines += ["", "## Full disk", "",
                  "A 6 MB tmpfs holds the store and the checkpoints; a filler file leaves a little space, so the "
                  "audit sink's segments (no checkpoints, layer stats every step) or the second checkpoint hit "
                  "ENOSPC. Each scenario runs with a few amounts of free space: where the disk fills up decides "
                  "what still fits after the error.", "",
                  "| scenario | rc | last line of stderr | traceback | status | steps intact | checkpoints valid / "
                  "invalid | resume after freeing space | ok |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in disk.items():
            if "skipped" in r:
                lines.append(f"| {name} | skipped: {r['skipped']} | | | | | | | |")
                continue
            lines.append(f"| {name} | {r['rc']} | `{r['message'][:400]}` | {r.get('traceback')} | {r.get('status')} | "
                         f"{r.get('steps_intact')} ({r.get('steps_recorded')} steps) | "
                         f"{len(r.get('checkpoints_valid', []))} / {len(r.get('checkpoints_invalid', []))} | "
                         f"{r.get('resume_after_freeing_rc', '-')} | {'yes' if r['ok'] else '**NO**'} |")
    cor = res.get("corrupt")
    if cor:
        lines += ["", "## Corruption", "",
                  f"{cor['detected']} of {cor['total']} damaged artefacts detected, {cor['named']} with the file "
                  f"named, {cor.get('clean', 0)} with a clean error (a k2repro error, one line, no traceback; a "
                  "bare library exception counts as detected but not clean).", "",
                  "| artefact | file | damage | checked by | detected | file named | clean error | message |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in cor["cases"]:
            msg = c["message"].replace("|", "\\|")[:170]
            extra = ""
            if c.get("silently_changed"):
                extra = " (rows changed silently)"
            if "cli_rc" in c:
                extra += f"; `k2repro sql` rc {c['cli_rc']}{' with a traceback' if c['cli_traceback'] else ''}"
            lines.append(f"| {c['artefact']} | {c['file']} | {c['damage']} | {c['how']} | "
                         f"{'yes' if c['detected'] else '**no**'} | {'yes' if c['named'] else 'no'} | "
                         f"{'yes' if c.get('clean_error') else 'no'} | `{msg}`{extra} |")
    inp = res.get("inputs")
    if inp:
        lines += ["", "## Bad inputs", "",
                  f"{inp['total']} bad inputs; {inp['expected_rc']} exited with the expected code, "
                  f"{inp['no_traceback']} without a traceback, {inp['nothing_written']} wrote nothing (sha256 of "
                  f"the case's folder, which holds a copy of the store, before and after); {inp['ok']} pass all three.",
                  "", "| case | command | rc (expected) | message | nothing written |", "|---|---|---|---|---|"]
        for c in inp["cases"]:
            msg = c["message"].replace("|", "\\|")[:170]
            argv = c["argv"].replace("|", "\\|")
            lines.append(f"| {c['id']} | `{argv[:110]}` | {c['rc']} ({c['expected_rc']}){'' if c['ok'] else ' **FAIL**'}"
                         f" | `{msg}` | {'yes' if c['nothing_written'] else '**no**'} "
                         f"({c['hash_before']}{' = ' if c['nothing_written'] else ' != '}{c['hash_after']}) |")
    ld = res.get("load")
    if ld:
        lat, op, cli = ld["latency_ms"], ld["open_store_ms"], ld["cli_sql"]
        lines += ["", "## Concurrent load", "",
                  f"2 runs (world size 1) trained into one store for {ld['train_wall_s']} s while {ld['readers']} "
                  f"reader processes queried it (in-process `open_store`, 4 query kinds in turn, a fresh connection "
                  f"every 50 queries) at a target of 10 queries/s each, and `k2repro sql` ran every second.", "",
                  "| figure | value |", "|---|---|",
                  f"| reader queries | {ld['queries']} ({ld['queries_per_s_per_reader']}/s per reader achieved) |",
                  f"| errors | {ld['errors']} {ld['error_samples'] or ''} |",
                  f"| stale reads (max(step) going back, completed going back) | {ld['stale_reads']} |",
                  f"| query latency p50 / p99 / max | {lat['p50']} / {lat['p99']} / {lat['max']} ms |",
                  f"| open_store p50 / p99 | {op['p50']} / {op['p99']} ms ({op['n']} opens) |",
                  f"| `k2repro sql` calls, errors, stale, wall p50 / max | {cli['calls']}, {cli['errors']}, "
                  f"{cli['stale_reads']}, {cli['wall_s_p50']} / {cli['wall_s_max']} s |",
                  f"| both runs completed with every step | {all(r['status'] == 'completed' for r in ld['final'])} "
                  f"({[r['n'] for r in ld['final']]} steps) |",
                  f"| **ok** | **{ld['ok']}** |"]
    fo = res.get("forged")
    if fo:
        lines += ["", "## Forged bundles", "",
                  "A real export (2 ranks, 12 steps, checkpoints 4, 8 and 12, packed data with its tokenizer) forged "
                  "as issue 24 found (tests/integration/forge.py, the same forgeries `make test` refuses) and "
                  "resealed with k2repro's own manifest code, so the checksums agree: integrity is not origin. "
                  "Each forgery goes to `k2repro verify-bundle` and `k2repro import bundle` into a fresh store "
                  "(finding 4: a store already holding the real run; finding 5 is `export --out` into the store). "
                  "Nothing written outside the store: sha256 of the whole work folder but the store before and "
                  "after; finding 1 also runs `gc --older-than 30d` after the import and checks the folder outside.",
                  "", f"{fo['ok']} / {fo['total']} refused with nothing written outside the store.", "",
                  "| forgery | verify-bundle rc | import rc | message | nothing outside / store unchanged | ok |",
                  "|---|---|---|---|---|---|"]
        for c in fo["cases"]:
            msg = (c.get("import_message") or "").replace("|", "\\|")[:200]
            lines.append(f"| {c['case']} | {c.get('verify_rc')} | {c.get('import_rc')} | `{msg}` | "
                         f"{c['nothing_outside']} / {c['store_unchanged']} | {'yes' if c['ok'] else '**NO**'} |")
    se = res.get("secrets")
    if se:
        lines += ["", "## Secrets by value", "",
                  "Fake credentials of each provider format (tests/integration/planted.py) planted where issue 24 "
                  "found them, in a real `k2repro train` run (1 rank, 8 steps, checkpoints 4 and 8) launched from a "
                  "git repo with a dirty diff; the run is resumed with `ckpt.dir` naming a token where a file "
                  "blocks the folder (the resume dies on that error), reported on (`k2repro report`) and exported "
                  "with every checkpoint and the data (`export --checkpoints all`). Then every byte of every file of "
                  "the store, the reports, the bundle and the commands' output is searched for each planted value, "
                  "and every Parquet file is decoded and searched too.", "",
                  "| where planted | what |", "|---|---|"]
        for where, what in se["planted"].items():
            lines.append(f"| {where} | {'; '.join(what)} |")
        lines += ["", "| figure | value |", "|---|---|",
                  f"| runs | `{se['run']}` completed; resume `{se['resumed_run']}` rc {se['resumed_rc']}, "
                  f"status {se['resumed_status']} |",
                  f"| reports, export | rc {se['report_rcs']}, rc {se['export_rc']} |",
                  f"| files searched | {se['files_searched']} ({se['parquet_decoded']} Parquet files decoded) |",
                  f"| redaction marker present in the store | {se['redaction_marker_in_store']} |",
                  f"| **planted values found in store, reports, bundle** | **{se['total_hits']}** "
                  f"{se['hits'] if se['total_hits'] else ''} |",
                  f"| planted values in the commands' stdout/stderr | {se.get('cli_output_hits')} "
                  f"{se['hits'].get('CLI output') or ''} |"]
    mt = res.get("maintenance")
    if mt:
        lines += ["", "## Interrupted maintenance", "",
                  f"A real run (`{mt['run']}`, 240 steps, a flush every step (a segment rolls every 32 writes), layer stats every step: {mt['segments']} "
                  "segments) is compacted by `k2repro gc --compact` (offline: two renames; online: one atomic "
                  "exchange) and SIGKILLed at each point of its journaled swap (`K2REPRO_SWAP_FAULT`, "
                  "audit/compact.py). Then the next open of the store (a query) or the next `gc --compact` must "
                  "finish or roll the swap back: every table's row count and content hash as before the "
                  "compaction, no journal or hidden folder left, `verify-store` exit 0.", "",
                  f"{mt['ok']} / {mt['total']} recovered with every row.", "",
                  "| mode | killed at | recovered by | journal left by the kill | hidden folders left by the kill | "
                  "rows equal (every table) | verify-store | ok |", "|---|---|---|---|---|---|---|---|"]
        for c in mt["cases"]:
            lines.append(f"| {c['mode']} | {c['point']} | {c['recovery']} | {c['journals_left']} | "
                         f"{', '.join(c['hidden_folders_left_by_kill']) or '-'} | {c['tables_equal']} "
                         f"{c['differences'] or ''} | rc {c['verify_rc']} | {'yes' if c['ok'] else '**NO**'} |")
    if res.get("errors"):
        lines += ["", "## Sections that crashed", ""] + [f"- {k}: `{v}`" for k, v in res["errors"].items()]
    return "\n".join(lines) + "\n"


def summarize(res: dict) -> dict:
    s: dict = {}
    k = res.get("kills")
    if k:
        c = k["counts"]
        s["SIGKILL + resume (trainer faults)"] = (f"{c['survived']}/{c['kills']} survived (store opened {c['store_opened']}, "
                                                  f"rows once {c['rows_once']}, checkpoints ok {c['ckpt_ok']}, resumed "
                                                  f"bit-identical {c['resumed_bit_identical']})")
    d = res.get("dvc")
    if d:
        s["SIGKILL of `dvc repro` from outside"] = f"{'survived' if d.get('survived') else 'FAILED'}; recovered cleanly: {d.get('recovered_cleanly')}"
    if k or d:
        total = (k["counts"]["kills"] if k else 0) + (1 if d else 0)
        ok = (k["counts"]["survived"] if k else 0) + (1 if d and d.get("survived") else 0)
        s["all kills"] = f"**{ok}/{total}** survived with nothing lost"
    disk = res.get("disk")
    if disk:
        s["full disk"] = "; ".join(f"{n}: {'ok' if r.get('ok') else ('skipped' if 'skipped' in r else 'FAILED')}"
                                   f"{'' if r.get('ok') or 'skipped' in r else ' (' + str(r.get('status')) + ')'}"
                                   for n, r in disk.items())
    cor = res.get("corrupt")
    if cor:
        s["corruption"] = (f"{cor['detected']}/{cor['total']} detected, {cor['named']} naming the file, "
                           f"{cor.get('clean', 0)} with a clean one-line error")
        vs = cor.get("verify_store")
        if vs:
            s["store corruption, verify-store"] = (f"{vs['detected']}/{vs['total']} detected"
                                                   + (f" (FAILED: missed {', '.join(vs['missed'])})" if vs["missed"] else ""))
    inp = res.get("inputs")
    if inp:
        s["bad inputs"] = f"{inp['ok']}/{inp['total']} clean (expected exit code, no traceback, nothing written)"
    ld = res.get("load")
    if ld:
        s["concurrent load"] = (f"{ld['errors']} errors, {ld['stale_reads']} stale reads in {ld['queries']} queries; "
                                f"p50 {ld['latency_ms']['p50']} ms, p99 {ld['latency_ms']['p99']} ms")
    fo = res.get("forged")
    if fo:
        s["forged bundles"] = (f"{fo['ok']}/{fo['total']} refused with nothing written outside the store"
                               + (f" (FAILED: {', '.join(fo['failed'])})" if fo["failed"] else ""))
    se = res.get("secrets")
    if se:
        s["secrets by value"] = (f"{se['total_hits']} planted values found in "
                                 f"{sum(se['files_searched'].values())} files of store, reports and bundle "
                                 f"({se['parquet_decoded']} Parquet files decoded)" + ("" if se["ok"] else " (FAILED)")
                                 + (f"; {se['cli_output_hits']} in the commands' stderr" if se.get("cli_output_hits")
                                    else ""))
    mt = res.get("maintenance")
    if mt:
        s["interrupted maintenance"] = (f"{mt['ok']}/{mt['total']} SIGKILLed compactions recovered every row"
                                        + (f" (FAILED: {', '.join(mt['failed'])})" if mt["failed"] else ""))
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=20241127)
    ap.add_argument("--kills", type=int, default=19, help="trainer kills (the DVC kill comes on top)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks of the killed runs")
    ap.add_argument("--steps", type=int, default=64, help="steps of the killed runs")
    ap.add_argument("--bad-inputs", type=int, default=None, help="run only this many bad inputs (seeded pick)")
    ap.add_argument("--load-steps", type=int, default=800)
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--out", default=str(REPO / "reports"), help="folder for reliability.md and reliability.json")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one, removed at the end)")
    ap.add_argument("--reader", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reader:
        return reader_main(args.reader[0], args.reader[1], args.reader[2], float(args.reader[3]))
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s) {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    os.environ["OMP_NUM_THREADS"] = "1"
    tmp = None
    if args.work:
        work = Path(args.work).resolve()
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
    else:
        tmp = tempfile.mkdtemp(prefix="k2repro-faults-")
        work = Path(tmp)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"seed": args.seed, "machine": machine(), "sections": sections,
                 "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "load_before": [round(x, 2) for x in os.getloadavg()], "errors": {},
                 "command": "make faults" if argv is None and len(sys.argv) == 1
                 else "python scripts/fault_campaign.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    rng = {s: np.random.default_rng([args.seed, i]) for i, s in enumerate(SECTIONS)}
    log(f"fault campaign: sections {sections}, seed {args.seed}, work {work}")
    packed = make_packed(work / "packed")
    try:
        def section(name: str, fn: Callable[[], dict]) -> None:
            if name not in sections:
                return
            try:
                res[name] = fn()
            except Exception:
                res["errors"][name] = traceback.format_exc()[-3000:]
                log(f"{name}: crashed:\n{res['errors'][name]}")

        section("kills", lambda: kills_section(work, packed, rng["kills"], args.kills, args.nproc, args.steps))
        need_fixture = {"corrupt", "inputs"} & set(sections)
        fixture = fixture_run(work, packed, res.get("kills")) if need_fixture else None
        section("corrupt", lambda: corrupt_section(work, packed, fixture[0], fixture[1], rng["corrupt"]))
        section("inputs", lambda: inputs_section(work, packed, fixture[0], fixture[1], args.bad_inputs, rng["inputs"]))
        section("disk", lambda: disk_section(work, packed))
        section("load", lambda: load_section(work, packed, args.load_steps))
        section("dvc", lambda: dvc_section(work, rng["dvc"]))
        section("forged", lambda: forged_section(work))
        section("secrets", lambda: secrets_section(work, packed))
        section("maintenance", lambda: maintenance_section(work, packed))
    finally:
        res["wall_s"] = round(time.time() - T0, 1)
        res["load_after"] = [round(x, 2) for x in os.getloadavg()]
        res["summary"] = summarize(res)
        def scrub(text: str) -> str:  # no paths of this machine in the committed reports
            return text.replace(str(work), "<work>").replace(str(REPO), "<repo>")

        (out / "reliability.json").write_text(scrub(json.dumps(res, indent=2, sort_keys=True, default=str)) + "\n")
        (out / "reliability.md").write_text(scrub(render_md(res)))
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out / 'reliability.md'} and reliability.json in {res['wall_s'] / 60:.1f} min")
    for k_, v in res["summary"].items():
        log(f"  {k_}: {v}")
    missed = ((res.get("corrupt") or {}).get("verify_store") or {}).get("missed")
    failed = [n for n in ("forged", "secrets", "maintenance") if res.get(n) and not (
        res[n].get("ok") is True or res[n].get("ok") == res[n].get("total"))]
    return 1 if res["errors"] or missed or failed else 0


if __name__ == "__main__":
    sys.exit(main())
