"""Fault injection for tests and demos (`faults.*`): degenerate batches, lr spikes, a NaN,
and SIGKILL at a chosen step and phase. Every choice is a pure function of (seed, step)."""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch only where a tensor is made: forensics regenerates samples without it
    import torch

PURPOSE_FAULT = 7


def _rng(seed: int, step: int, extra: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, PURPOSE_FAULT, step, extra])))


def bad_positions(seed: int, step: int, global_batch: int, fraction: float) -> np.ndarray:
    """Positions in the global batch whose samples are replaced, sorted."""
    n_bad = max(1, int(round(fraction * global_batch)))
    return np.sort(_rng(seed, step).permutation(global_batch)[:n_bad])


def degenerate_sample(seed: int, step: int, position: int, length: int, vocab: int, kind: str) -> np.ndarray:
    """Uniform random tokens, or one short random n-gram repeated (the OLMo 2 trigger)."""
    rng = _rng(seed, step, 1000 + position)
    if kind == "repeat":
        gram = rng.integers(0, vocab, size=4)
        return np.resize(gram, length).astype(np.int64)
    return rng.integers(0, vocab, size=length).astype(np.int64)


def inject_bad_batch(tokens: np.ndarray, global_positions: np.ndarray, bad: np.ndarray, seed: int,
                     step: int, vocab: int, kind: str) -> np.ndarray:
    """Replace the rows of `tokens` (a rank's micro-batch) whose global position is bad."""
    out = tokens.copy()
    for row, pos in enumerate(global_positions):
        if pos in bad:
            out[row] = degenerate_sample(seed, step, int(pos), tokens.shape[1], vocab, kind)
    return out


def maybe_kill(faults, step: int, rank: int, phase: str) -> None:  # noqa: ANN001 - FaultsConfig
    """SIGKILL this process if the config asks for it here (crash tests)."""
    if faults.kill_step and step == faults.kill_step and rank == faults.kill_rank and phase == faults.kill_phase:
        os.kill(os.getpid(), signal.SIGKILL)


def nan_tensor(like: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.full_like(like, float("nan"))


def maybe_nan(faults, loss_tok: torch.Tensor, step: int, rank: int, micro: int) -> torch.Tensor:  # noqa: ANN001
    """`faults.nan_step`: rank 0's first micro-batch of that step gets a NaN loss (and so NaN
    gradients), as an overflow would give."""
    if faults.nan_step and step == faults.nan_step and rank == 0 and micro == 0:
        return loss_tok * nan_tensor(loss_tok[:1, :1])
    return loss_tok
