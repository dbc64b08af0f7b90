"""The statistics of one training step, by name, and the one collective that reduces them.

Every number the audit and the guard need from a step is folded into the collective the step
already does for gradient clipping: each rank contributes one vector to sum (per-parameter
squared gradient norms, loss sums, the previous layer-stats step's parameter and update norms)
and one to max (per-parameter max |grad|, loss extremes, the stop request), and a single
all_gather gives every rank the same global numbers, so guard decisions agree across ranks
without a host sync. `pack`/`unpack` are the only code that knows where each field sits in the
vectors.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

#: the per-step scalars kept on the device until a flush, in `StepRecord.values` order
STEP_FIELDS = ("loss", "grad_norm", "clipped", "loss_min", "loss_max", "loss_std", "logz_mean", "applied",
               "guard_flag")


@dataclasses.dataclass
class StepSums:
    """Summed over ranks."""

    grad_sq: torch.Tensor  # (P,) squared gradient norm per parameter
    loss_tok_sum: torch.Tensor  # sum over samples of (mean token loss x tokens)
    loss_sq_sum: torch.Tensor  # sum over samples of (mean token loss)^2
    logz_sum: torch.Tensor  # sum over samples of mean log Z (z-loss signal)
    n_samples: torch.Tensor  # samples that count (masked ones do not)
    prev_param_sq: torch.Tensor | None = None  # (P,) of the previous layer-stats step
    prev_update_sq: torch.Tensor | None = None  # (P,)


@dataclasses.dataclass
class StepMaxes:
    """Max over ranks."""

    grad_max: torch.Tensor  # (P,) max |grad| per parameter, or empty on steps without layer stats
    loss_max: torch.Tensor  # largest per-sample loss
    neg_loss_min: torch.Tensor  # minus the smallest per-sample loss (so that max reduces it)
    stop: torch.Tensor  # (1,) the signal number a rank was asked to stop with, 0 for none


def pack(s: StepSums, m: StepMaxes) -> tuple[torch.Tensor, torch.Tensor]:
    head = torch.stack([s.loss_tok_sum, s.loss_sq_sum, s.logz_sum, s.n_samples])
    parts = [s.grad_sq, head]
    if s.prev_param_sq is not None:
        parts += [s.prev_param_sq, s.prev_update_sq]
    return torch.cat(parts), torch.cat([m.grad_max, torch.stack([m.loss_max, m.neg_loss_min]), m.stop])


def unpack(vec_sum: torch.Tensor, vec_max: torch.Tensor, like: tuple[StepSums, StepMaxes]) -> tuple[StepSums, StepMaxes]:
    """The reduced vectors as fields, shaped like the local `like` pair."""
    s, m = like
    P = s.grad_sq.numel()
    with_prev = s.prev_param_sq is not None
    grad_sq, head, *prev = torch.split(vec_sum, [P, 4, *([P, P] if with_prev else [])])
    grad_max, ext, stop = torch.split(vec_max, [m.grad_max.numel(), 2, 1])
    sums = StepSums(grad_sq, *head.unbind(), *(prev or [None, None]))
    return sums, StepMaxes(grad_max, ext[0], ext[1], stop)


def all_reduce(s: StepSums, m: StepMaxes, world_size: int) -> tuple[StepSums, StepMaxes]:
    """Sum and max over ranks in one all_gather (gloo has no max-and-sum in one call)."""
    if world_size == 1:
        return s, m
    vec_sum, vec_max = pack(s, m)
    both = torch.cat([vec_sum, vec_max])
    out = [torch.empty_like(both) for _ in range(world_size)]
    dist.all_gather(out, both)
    stacked = torch.stack(out)
    n_sum = vec_sum.numel()
    return unpack(stacked[:, :n_sum].sum(0), stacked[:, n_sum:].max(0).values, (s, m))


class StepRecord(NamedTuple):
    """One step's row, on the device until the flush moves all of them at once."""

    step: int
    lr: float
    tokens: int
    batch_hash: str
    values: torch.Tensor  # STEP_FIELDS, stacked
    peak_mem: int | None


class SampleRecord(NamedTuple):
    step: int
    sample_ids: np.ndarray  # this rank's samples, in batch order
    losses: torch.Tensor  # mean token loss per sample
    first_pos: int  # batch position of this rank's first sample


class LayerRecord(NamedTuple):
    step: int
    squares: torch.Tensor  # (P, 4): grad^2, param^2, update^2, max |grad|


class CarriedNorms(NamedTuple):
    """A layer-stats step's norms whose parameter/update parts ride on the next step's
    collective (the update is only known after the optimizer step)."""

    step: int
    grad_sq: torch.Tensor  # (P,) already reduced
    grad_max: torch.Tensor  # (P,) already reduced
    param_sq: torch.Tensor  # (P,) local
    update_sq: torch.Tensor  # (P,) local


@dataclasses.dataclass
class Pending:
    """Device-side statistics waiting for the next flush."""

    steps: list[StepRecord] = dataclasses.field(default_factory=list)
    samples: list[SampleRecord] = dataclasses.field(default_factory=list)
    layers: list[LayerRecord] = dataclasses.field(default_factory=list)
    norms: CarriedNorms | None = None

    def emit_carried(self, param_sq: torch.Tensor | None, update_sq: torch.Tensor | None) -> None:
        """The carried layer-stats step's norms, now that a step's collective reduced them."""
        prev = self.norms
        if prev is not None:
            self.layers.append(LayerRecord(prev.step, torch.stack(
                [prev.grad_sq, param_sq, update_sq, prev.grad_max], dim=1)))
            self.norms = None

    def reduce_carried(self, distributed: bool) -> None:
        """The last layer-stats step has no next step to carry its norms: reduce them now."""
        prev = self.norms
        if prev is None:
            return
        vec = torch.cat([prev.param_sq, prev.update_sq])
        if distributed:
            dist.all_reduce(vec)
        self.emit_carried(*torch.split(vec, [prev.param_sq.numel(), prev.update_sq.numel()]))



# ---------------------------------------------------------------------------------- host side
# What a flush turns the records into: the columns of `steps`, `sample_stats` and `layer_stats`,
# each with one device-to-host transfer for all the records of its kind.

def step_rows(records: list[StepRecord], times: dict[int, float], flops_per_token: float,
              peak_flops: float | None, world_size: int) -> list[dict]:
    if not records:
        return []
    host = torch.stack([r.values for r in records]).double().cpu().numpy()
    rows = []
    for rec, vals in zip(records, host):
        dt = times.get(rec.step, float("nan"))
        r = dict(zip(STEP_FIELDS, (float(v) for v in vals)))
        r.update(step=rec.step, lr=rec.lr, tokens=rec.tokens, batch_hash=rec.batch_hash, step_time_s=dt,
                 tokens_per_s=rec.tokens / dt if dt and dt == dt else None)
        r["skipped"] = r.pop("applied") < 0.5
        r["clipped"] = r["clipped"] > 0.5
        r["guard_flag"] = r["guard_flag"] > 0.5
        tps = r["tokens_per_s"]
        r["mfu"] = (flops_per_token * tps / (peak_flops * world_size)) if (peak_flops and tps) else None
        r["peak_mem_bytes"] = rec.peak_mem
        rows.append(r)
    return rows


def sample_columns(records: list[SampleRecord], rank: int, seq_len: int) -> dict[str, np.ndarray]:
    """numpy columns: the writer hands them to Arrow as they are."""
    losses = torch.cat([s.losses for s in records]).double().cpu().numpy()
    steps = np.concatenate([np.full(len(s.sample_ids), s.step) for s in records])
    ids = np.concatenate([s.sample_ids for s in records])
    pos = np.concatenate([np.arange(len(s.sample_ids)) + s.first_pos for s in records])
    return {"step": steps, "rank": np.full(len(ids), rank), "sample_id": ids, "batch_pos": pos,
            "loss": losses, "n_tokens": np.full(len(ids), seq_len)}


def layer_columns(records: list[LayerRecord], param_names: list[str]) -> dict[str, object]:
    """Squares were reduced on the device; roots and ratios are taken here, on the host."""
    sq = torch.stack([r.squares for r in records]).double().cpu().numpy().reshape(-1, 4)
    gn, pn, un = np.sqrt(sq[:, 0]), np.sqrt(sq[:, 1]), np.sqrt(sq[:, 2])
    return {"step": np.repeat(np.array([r.step for r in records], dtype=np.int64), len(param_names)),
            "param": param_names * len(records), "grad_norm": gn, "param_norm": pn, "update_norm": un,
            "update_ratio": un / np.maximum(pn, 1e-30), "grad_max_abs": sq[:, 3].copy()}


__all__ = ["STEP_FIELDS", "StepSums", "StepMaxes", "pack", "unpack", "all_reduce", "StepRecord",
           "SampleRecord", "LayerRecord", "CarriedNorms", "Pending", "step_rows", "sample_columns", "layer_columns"]
