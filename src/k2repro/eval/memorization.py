"""Memorization as LLM360 measures it: for training sequences the model has seen, prompt with
the first k tokens, decode k tokens greedily, and compare with the true next k tokens.

- `mem/exact_match`: share of sequences whose k greedy tokens all equal the true ones;
- `mem/matched_prefix`: mean number of leading greedy tokens that equal the true ones (0..k).

The sample is fixed by the run's seed: one seeded priority order over the whole training split,
and a checkpoint takes the first `n` sequences in that order that training consumed before it
(steps 1..checkpoint step of the run's data order, with the guard's deferrals). So a sequence
keeps its place across checkpoints and the curve over training follows mostly the same texts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from k2repro.data.loader import StepSampler, global_batch_ids
from k2repro.eval.perplexity import all_reduce_sum, round_robin

PURPOSE_MEM = 7


def effective_k(k: int, seq_len: int, max_seq_len: int) -> int:
    """k clamped so that prefix + continuation fit the window (seq_len + 1 tokens) and the
    longest decoding input (2k - 1 tokens) fits the model's context."""
    return max(1, min(k, (seq_len + 1) // 2, (max_seq_len + 1) // 2))


def seen_sample_ids(seed: int, n_samples: int, global_batch: int, max_steps: int, step: int,
                    deferred: Sequence[int] = ()) -> np.ndarray:
    """Sorted ids of the training samples consumed by steps 1..step (the trainer's data order)."""
    if step <= 0:
        return np.zeros(0, dtype=np.int64)
    if not deferred:
        total = step * global_batch
        if total >= n_samples:
            return np.arange(n_samples, dtype=np.int64)
        return np.unique(global_batch_ids(seed, n_samples, 1, total))
    sampler = StepSampler(seed, n_samples, global_batch, max_steps)
    sampler.deferred = [int(d) for d in deferred]
    return np.unique(np.concatenate([sampler.ids(s) for s in range(1, step + 1)]))


def memorization_sample(seed: int, n_train: int, seen: np.ndarray, n: int) -> np.ndarray:
    """Up to `n` ids of `seen`, in the run's fixed seeded priority order."""
    gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, PURPOSE_MEM])))
    order = gen.permutation(n_train)
    mask = np.zeros(n_train, dtype=bool)
    mask[np.asarray(seen, dtype=np.int64)] = True
    return order[mask[order]][:n].astype(np.int64)


@torch.no_grad()
def greedy_match(model: torch.nn.Module, windows: np.ndarray, k: int, device: torch.device,
                 batch: int = 16, rank: int = 0, world: int = 1) -> np.ndarray:
    """Matched-prefix length (0..k) of each window: greedy continuation of windows[:, :k]
    against windows[:, k:2k]. Collective at world size > 1 (every rank gets every length)."""
    windows = np.asarray(windows, dtype=np.int64)
    n = len(windows)
    assert windows.ndim == 2 and windows.shape[1] >= 2 * k, (windows.shape, k)
    matched = torch.zeros(n, dtype=torch.int64, device=device)
    if n == 0:
        return matched.cpu().numpy()
    model.eval()
    for idx, real in round_robin(n, batch, rank, world):
        w = torch.from_numpy(windows[idx]).to(device)
        x = w[:, :k]
        for _ in range(k):
            nxt = model(x)[:, -1].argmax(dim=-1, keepdim=True)  # greedy; ties go to the lowest id
            x = torch.cat([x, nxt], dim=1)
        hit = (x[:, k:] == w[:, k:2 * k]).long()
        if real:
            matched[torch.from_numpy(idx).to(device)] = hit.cumprod(dim=1).sum(dim=1)
    return all_reduce_sum(matched).cpu().numpy()


def memorization_metrics(matched: np.ndarray, k: int) -> list[tuple[str, float, int]]:
    """(metric, value, n_tokens) rows; n_tokens = continuation tokens compared. No rows for an
    empty sample (`--mem-samples 0`)."""
    n = len(matched)
    if n == 0:
        return []
    return [("mem/exact_match", float(np.mean(matched == k)), n * k),
            ("mem/matched_prefix", float(np.mean(matched)), n * k)]
