"""Overhead of the OLMo-core callback (k2repro.integrations.olmo_core): the same tiny OLMo-core
run (tests/integration/olmo_core_harness.py, 2 gloo ranks under torchrun, CPU) without the
callback, with it at its defaults (layer stats every 10 steps), and with layer stats every step,
ABBA-interleaved. Mean step wall time over steps `--skip`+1..N (rank 0), median ratio against
the run without the callback and a 95% bootstrap interval.

Also recorded (`host_work`), steadier than wall times on a shared machine: each rank's CPU
time inside the callback's per-step hooks (`host_s`: drains, row building, and on CPU the
layer-statistics arithmetic itself) plus the audit writer thread's CPU time, per step, as a share of the step
time without the callback. Goals (issue 21): <= 1% at the defaults, <= 3% with layer stats
every step. JSON to reports/bench/integrations.json.

    OMP_NUM_THREADS=1 .venv/bin/python bench/integrations.py [--pairs 6] [--steps 200]
    .venv/bin/python bench/integrations.py --pairs 1 --steps 12 --skip 2 --out /tmp/x   # smoke check
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

from bench._common import REPO, bootstrap_ci, write  # noqa: E402

HARNESS = REPO / "tests" / "integration" / "olmo_core_harness.py"
VARIANTS = {"off": None, "default": 10, "full": 1}  # layer_stats_every; None: no callback
GOALS = {"default": 0.01, "full": 0.03}


def run(tmp: Path, tokens: Path, name: str, every: int | None, steps: int, d_model: int, layers: int) -> list[dict]:
    """One training run; the per-rank timings the harness writes."""
    work = tmp / name
    timings = tmp / f"{name}.timings"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(HARNESS),
            "--work", str(work), "--tokens", str(tokens), "--steps", str(steps), "--save-interval", "1000000",
            "--d-model", str(d_model), "--layers", str(layers), "--timings", str(timings), "--name", "bench"]
    if every is not None:
        args += ["--store", str(tmp / "store"), "--layer-stats-every", str(every)]
    env = dict(os.environ, OMP_NUM_THREADS="1", LOGLEVEL="WARNING")
    p = subprocess.run(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench run {name} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return [json.loads(Path(f"{timings}.r{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the mean")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default=None, help="folder for integrations.json (default reports/bench)")
    a = ap.parse_args()
    if a.out:
        import bench._common as common

        common.OUT = Path(a.out)
    from tests.integration.olmo_core_harness import token_file

    step_s: dict[str, list[float]] = {k: [] for k in VARIANTS}
    ranks: dict[str, list[list[dict]]] = {k: [] for k in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        tokens = token_file(tmp / "tokens.npy", n_tokens=max(64 * 1024, (a.steps + 2) * 8 * 32))
        for i in range(a.pairs):
            order = list(VARIANTS) if i % 2 == 0 else list(reversed(VARIANTS))  # A B C / C B A
            for name in order:
                r = run(tmp, tokens, f"{name}{i}", VARIANTS[name], a.steps, a.d_model, a.layers)
                walls = r[0]["walls"][a.skip:]  # walls[k]: step k+2 (from one post_step to the next)
                step_s[name].append(sum(walls) / len(walls))
                ranks[name].append(r)
                print(f"pair {i} {name}: {step_s[name][-1] * 1e3:.2f} ms/step", flush=True)
    off_ms = statistics.median(step_s["off"]) * 1e3
    out: dict = {"what": "mean step wall time (rank 0) with the OLMo-core callback / without, 2 gloo ranks, "
                         "tiny OLMo-core transformer, CPU",
                 "pairs": a.pairs, "steps": a.steps, "skip": a.skip, "d_model": a.d_model, "layers": a.layers,
                 "step_time_s": step_s,
                 "host_work": {"what": "ms per step, median over runs, per rank: the training thread's CPU time "
                                       "in the callback's per-step hooks (host_ms; host_wall_ms: their wall "
                                       "time, which other processes inflate) and the audit writer thread's CPU (writer_cpu_ms); share = "
                                       "their sum / the step time without the callback; setup_s: once per run "
                                       "(starting the audit run at pre_train, closing it)", "off_step_ms": off_ms}}
    for name, goal in GOALS.items():
        per_rank = {}
        for rk in (0, 1):
            host = statistics.median(r[rk]["host_cpu_s"] / r[rk]["steps"] * 1e3 for r in ranks[name])
            host_wall = statistics.median(r[rk]["host_s"] / r[rk]["steps"] * 1e3 for r in ranks[name])
            writer = statistics.median(r[rk]["writer_cpu_s"] / r[rk]["steps"] * 1e3 for r in ranks[name])
            setup = statistics.median(r[rk]["setup_s"] for r in ranks[name])
            per_rank[f"rank{rk}"] = {"host_ms": host, "host_wall_ms": host_wall, "writer_cpu_ms": writer, "share_of_step": (host + writer) / off_ms,
                                     "setup_s": setup}
        worst = max(v["share_of_step"] for v in per_rank.values())
        out["host_work"][name] = {**per_rank, "goal": goal, "met": worst <= goal}
        ratios = [x / y for x, y in zip(step_s[name], step_s["off"])]
        lo, hi = bootstrap_ci(ratios)
        out[name] = {"layer_stats_every": VARIANTS[name], "ratios": ratios, "median_ratio": statistics.median(ratios),
                     "ci95": [lo, hi]}
    write("integrations", out)


if __name__ == "__main__":
    main()
