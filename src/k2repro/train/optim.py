"""AdamW whose update can be masked on the device, and the lr schedule.

Masking (rather than skipping `step()` on the host) lets the spike guard decide to skip an
update without a host-device sync: every rank computes the same mask from the same reduced
statistics. A masked step leaves parameters, moments and the step count bit-identical to a
step that was never taken. The optimizer also returns per-parameter squared norms of the
parameter and of the applied update, which the audit's layer statistics need.
"""

from __future__ import annotations

import math
import time

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
    """Decoupled-weight-decay Adam (Loshchilov & Hutter) on local shards, with foreach kernels."""

    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8,  # noqa: ANN001
                 weight_decay: float = 0.1) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._norms_cpu_s = 0.0

    @torch.no_grad()
    def step(self, closure=None, apply: torch.Tensor | None = None,  # noqa: ANN001
             norms_for: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One update. `apply` is a 0-d bool tensor (None: apply). With `norms_for` (the
        parameters in the caller's order), returns (param_sq, update_sq): local sums of squares
        of each parameter before the step and of the update applied, stacked in that order."""
        assert closure is None
        pn: list[torch.Tensor] = []
        un: list[torch.Tensor] = []
        order: list[int] = []
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=local(p).device)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
            ws = [local(p) for p in params]
            gs = [local(p.grad) for p in params]
            ms = [local(self.state[p]["exp_avg"]) for p in params]
            vs = [local(self.state[p]["exp_avg_sq"]) for p in params]
            steps = [self.state[p]["step"] for p in params]
            inplace = apply is None
            # Every parameter of a group is updated together, so one step count serves all.
            t = steps[0] + 1
            bc1 = 1 - b1 ** t
            bc2_sqrt = (1 - b2 ** t).sqrt()
            if inplace:
                new_m, new_v = ms, vs
                torch._foreach_lerp_(ms, gs, 1 - b1)
                torch._foreach_mul_(vs, b2)
            else:
                new_m = torch._foreach_lerp(ms, gs, 1 - b1)
                new_v = torch._foreach_mul(vs, b2)
            torch._foreach_addcmul_(new_v, gs, gs, 1 - b2)
            denom = torch._foreach_sqrt(new_v)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, eps)
            upd = list(torch._foreach_div(new_m, denom))
            torch._foreach_mul_(upd, -lr / bc1)
            if wd:
                torch._foreach_add_(upd, torch._foreach_mul(ws, -lr * wd))
            if norms_for is not None:  # the parameter's norm before this update (schema)
                c0 = time.thread_time()
                pn.append(torch.stack(torch._foreach_norm(ws)))
                self._norms_cpu_s += time.thread_time() - c0
            if inplace:
                torch._foreach_add_(ws, upd)
                torch._foreach_add_(steps, 1.0)
            else:
                for i in range(len(ws)):
                    upd[i] = torch.where(apply, upd[i], torch.zeros_like(upd[i]))
                    ws[i].copy_(torch.where(apply, ws[i] + upd[i], ws[i]))
                    ms[i].copy_(torch.where(apply, new_m[i], ms[i]))
                    vs[i].copy_(torch.where(apply, new_v[i], vs[i]))
                    steps[i].copy_(torch.where(apply, steps[i] + 1, steps[i]))
            if norms_for is not None:
                c0 = time.thread_time()
                un.append(torch.stack(torch._foreach_norm(upd)))
                order += [id(p) for p in params]
                self._norms_cpu_s += time.thread_time() - c0
        if norms_for is not None:
            c0 = time.thread_time()
            key = (tuple(order), tuple(id(p) for p in norms_for))
            if getattr(self, "_norm_idx_key", None) != key:  # built once: an H2D copy
                where = {k: i for i, k in enumerate(order)}
                self._norm_idx = torch.tensor([where[id(p)] for p in norms_for], device=pn[0].device)
                self._norm_idx_key = key
            idx = self._norm_idx
            p_sq = torch.cat(pn).float().pow(2).index_select(0, idx)
            u_sq = torch.cat(un).float().pow(2).index_select(0, idx)
            self._norms_cpu_s += time.thread_time() - c0
            return p_sq, u_sq
        return None

    def take_norms_cpu(self) -> float:
        """CPU seconds spent on the `norms_for` statistics since the last call (the audit's
        own work inside the step: train/costs.py)."""
        out, self._norms_cpu_s = self._norms_cpu_s, 0.0
        return out


def build_optimizer(model: torch.nn.Module, o) -> MaskableAdamW:  # noqa: ANN001 - OptimConfig
    """Weight decay on matrices only (norm gains and 1-D params are not decayed)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return MaskableAdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
