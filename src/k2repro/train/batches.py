"""A rank's batch for a step, with the data-side interventions applied before the step sees it.

The step body only runs forward/backward on what it is given. Two things change the data on
purpose and live here, outside it: injected bad batches (`faults.bad_batch_*`, tests and demos)
and counterfactual masking (`train.mask_steps` x `train.mask_sample_ids`: those samples give no
loss and no gradient, so a replay can ask "what if this sample had not been there").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from k2repro.data.loader import StepSampler, data_position, rank_slice
from k2repro.data.packed import PackedDataset
from k2repro.train import faults as F


@dataclasses.dataclass
class StepBatch:
    step: int
    ids: np.ndarray  # the global batch's sample ids, in order (what `batch_hash` hashes)
    tokens: list[np.ndarray]  # this rank's micro-batches, (micro_batch, seq_len + 1) each
    sample_ids: list[np.ndarray]  # the sample ids of each micro-batch
    weights: list[torch.Tensor] | None  # per micro-batch 0/1 per sample; None when nothing is masked
    n_masked: int  # masked samples in the global batch (same on every rank)
    fault: dict[str, Any] | None  # the injected fault's event detail, if one was injected


class BatchSource:
    """The batches of one rank: a pure function of (seed, data, step, deferrals), so a replay
    or `k2repro batch` computes the same ones without training."""

    def __init__(self, data: PackedDataset, sampler: StepSampler, train: Any, faults: Any, rank: int,
                 world_size: int, device: torch.device) -> None:
        self.data, self.sampler, self.t, self.f = data, sampler, train, faults
        self.rank, self.world_size, self.device = rank, world_size, device

    def get(self, step: int) -> StepBatch:
        t = self.t
        ids = self.sampler.ids(step)
        mine = rank_slice(ids, self.rank, self.world_size)
        tokens, fault = self._with_faults(step, ids, self.data.get(mine, t.seq_len))
        mb = t.micro_batch_size
        chunks = [tokens[i:i + mb] for i in range(0, len(tokens), mb)]
        id_chunks = [mine[i:i + mb] for i in range(0, len(mine), mb)]
        masked = set(t.mask_sample_ids) if step in t.mask_steps else set()
        weights = None
        if masked:
            weights = [torch.tensor([0.0 if int(sid) in masked else 1.0 for sid in c], device=self.device)
                       for c in id_chunks]
        n_masked = sum(1 for i in ids if int(i) in masked)
        return StepBatch(step, ids, chunks, id_chunks, weights, n_masked, fault)

    def _with_faults(self, step: int, ids: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, dict | None]:
        """Faults belong to the data (its position in the stream), not to the step number, so
        a rollback that defers the data also moves the fault, as it would a real bad chunk."""
        t, f = self.t, self.f
        pos = data_position(step, self.sampler.deferred)
        if pos not in f.bad_batch_steps:
            return tokens, None
        per = len(ids) // self.world_size
        positions = np.arange(self.rank * per, (self.rank + 1) * per)
        bad = F.bad_positions(t.seed, pos, len(ids), f.bad_batch_fraction)
        tokens = F.inject_bad_batch(tokens, positions, bad, t.seed, pos, self.data.vocab_size, f.bad_batch_kind)
        return tokens, {"kind": "bad_batch", "bad_batch_kind": f.bad_batch_kind,
                        "sample_ids": [int(ids[i]) for i in bad], "positions": [int(i) for i in bad],
                        "data_position": int(pos)}


__all__ = ["StepBatch", "BatchSource"]
