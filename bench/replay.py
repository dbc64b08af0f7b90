"""Replay cost: wall time of `k2repro replay` over a step window / the original run's wall time
for the same steps, on a window of at least 60 s of training so that start-up is amortised.
Goal: <= 1.2. Writes reports/bench/replay.json.

World size 1 (CPU, 1 thread), a small LLaMA (2 layers, d_model 128) on the synthetic test
corpus. The original trains N steps with a checkpoint every C steps; the window is C+1..N.
Baseline: the original's wall time for the window, from the commit time of its checkpoint of
step C to that of step N (both include the same checkpoint saves the replay does). Replay: the
whole `k2repro replay` command (plan, checkpoint and data verification, launch, training,
comparison), measured from outside. A short calibration run picks N for the window target.
Pairs run A B, B A (original, replay; the second pair replays the first original) so that load
drift on a shared machine hits both sides; the ratio is the median over pairs.

    .venv/bin/python bench/replay.py [--window-s 66] [--pairs 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import write  # noqa: E402
from tests.conftest import make_packed, tiny_overrides  # noqa: E402

MODEL = {"model.d_model": 128, "model.n_heads": 4, "model.n_kv_heads": 4, "model.ffn_dim": 344,
         "model.max_seq_len": 64, "train.seq_len": 64, "train.global_batch_size": 16, "train.micro_batch_size": 4,
         "audit.flush_every": 20, "audit.layer_stats_every": 50}
CKPT_EVERY = 50


def k2(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "k2repro", *args], cwd=cwd, env=env, capture_output=True, text=True)
    return p, time.perf_counter() - t0


def train(packed: Path, store: Path, steps: int, cwd: Path) -> tuple[str, float]:
    ov = tiny_overrides(packed, store, **{**MODEL, "train.max_steps": steps, "ckpt.interval": CKPT_EVERY,
                                          "optim.warmup_steps": 20})
    p, wall = k2("train", *ov, cwd=cwd)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    return re.search(r"run_id=(\S+)", p.stdout).group(1), wall


def original(packed: Path, store: Path, n: int, root: Path) -> dict:
    """Train N steps; the window's wall time is between the commits of checkpoints C and N."""
    import k2repro

    run_id, wall = train(packed, store, n, root)
    with k2repro.open_store(store) as s:
        ck = s.checkpoints(run_id).set_index("step")
        st = s.steps(run_id)
    return {"run_id": run_id, "process_wall_s": wall,
            "window_wall_s": (ck.loc[n, "time"] - ck.loc[CKPT_EVERY, "time"]).total_seconds(),
            "window_step_time_sum_s": float(st[st["step"] > CKPT_EVERY]["step_time_s"].sum())}


def replay(run_id: str, store: Path, n: int, root: Path) -> dict:
    p, wall = k2("replay", run_id, "--from-step", str(CKPT_EVERY + 1), "--to-step", str(n), "--store", str(store),
                 "--json", cwd=root)
    if p.returncode != 0:
        raise SystemExit(f"replay exited {p.returncode}: {p.stderr[-3000:]}")
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    import k2repro

    with k2repro.open_store(store) as s:
        steps = float(s.steps(rep["replay_run_id"])["step_time_s"].sum())
    return {"wall_s": wall, "training_subprocess_wall_s": rep["train_wall_s"], "bit_exact": rep["bit_exact"],
            "steps_compared": rep["steps_compared"], "window_step_time_sum_s": steps,
            "overhead_s": wall - steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--window-s", type=float, default=66.0, help="target seconds of training in the window")
    ap.add_argument("--pairs", type=int, default=2, help="ABBA pairs (original, replay)")
    args = ap.parse_args()
    import k2repro

    pairs = []
    with tempfile.TemporaryDirectory(prefix="k2repro-bench-replay-") as tmp:
        root = Path(tmp)
        packed = make_packed(root / "packed", n_docs=400, seq_len=64)
        # calibration: seconds per step of this config on this machine, at its quickest (10th
        # percentile), so that the window holds >= window_s of training even if the load drops
        cal_id, _ = train(packed, root / "cal", CKPT_EVERY, root)
        with k2repro.open_store(root / "cal") as s:
            per_step = float(s.steps(cal_id)["step_time_s"].iloc[5:].quantile(0.1))
        window_steps = CKPT_EVERY * math.ceil(args.window_s / per_step / CKPT_EVERY)
        n = CKPT_EVERY + window_steps
        store = root / "store"
        first = None
        for i in range(args.pairs):  # A B, B A, ...: drift on a shared machine hits both sides
            load = os.getloadavg()[0]
            if i % 2 == 0:
                o = original(packed, store, n, root)
                first = first or o["run_id"]
                r = replay(o["run_id"], store, n, root)
            else:
                r = replay(first, store, n, root)
                o = original(packed, store, n, root)
            pairs.append({"original": o, "replay": r, "ratio": r["wall_s"] / o["window_wall_s"],
                          "step_time_ratio": r["window_step_time_sum_s"] / o["window_step_time_sum_s"],
                          "load_avg_1min_at_start": load})
    ratios = [p["ratio"] for p in pairs]
    ratio = statistics.median(ratios)
    write("replay", {
        "what": "wall time of `k2repro replay` (whole command: plan, checkpoint + data verification, launch, "
                "training, comparison) / the original's wall time for the same steps (checkpoint commit of "
                "step C to that of step N)",
        "config": "world size 1, CPU, 1 thread; LLaMA 2 layers d_model 128 ffn 344, vocab 320, global batch 16 x 64 "
                  f"tokens, micro 4; checkpoint every {CKPT_EVERY} steps; audit on (flush 20, layer stats every 50)",
        "window": [CKPT_EVERY + 1, n], "window_steps": window_steps, "calibrated_s_per_step": per_step,
        "pairs": pairs, "ratios": ratios, "ratio": ratio, "goal": "<= 1.2", "meets_goal": ratio <= 1.2,
        # load-robust view: what replay adds beyond training the steps (start-up, verification,
        # comparison, checkpoint saves), over the original's window
        "median_overhead_s": statistics.median(p["replay"]["overhead_s"] for p in pairs),
        "median_step_time_ratio": statistics.median(p["step_time_ratio"] for p in pairs),
        "overhead_ratio": 1 + statistics.median(p["replay"]["overhead_s"] for p in pairs)
        / statistics.median(p["original"]["window_wall_s"] for p in pairs),
        "all_bit_exact": all(p["replay"]["bit_exact"] for p in pairs),
        "all_windows_ge_60s": all(p["original"]["window_wall_s"] >= 60 for p in pairs),
        "command": f"python bench/replay.py --window-s {args.window_s:g} --pairs {args.pairs}",
    })


if __name__ == "__main__":
    main()
