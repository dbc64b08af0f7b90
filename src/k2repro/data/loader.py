"""Deterministic data order: the sample ids of any step are a pure function of
(seed, number of samples, step, deferred data positions), docs/architecture.md
("Reproducibility rules").

So `k2repro batch` and replay can compute a step's batch without running training.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

PURPOSE_DATA = 1


def data_position(step: int, deferred: Sequence[int] = (), max_steps: int = 0) -> int:
    """The data position (1-based batch index in the seeded stream) that training step
    `step` consumes: the step-th position that is not deferred. Positions deferred by a guard
    rollback (K2 moved the data chunk after a spike to the end of its order) move behind every
    other position of the stream, so a run of `max_steps` never meets them again.
    (`max_steps` is accepted for symmetry with the sampler and does not change the answer.)
    """
    if not deferred:
        return step
    d = sorted(set(deferred))
    pos = step
    for x in d:  # each deferred position at or before the candidate pushes it one further
        if x <= pos:
            pos += 1
    return pos


def _perm(seed: int, epoch: int, n: int) -> np.ndarray:
    ss = np.random.SeedSequence([seed, PURPOSE_DATA, epoch])
    return np.random.Generator(np.random.PCG64(ss)).permutation(n)


def global_batch_ids(seed: int, n_samples: int, position: int, global_batch: int) -> np.ndarray:
    """Sample ids of data position `position` (1-based): a slice of seeded per-epoch
    permutations, so every sample is seen once per epoch."""
    if n_samples <= 0:
        raise ValueError("no samples")
    start = (position - 1) * global_batch
    out = np.empty(global_batch, dtype=np.int64)
    i = 0
    cache: dict[int, np.ndarray] = {}
    while i < global_batch:
        k = start + i
        epoch, off = divmod(k, n_samples)
        if epoch not in cache:
            cache[epoch] = _perm(seed, epoch, n_samples)
        take = min(global_batch - i, n_samples - off)
        out[i : i + take] = cache[epoch][off : off + take]
        i += take
    return out


def rank_slice(ids: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """The contiguous share of the global batch that one rank trains on."""
    per = len(ids) // world_size
    return ids[rank * per : (rank + 1) * per]


def batch_hash(ids: Sequence[int]) -> str:
    """Hash of the global batch's sample ids in order (independent of world size)."""
    arr = np.asarray(ids, dtype=np.int64)
    return hashlib.sha256(arr.tobytes()).hexdigest()[:16]


class StepSampler:
    """Stateful wrapper the trainer uses; its state is (seed, deferred) and lives in checkpoints."""

    def __init__(self, seed: int, n_samples: int, global_batch: int, max_steps: int) -> None:
        self.seed, self.n_samples, self.global_batch, self.max_steps = seed, n_samples, global_batch, max_steps
        self.deferred: list[int] = []

    def ids(self, step: int) -> np.ndarray:
        pos = data_position(step, self.deferred, self.max_steps)
        return global_batch_ids(self.seed, self.n_samples, pos, self.global_batch)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "deferred": list(self.deferred)}

    def load_state_dict(self, state: dict) -> None:
        self.deferred = [int(x) for x in state.get("deferred", [])]
