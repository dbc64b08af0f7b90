"""Per-parameter statistics of a model under any parallelism (`layer_stats` of the audit API):
grad, parameter and update norms and max |grad|, reduced on the device, DTensor shards counted
once (FSDP2), with one all_reduce for the sums and one for the maxima under a process group.

k2repro's own trainer folds the same statistics into the one collective its step already does
(train/stepstats.py); this module is for loops k2repro does not own.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from typing import Any

COLUMNS = ("grad_norm", "param_norm", "update_norm", "update_ratio", "grad_max_abs")


def layer_stats_writer(world_size: int) -> int:
    """The rank that writes `layer_stats` (every rank holds the reduced values): the last one.
    Rank 0 writes `steps` and every other global row, and the slowest rank sets the pace of
    every collective, so the writer's work per flush is spread: two segments a flush on each of
    two ranks instead of three on rank 0 (docs/audit-store.md, "Cheap to write")."""
    return max(0, world_size - 1)


def process_group() -> Any:
    """torch.distributed when a process group is initialized, else None (never imports torch:
    without torch loaded there can be no process group)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    d = torch.distributed
    return d if d.is_available() and d.is_initialized() else None


@dataclasses.dataclass
class LayerPending:
    """One log_layer_stats call whose update norms wait for the optimizer step."""

    step: int
    names: list[str]
    numel: list[int]
    sums: Any  # (3P,) local grad_sq, param_sq, update_sq (weighted, see count_weights)
    gmax: Any  # (P,) local max |grad|
    has_update: bool
    weights: Any = None  # (P,) count_weights of the parameters
    snapshot: list | None = None  # local parameters before the optimizer step
    params: list | None = None
    handle: Any = None  # the optimizer step hook that measures the update


@dataclasses.dataclass
class LayerRows:
    """One call's reduced statistics: `mat` is (P, 5) in COLUMNS order, on the device."""

    step: int
    names: list[str]
    numel: list[int]
    mat: Any
    has_update: bool


def measure(step: int, model: Any, *, before: Any = None, keep_snapshot: bool = False) -> LayerPending:
    """This rank's local statistics of the parameters that require grad (see
    AuditRun.log_layer_stats for when to call it). With `before`, the update is measured now;
    with `keep_snapshot`, the parameters are copied so `update_sq` can measure it after the step."""
    import torch

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("log_layer_stats: the model has no parameters that require grad")
    names, params = [n for n, _ in named], [p for _, p in named]
    ws = [local_shard(p).detach() for p in params]
    dev = ws[0].device
    grads = []
    for p, w in zip(params, ws):
        g = p.grad
        if g is not None and any(pl.is_partial() for pl in getattr(g, "placements", ())):
            raise ValueError("log_layer_stats: gradients with a Partial placement are not reduced yet: "
                             "call it after the gradient reduction")
        grads.append(local_shard(g) if g is not None else torch.zeros((), dtype=w.dtype, device=w.device))
    with torch.no_grad():
        weights = count_weights(params, dev)
        grad_sq = _sq_norms(grads, dev)
        gmax = max_abs(grads, dev)
        snapshot = None
        if before is not None:
            prev = align_before(before, names, params)
            param_sq, update_sq = _sq_norms(prev, dev), _sq_norms(torch._foreach_sub(ws, prev), dev)
        else:
            param_sq = _sq_norms(ws, dev)
            update_sq = torch.zeros_like(param_sq)
            if keep_snapshot:
                snapshot = snapshot_of(params, ws)
        sums = torch.cat([grad_sq, param_sq, update_sq]) * weights.repeat(3)
    return LayerPending(step, names, [int(p.numel()) for p in params], sums, gmax, before is not None,
                        weights, snapshot, params if snapshot is not None else None)


def _sq_norms(ts: list, dev: Any) -> Any:
    import torch

    return stack_on(torch._foreach_norm(ts, 2, dtype=torch.float32), dev).pow(2)


def update_sq(item: LayerPending) -> Any:
    """After the optimizer step: the squared update norms against the snapshot (weighted)."""
    import torch

    with torch.no_grad():
        now = [local_shard(p).detach() for p in item.params or []]
        snap = item.snapshot or []
        torch._foreach_sub_(snap, now)  # in place: the snapshot is spent, and no new buffers
        out = _sq_norms(snap, item.sums.device) * item.weights
    release_snapshot(item.snapshot)
    return out


def reduce(item: LayerPending, update: Any = None) -> LayerRows:
    """Reduce over ranks (one all_reduce of the sums, one of the maxima under a process group)
    and take roots and ratios, on the device. `update`: squared update norms measured after
    the step (replacing the zeros of `measure`)."""
    import torch

    if item.handle is not None:
        item.handle.remove()
    release_snapshot(item.snapshot)  # a measurement dropped before its update (a skipped step)
    item.snapshot = item.params = None
    P = len(item.names)
    sums, gmax, has_update = item.sums, item.gmax, item.has_update
    if update is not None:
        sums, has_update = torch.cat([sums[:2 * P], update]), True
    d = process_group()
    if d is not None and d.get_world_size() > 1:
        sums, gmax = sums.clone(), gmax.clone()
        d.all_reduce(sums, op=d.ReduceOp.SUM)
        d.all_reduce(gmax, op=d.ReduceOp.MAX)
    gn, pn, un = sums[:P].sqrt(), sums[P:2 * P].sqrt(), sums[2 * P:].sqrt()
    mat = torch.stack([gn, pn, un, un / pn.clamp(min=1e-30), gmax], dim=1)
    return LayerRows(item.step, item.names, item.numel, mat, has_update)


def layer_columns(layers: list[LayerRows], mats: list[Any]) -> dict[str, list]:
    """`layer_stats` columns from the calls' rows and their matrices fetched to the host."""
    cols: dict[str, list] = {"step": [], "param": [], "numel": [], **{c: [] for c in COLUMNS}}
    for rows, mat in zip(layers, mats):
        n = len(rows.names)
        cols["step"] += [rows.step] * n
        cols["param"] += rows.names
        cols["numel"] += rows.numel
        pn = mat[:, 1]
        for j, c in enumerate(COLUMNS):
            if c in ("update_norm", "update_ratio") and not rows.has_update:
                cols[c] += [None] * n
            elif c == "update_ratio":  # undefined for a zero parameter (a bias at init)
                cols[c] += [float(x) if p > 0 else None for x, p in zip(mat[:, j], pn)]
            else:
                cols[c] += [float(x) for x in mat[:, j]]
    return cols


def local_shard(t: Any) -> Any:
    """The local shard of a DTensor (the tensor itself otherwise): distributed/fsdp.py `local`,
    imported here on first use so that importing the audit API does not import torch."""
    from k2repro.distributed.fsdp import local

    return local(t)


def stack_on(ts: Sequence[Any], dev: Any) -> Any:
    import torch

    return torch.stack([t if t.device == dev else t.to(dev) for t in ts])


def grad_norm(model_or_params: Any) -> Any:
    """The global L2 norm of the gradients as a 0-d float32 tensor on the parameters' device
    (no host sync; one all_reduce under a process group, DTensor shards counted once)."""
    import torch

    params = list(model_or_params.parameters() if hasattr(model_or_params, "parameters") else model_or_params)
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    grads = [local_shard(p.grad).detach() for p in params]
    dev = grads[0].device
    with torch.no_grad():
        sq = stack_on(torch._foreach_norm(grads, 2, dtype=torch.float32), dev).pow(2)
        total = (sq * count_weights(params, dev)).sum()
        d = process_group()
        if d is not None and d.get_world_size() > 1:
            d.all_reduce(total, op=d.ReduceOp.SUM)
    return total.sqrt()


def max_abs(ts: list, dev: Any) -> Any:
    """max |x| per tensor, stacked (fp32). The fused inf-norm is the fast path on accelerators;
    on CPU it is 17x slower than one min/max pass per tensor, and abs + max allocates a copy of
    every tensor, whose page faults cost 11x (3.5, 0.2 and 2.3 ms for 1.3M values here)."""
    import torch

    if dev.type == "cpu" and all(t.numel() for t in ts):
        lo, hi = zip(*(torch.aminmax(t) for t in ts), strict=True)
        return torch.maximum(stack_on(hi, dev), stack_on(lo, dev).neg()).float()
    return stack_on(torch._foreach_norm(ts, float("inf"), dtype=torch.float32), dev)


_SNAPSHOTS: dict[tuple, list] = {}  # (ids, shapes, dtypes of the parameters) -> reused buffers
_BUSY: set[int] = set()  # ids of buffer lists a pending measurement still holds


def snapshot_of(params: list, ws: list) -> list:
    """A copy of the local parameters `ws` (of `params`) to measure the update against. On CPU
    into buffers kept from call to call: a fresh copy of every parameter costs page faults,
    about 15x the copy itself (2.4 ms against 0.17 ms for 1.3M values here). The caching
    allocator of an accelerator makes `clone` cheap there, and its memory goes back to the pool
    between calls. Buffers still held by an earlier measurement are never reused."""
    import torch

    if not ws or ws[0].device.type != "cpu":
        return [w.clone() for w in ws]
    key = tuple((id(p), tuple(w.shape), w.dtype) for p, w in zip(params, ws, strict=True))
    bufs = _SNAPSHOTS.get(key)
    if bufs is not None and id(bufs) in _BUSY:
        return [w.clone() for w in ws]
    if bufs is None:
        if len(_SNAPSHOTS) >= 2:
            _SNAPSHOTS.clear()
            _BUSY.clear()
        bufs = _SNAPSHOTS[key] = [torch.empty_like(w) for w in ws]
    torch._foreach_copy_(bufs, ws)
    _BUSY.add(id(bufs))
    return bufs


def release_snapshot(bufs: list | None) -> None:
    """The measurement holding `bufs` is done with them."""
    if bufs is not None:
        _BUSY.discard(id(bufs))


_WEIGHTS: dict[tuple, Any] = {}  # (ids of the parameters, device, rank, world) -> weights


def count_weights(params: list, dev: Any) -> Any:
    """1 where this rank's local values count towards a global sum, else 0: a DTensor's shards
    count once (ranks at coordinate 0 of every non-Shard mesh dimension); a plain tensor under a
    process group is taken as replicated (DDP) and counted on rank 0 only. Cached per parameter
    list: building it is a host-to-device copy, which must not happen every step."""
    import torch

    d = process_group()
    if d is None or d.get_world_size() == 1:
        return torch.ones(len(params), device=dev)  # a fill kernel, no copy
    rank = d.get_rank()
    key = (tuple(id(p) for p in params), str(dev), rank, d.get_world_size())
    hit = _WEIGHTS.get(key)
    if hit is not None:
        return hit
    out = []
    for p in params:
        mesh = getattr(p, "device_mesh", None)
        if mesh is None:
            out.append(1.0 if rank == 0 else 0.0)
            continue
        coord = mesh.get_coordinate()
        if coord is None:
            out.append(0.0)
            continue
        ok = all(c == 0 for c, pl in zip(coord, p.placements) if not pl.is_shard())
        out.append(1.0 if ok else 0.0)
    if len(_WEIGHTS) >= 8:
        _WEIGHTS.clear()
    _WEIGHTS[key] = w = torch.tensor(out).to(dev, non_blocking=True)
    return w


def align_before(before: Any, names: list[str], params: list) -> list:
    if isinstance(before, Mapping):
        missing = [n for n in names if n not in before]
        if missing:
            raise ValueError(f"log_layer_stats: before= lacks {missing[:3]}")
        vals = [before[n] for n in names]
    else:
        vals = list(before)
        if len(vals) != len(names):
            raise ValueError(f"log_layer_stats: before= has {len(vals)} tensors for {len(names)} parameters")
    return [local_shard(v).detach() for v in vals]


def inner_optimizer(opt: Any) -> Any:
    """The torch optimizer inside framework wrappers (Lightning's LightningOptimizer,
    accelerate's AcceleratedOptimizer), whose step() runs the hooks."""
    import torch

    seen = 0
    while seen < 5:
        inner = getattr(opt, "_optimizer", None) or getattr(opt, "optimizer", None)
        if inner is None or not isinstance(inner, torch.optim.Optimizer):
            break
        opt, seen = inner, seen + 1
    if not hasattr(opt, "register_step_post_hook"):
        raise ValueError(f"log_layer_stats: {type(opt).__name__} is not a torch.optim.Optimizer")
    return opt


__all__ = ["COLUMNS", "process_group", "LayerPending", "LayerRows", "measure", "update_sq", "reduce", "layer_columns", "local_shard", "stack_on", "grad_norm", "max_abs", "count_weights",
           "align_before", "inner_optimizer"]
