"""Audit a plain PyTorch training loop with k2repro (docs/audit-api.md).

    python examples/plain_pytorch.py STORE [--steps N]
    k2repro runs --store STORE;  k2repro forensics RUN --store STORE
"""
import argparse
from pathlib import Path

import torch

import k2repro.audit

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("store")
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--name", default="plain-pytorch")
args = ap.parse_args()
cfg = {"seed": 0, "vocab": 64, "d_model": 32, "seq_len": 16, "batch": 8, "lr": 3e-3, "steps": args.steps}
torch.manual_seed(cfg["seed"])
model = torch.nn.Sequential(torch.nn.Embedding(cfg["vocab"], cfg["d_model"]),
                            torch.nn.Linear(cfg["d_model"], cfg["vocab"]))
opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
data = torch.randint(0, cfg["vocab"], (256, cfg["seq_len"] + 1))  # a synthetic token dataset

with k2repro.audit.start(args.store, config=cfg, name=args.name) as run:  # failed on an exception
    print(f"run_id={run.run_id}", flush=True)
    for step in range(1, cfg["steps"] + 1):
        ids = torch.randint(0, len(data), (cfg["batch"],))  # the sample ids of this step's batch
        x = data[ids]
        logits = model(x[:, :-1])
        per_sample = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(1)
        loss = per_sample.mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        run.log_layer_stats(step, model, opt)  # before opt.step(): measures this step's update
        opt.step()
        opt.zero_grad()
        # tensors stay on the device until the flush: no .item() per step
        run.log_step(step, loss=loss, lr=cfg["lr"], grad_norm=grad_norm, tokens=x[:, 1:].numel(), batch_ids=ids)
        run.log_samples(step, ids, per_sample.detach(), n_tokens=cfg["seq_len"])
        if step % 10 == 0:
            path = Path(args.store) / run.run_id / "checkpoints" / f"step_{step:08d}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, path)
            run.log_checkpoint(step, path)
