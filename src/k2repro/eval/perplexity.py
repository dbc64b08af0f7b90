"""Held-out loss and perplexity, overall and per domain.

Every target token of a validation window is attributed to the document it belongs to (the EOS
after a document counts as that document's), so a window that spans two documents splits its
tokens between their domains and the per-domain sums are exact. Losses are summed in float64 per
domain; `val/loss` is the token-weighted mean over all domains, so it equals the token-weighted
mean of the domain losses.

Windows go through the model in fixed batches (batch b holds windows [b*B, (b+1)*B)); at world
size W rank r computes batches r, r+W, ... So every batch is the same computation at any world
size and the results agree across world sizes up to the order of a float64 sum.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from k2repro.data.packed import PackedDataset
from k2repro.model.llama import token_losses


@dataclass
class ValSet:
    """The held-out windows and the domain index of each of their target tokens."""

    tokens: np.ndarray  # (n, seq_len + 1) int64
    domain_idx: np.ndarray  # (n, seq_len) int64, index into `domains`
    domains: list[str]

    @property
    def n_tokens(self) -> int:
        return int(self.domain_idx.size)


def token_domains(ds: PackedDataset, sample_ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, list[str]]:
    """Domain index (into the returned sorted list) of target tokens 1..seq_len of each window."""
    docs = ds.docs
    domains = sorted({str(d) for d in docs["domain"]})
    lookup = {d: i for i, d in enumerate(domains)}
    doc_dom = np.array([lookup[str(d)] for d in docs["domain"]], dtype=np.int64)
    starts = docs["token_start"].to_numpy(dtype=np.int64)
    w = ds.seq_len + 1  # the packed window, which may be longer than the evaluated one
    pos = sample_ids[:, None].astype(np.int64) * w + np.arange(1, seq_len + 1, dtype=np.int64)[None, :]
    # the document holding stream position p is the last one starting at or before p
    which = np.searchsorted(starts, pos, side="right") - 1
    return doc_dom[np.clip(which, 0, len(doc_dom) - 1)], domains


def load_val(ds: PackedDataset, seq_len: int, max_windows: int = 0) -> ValSet:
    """The first `max_windows` windows of the split (all when 0), cut to `seq_len + 1` tokens."""
    n = len(ds) if max_windows <= 0 else min(len(ds), max_windows)
    ids = np.arange(n, dtype=np.int64)
    dom, names = token_domains(ds, ids, seq_len)
    return ValSet(tokens=ds.get(ids, seq_len), domain_idx=dom, domains=names)


def round_robin(n_items: int, batch: int, rank: int, world: int) -> Iterator[tuple[np.ndarray, bool]]:
    """(item indices, real) for this rank's share of fixed batches. Every rank yields the same
    number of batches (FSDP's forward is a collective); a rank without a batch left gets batch 0
    again with real=False, to be computed and ignored."""
    n_batches = max(1, math.ceil(n_items / batch))
    rounds = math.ceil(n_batches / world)
    for i in range(rounds):
        b = i * world + rank
        if b < n_batches:
            yield np.arange(b * batch, min(n_items, (b + 1) * batch)), True
        else:
            yield np.arange(0, min(n_items, batch)), False


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, val: ValSet, device: torch.device, batch: int = 8,
                  rank: int = 0, world: int = 1) -> dict[str, dict]:
    """{"overall": {"loss", "n_tokens"}, "<domain>": {...}}: token-weighted mean losses, summed in
    float64 and reduced over ranks (every rank gets the same numbers)."""
    n_dom = len(val.domains)
    sums = torch.zeros(n_dom, dtype=torch.float64, device=device)
    model.eval()
    for idx, real in round_robin(len(val.tokens), batch, rank, world):
        x = torch.from_numpy(val.tokens[idx]).to(device)
        loss, _ = token_losses(model(x[:, :-1]), x[:, 1:])
        if real:
            d = torch.from_numpy(val.domain_idx[idx]).to(device)
            # a masked sum, not bincount/scatter: those have no deterministic CUDA kernel
            mask = d.unsqueeze(-1) == torch.arange(n_dom, device=device)
            sums += (loss.double().unsqueeze(-1) * mask).sum(dim=(0, 1))
    all_reduce_sum(sums)
    counts = np.bincount(val.domain_idx.flatten(), minlength=n_dom)
    s = sums.cpu().numpy()
    out = {"overall": {"loss": float(s.sum() / max(1, counts.sum())), "n_tokens": int(counts.sum())}}
    for i, name in enumerate(val.domains):
        if counts[i]:
            out[name] = {"loss": float(s[i] / counts[i]), "n_tokens": int(counts[i])}
    return out


def perplexity_metrics(res: dict[str, dict]) -> list[tuple[str, float, int]]:
    """(metric, value, n_tokens) rows named as docs/audit-store.md (`evals`) says."""
    o = res["overall"]
    rows = [("val/loss", o["loss"], o["n_tokens"]), ("val/ppl", _exp(o["loss"]), o["n_tokens"])]
    for name, r in sorted(res.items()):
        if name != "overall":
            rows.append((f"val/ppl/{name}", _exp(r["loss"]), r["n_tokens"]))
    return rows


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
