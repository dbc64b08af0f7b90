"""AdamW whose update can be masked on the device, and the lr schedule.

Masking (rather than skipping `step()` on the host) lets the spike guard decide to skip an
update without a host-device sync: every rank computes the same mask from the same reduced
statistics. A masked step leaves parameters, moments and the step count bit-identical to a
step that was never taken. The optimizer also returns per-parameter squared norms of the
parameter and of the applied update, which the audit's layer statistics need.
"""

from __future__ import annotations

import math

import torch

from k2repro.distributed.fsdp import local


def lr_at(step: int, lr: float, min_lr: float, warmup: int, max_steps: int) -> float:
    """Linear warmup (step 1's lr is lr / warmup, not 0), then cosine to min_lr at max_steps."""
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    if max_steps <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / (max_steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class MaskableAdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam (Loshchilov & Hutter) on local shards."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8,  # noqa: ANN001
                 weight_decay: float = 0.1) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None, apply: torch.Tensor | None = None,  # noqa: ANN001
             norms_for: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One update. `apply` is a 0-d bool tensor (None: apply). With `norms_for` (the
        parameters in the caller's order), returns (param_sq, update_sq): local sums of squares
        of each parameter after the step and of the update applied, stacked in that order."""
        assert closure is None
        want_norms = norms_for is not None
        sq: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=local(p).device)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                w, g = local(p), local(p.grad)
                m, v = local(st["exp_avg"]), local(st["exp_avg_sq"])
                step_t = st["step"]
                new_step = step_t + 1
                new_m = m * b1 + g * (1 - b1)
                new_v = v * b2 + g * g * (1 - b2)
                bc1 = 1 - b1 ** new_step
                bc2 = 1 - b2 ** new_step
                denom = (new_v / bc2).sqrt() + eps
                new_w = w * (1 - lr * wd) - (new_m / bc1) / denom * lr
                if apply is None:
                    upd = new_w - w if want_norms else None
                    w.copy_(new_w)
                    m.copy_(new_m)
                    v.copy_(new_v)
                    step_t.copy_(new_step)
                else:
                    upd = (new_w - w) * apply if want_norms else None
                    w.copy_(torch.where(apply, new_w, w))
                    m.copy_(torch.where(apply, new_m, m))
                    v.copy_(torch.where(apply, new_v, v))
                    step_t.copy_(torch.where(apply, new_step, step_t))
                if want_norms:
                    sq[id(p)] = (w.float().pow(2).sum(), upd.float().pow(2).sum())
        if norms_for is not None:
            zero = torch.zeros((), dtype=torch.float32)
            pairs = [sq.get(id(p), (zero, zero)) for p in norms_for]
            return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
        return None


def build_optimizer(model: torch.nn.Module, o) -> MaskableAdamW:  # noqa: ANN001 - OptimConfig
    """Weight decay on matrices only (norm gains and 1-D params are not decayed)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return MaskableAdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
