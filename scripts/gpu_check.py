"""The prepared GPU check (issue 12): run on a machine with one NVIDIA GPU, under 8 minutes.

1. the test suite's GPU-marked tests;
2. `model=1b` (bf16, one GPU) for --steps steps with full audit, then the same with the audit
   off: tokens/s, MFU, and the audit overhead ratio (mean step time on / off, steps 11..N);
3. two identical runs with train.deterministic=true: bit-identical losses?

Prints a JSON summary and writes it to reports/bench/gpu.json. On a CPU machine it runs with
`--model tiny --precision fp32` as a smoke test of the script itself (no MFU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def train(packed: Path, store: Path, model: str, precision: str, steps: int, audit: bool, timings: Path,
          extra: list[str]) -> subprocess.CompletedProcess:
    args = [f"model={model}", f"data.packed_dir={packed}", f"audit.store={store}", f"train.max_steps={steps}",
            f"train.precision={precision}", f"audit.enabled={str(audit).lower()}", "audit.layer_stats_every=1",
            "train.seq_len=2048" if model == "1b" else "train.seq_len=64",
            "train.global_batch_size=8", "train.micro_batch_size=8" if model == "1b" else "train.micro_batch_size=2",
            "model.vocab_size=32032" if model != "1b" else "optim.warmup_steps=10", "data.vocab_size=32032",
            *extra]
    env = dict(os.environ, K2REPRO_TIMINGS_FILE=str(timings), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "k2repro", "train", *args], env=env, capture_output=True, text=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="1b")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args()
    import k2repro
    from tests.conftest import make_packed

    out: dict = {"model": args.model, "precision": args.precision, "steps": args.steps}
    t0 = time.time()
    if not args.skip_tests:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], cwd=REPO,
                           capture_output=True, text=True)
        out["gpu_tests"] = {"exit": r.returncode, "tail": r.stdout.strip().splitlines()[-1:]}
        print(r.stdout[-2000:], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seq = 2048 if args.model == "1b" else 64
        packed = make_packed(tmp / "packed", n_docs=600, vocab=32032, seq_len=seq)
        runs = {}
        for name, audit in (("audit_on", True), ("audit_off", False), ("audit_on_again", True)):
            timings = tmp / f"{name}.json"
            r = train(packed, tmp / name, args.model, args.precision, args.steps, audit, timings, [])
            if r.returncode != 0:
                print(r.stderr[-4000:], file=sys.stderr)
                out[name] = {"exit": r.returncode}
                continue
            times = [t for s, t in json.loads(timings.read_text()) if s > 10]
            runs[name] = {"store": tmp / name, "run_id": r.stdout.split("run_id=")[1].split()[0],
                          "mean_step_s": sum(times) / len(times)}
            print(f"{name}: {runs[name]['mean_step_s'] * 1e3:.1f} ms/step", flush=True)
        if "audit_on" in runs and "audit_off" in runs:
            out["audit_overhead_ratio"] = runs["audit_on"]["mean_step_s"] / runs["audit_off"]["mean_step_s"]
        if "audit_on" in runs:
            with k2repro.open_store(runs["audit_on"]["store"]) as s:
                st = s.steps(runs["audit_on"]["run_id"])
            tail = st[st["step"] > 10]
            out["tokens_per_s"] = float(tail["tokens_per_s"].median())
            out["mfu"] = float(tail["mfu"].median()) if tail["mfu"].notna().any() else None
            out["peak_mem_gb"] = float(tail["peak_mem_bytes"].max() / 2**30) if tail["peak_mem_bytes"].notna().any() else None
        if "audit_on" in runs and "audit_on_again" in runs:
            import numpy as np

            with k2repro.open_store(runs["audit_on"]["store"]) as s:
                a = s.steps(runs["audit_on"]["run_id"])["loss"].to_numpy()
            with k2repro.open_store(runs["audit_on_again"]["store"]) as s:
                b = s.steps(runs["audit_on_again"]["run_id"])["loss"].to_numpy()
            out["deterministic_bit_identical"] = bool(np.array_equal(a.view(np.int64), b.view(np.int64)))
    out["wall_s"] = round(time.time() - t0, 1)
    sys.path.insert(0, str(REPO / "bench"))
    from bench._common import write

    write("gpu", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
