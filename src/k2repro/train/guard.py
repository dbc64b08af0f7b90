"""The online spike guard: the robust z-score rule shared with forensics (`k2repro.core.spike.RobustZ`)
evaluated on the device, one step at a time.

Every rank sees the same reduced loss and grad norm (the trainer's single all_gather), so
every rank computes the same flag without talking to the others, and nothing here reads a
value back to the host: the flag becomes the optimizer's update mask (`skip`), and the host
reads the flags with the other statistics at the next flush (`rollback`, `abort`, events).
tests/unit/test_guard.py checks that the flags equal the offline detector's on the same series.
"""

from __future__ import annotations

import math

import torch

from k2repro.core.spike import MAD_TO_SIGMA, RobustZ, robust_z_flag_rows


def _nanmedian_lin(x: torch.Tensor, min_count: int) -> torch.Tensor:
    """Median with linear interpolation (pandas' rolling median), NaN when fewer than
    `min_count` finite values."""
    count = (~torch.isnan(x)).sum()
    q = torch.nanquantile(x, 0.5) if x.numel() else torch.tensor(float("nan"))
    return torch.where(count >= min_count, q, torch.full_like(q, float("nan")))


class SpikeGuard:
    """Ring buffers of the signal and of its residuals; `observe` returns the update mask."""

    def __init__(self, g, device: torch.device) -> None:  # noqa: ANN001 - schema.GuardConfig
        self.rule = RobustZ(short_window=g.short_window, long_window=g.long_window,
                            threshold=g.threshold, min_history=g.min_history)
        self.signal = g.signal
        self.action = g.action
        self.h = self.rule.short_window // 2
        self.device = device
        nan = float("nan")
        # x: the last 2h values (for the trend-corrected median); r: the last long_window residuals
        self.x = torch.full((2 * self.h,), nan, dtype=torch.float64, device=device)
        self.r = torch.full((self.rule.long_window,), nan, dtype=torch.float64, device=device)
        self.n = torch.zeros((), dtype=torch.int64, device=device)
        self._quartiles = torch.tensor([0.25, 0.75], dtype=torch.float64, device=device)

    def _z(self, value: torch.Tensor) -> torch.Tensor:
        p, h = self.rule, self.h
        v = value.double()
        v = torch.where(torch.isfinite(v), v, torch.full_like(v, float("nan")))
        min_p = max(1, h // 2)
        m1 = _nanmedian_lin(self.x[h:], min_p)
        m0 = _nanmedian_lin(self.x[:h], min_p)
        pred = m1 + (m1 - m0) * ((h + 1) / (2 * h))
        resid = v - pred
        center = _nanmedian_lin(self.r, p.min_residuals)
        count = (~torch.isnan(self.r)).sum()
        q = torch.nanquantile(self.r, self._quartiles)
        spread = torch.where(count >= p.min_residuals, (q[1] - q[0]) / 2.0, torch.full_like(q[0], float("nan")))
        scale = torch.maximum(torch.maximum(MAD_TO_SIGMA * spread, p.rel_floor * pred.abs()),
                              torch.full_like(spread, p.abs_floor))
        z = (resid - center) / scale
        z = torch.where(self.n >= p.min_history, z, torch.full_like(z, float("nan")))
        # push the value and its residual (ring buffers shift left by one)
        self.x = torch.cat([self.x[1:], v.reshape(1)])
        self.r = torch.cat([self.r[1:], resid.reshape(1)])
        self.n = self.n + 1
        return z

    def observe(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(apply, flag): apply is False where the update must not be applied."""
        value = loss if self.signal == "loss" else grad_norm
        z = self._z(value)
        nonfinite = ~torch.isfinite(loss) | ~torch.isfinite(grad_norm)
        flag = (z >= self.rule.threshold) | nonfinite
        return ~flag, flag

    def state_dict(self) -> dict:
        return {"x": self.x.cpu(), "r": self.r.cpu(), "n": self.n.cpu()}

    def load_state_dict(self, s: dict) -> None:
        self.x, self.r, self.n = (s["x"].to(self.device), s["r"].to(self.device), s["n"].to(self.device))


class LogGuard:
    """`guard.action=log`: the same rule on the host, over a flush's values, so a guard that
    only logs costs nothing in the step. One vectorised pass scores the whole flush (a per-row
    loop of medians cost ~4 ms a row, which the next step paid in full)."""

    def __init__(self, g) -> None:  # noqa: ANN001 - schema.GuardConfig
        self.rule = RobustZ(short_window=g.short_window, long_window=g.long_window, threshold=g.threshold,
                            min_history=g.min_history)
        self.signal = g.signal
        self.history: list[float] = []

    def flags(self, rows: list[dict]) -> list[bool]:
        """One flag per step row (`loss`, `grad_norm`): a spike by the rule, or a non-finite value."""
        values = [r["loss"] if self.signal == "loss" else r["grad_norm"] for r in rows]
        hist = self.history + values
        # A kept history is never shorter than history_needed >= min_history once truncated,
        # so row indices below min_history only occur while it still starts at step 1.
        flags = robust_z_flag_rows(hist, len(self.history), self.rule)
        self.history = hist[-self.rule.history_needed:]
        return [bool(flag) or not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]))
                for r, flag in zip(rows, flags)]
