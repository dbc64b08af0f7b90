"""Step time with the audit on (full: layer_stats_every=1 + sample stats; and the defaults)
against the audit off, same config, tiny model, 2 ranks (torchrun), ABBA-interleaved pairs.
Mean step time over steps 11..N (flush work included), median ratio and 95% bootstrap interval
to reports/bench/audit.json. Goals: <= 1.03 full, <= 1.01 defaults.

    .venv/bin/python bench/audit_overhead.py [--pairs 5] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import bootstrap_ci, write  # noqa: E402
from tests.conftest import make_packed  # noqa: E402


def run(packed: Path, store: Path, steps: int, audit: dict, tmp: Path) -> float:
    timings = tmp / "t.json"
    over = {
        "model.vocab_size": 320, "data.vocab_size": 320, "data.packed_dir": packed, "audit.store": store,
        "train.seq_len": 64, "model.max_seq_len": 128, "train.global_batch_size": 16,
        "train.micro_batch_size": 4, "train.max_steps": steps, "parallel.nproc": 2, **audit,
    }
    args = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in over.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", K2REPRO_TIMINGS_FILE=str(timings))
    subprocess.run([sys.executable, "-m", "k2repro", "train", *args], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times = [t for s, t in json.loads(timings.read_text()) if s > 10]
    return sum(times) / len(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    variants = {
        "off": {"audit.enabled": False},
        "full": {"audit.enabled": True, "audit.layer_stats_every": 1, "audit.sample_stats": True},
        "default": {"audit.enabled": True},
    }
    res: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        packed = make_packed(tmp / "packed", n_docs=400, seq_len=64)
        for i in range(args.pairs):
            order = list(variants) if i % 2 == 0 else list(reversed(variants))  # A B C / C B A
            for name in order:
                res[name].append(run(packed, tmp / f"store{i}{name}", args.steps, variants[name], tmp))
                print(f"pair {i} {name}: {res[name][-1] * 1e3:.2f} ms/step", flush=True)
    out = {"what": "mean step time (steps 11..N) with audit / without, 2 ranks gloo, tiny model",
           "pairs": args.pairs, "steps": args.steps, "step_time_s": res}
    for name, goal in (("full", 1.03), ("default", 1.01)):
        ratios = [a / b for a, b in zip(res[name], res["off"])]
        lo, hi = bootstrap_ci(ratios)
        out[name] = {"ratios": ratios, "median_ratio": statistics.median(ratios), "ci95": [lo, hi], "goal": goal,
                     "met": statistics.median(ratios) <= goal}
    write("audit", out)


if __name__ == "__main__":
    main()
