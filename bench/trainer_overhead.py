"""Tokens/s of k2repro's trainer (world size 1, audit off) vs a bare PyTorch loop on the same
model, batch, accumulation and thread count. ABBA pairs; median ratio with a 95% bootstrap
interval to reports/bench/trainer.json. Goal: ratio >= 0.95.

    .venv/bin/python bench/trainer_overhead.py [--pairs 5] [--steps 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench._common import abba, bootstrap_ci, write  # noqa: E402
from k2repro.config.load import load_config  # noqa: E402
from k2repro.data.loader import StepSampler  # noqa: E402
from k2repro.data.packed import PackedDataset  # noqa: E402
from k2repro.distributed.init import DistInfo  # noqa: E402
from k2repro.model.build import build_model  # noqa: E402
from k2repro.train.trainer import Trainer  # noqa: E402
from tests.conftest import make_packed, tiny_overrides  # noqa: E402


def bare_loop(cfg, steps: int) -> float:  # noqa: ANN001
    """The 30-line baseline: same model, data order, accumulation, clipping and AdamW."""
    t = cfg.train
    data = PackedDataset(cfg.data.packed_dir)
    sampler = StepSampler(t.seed, len(data), t.global_batch_size, t.max_steps)
    model = build_model(cfg.model, cfg.train.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(0.9, 0.95), weight_decay=0.1)
    mb = t.micro_batch_size
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x = torch.from_numpy(data.get(sampler.ids(step), t.seq_len))
        for i in range(0, len(x), mb):
            chunk = x[i:i + mb]
            logits = model(chunk[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
            (loss * len(chunk) / len(x)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * t.global_batch_size * t.seq_len / (time.perf_counter() - start)


def ours(cfg, steps: int) -> float:  # noqa: ANN001
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    trainer = Trainer(cfg, info, "bench")
    start = time.perf_counter()
    trainer.fit()
    return steps * cfg.train.global_batch_size * cfg.train.seq_len / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # the trainer sets it; give the baseline the same
    with tempfile.TemporaryDirectory() as tmp:
        packed = make_packed(Path(tmp) / "packed", n_docs=400, seq_len=64)
        cfg = load_config(tiny_overrides(packed, Path(tmp) / "store", **{
            "audit.enabled": False, "train.max_steps": args.steps, "train.deterministic": False,
            # the tiny preset's shape (vocab of the synthetic corpus)
            "model.d_model": 64, "model.n_heads": 4, "model.n_kv_heads": 4, "model.ffn_dim": 172,
            "train.seq_len": 64, "model.max_seq_len": 128}))
        ours(cfg, 5), bare_loop(cfg, 5)  # warm-up
        a, b = abba(lambda: ours(cfg, args.steps), lambda: bare_loop(cfg, args.steps), args.pairs)
    ratios = [x / y for x, y in zip(a, b)]
    lo, hi = bootstrap_ci(ratios)
    write("trainer", {
        "what": "tokens/s of k2repro Trainer.fit (world size 1, audit off) / bare PyTorch loop",
        "goal": ">= 0.95", "pairs": args.pairs, "steps": args.steps,
        "ours_tokens_per_s": a, "baseline_tokens_per_s": b, "ratios": ratios,
        "median_ratio": statistics.median(ratios), "ci95": [lo, hi],
        "config": "tiny preset shape (2 layers, d_model 64), vocab 320, global batch 8 x 64 tokens, micro 2, 1 thread",
    })


if __name__ == "__main__":
    main()
