"""Per-parameter statistics of a model under any parallelism (`layer_stats` of the audit API):
grad, parameter and update norms and max |grad|, reduced on the device, DTensor shards counted
once (FSDP2), with one asynchronous all_gather of every rank's sums and maxima under a process
group, waited for at the flush.

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
    sums: Any  # (2P,) local grad_sq, param_sq (weighted, see count_weights)
    gmax: Any  # (P,) local max |grad|
    has_update: bool
    weights: Any = None  # (P,) count_weights of the parameters
    snapshot: list | None = None  # local parameters before the optimizer step
    params: list | None = None
    handle: Any = None  # the optimizer step hook that measures the update
    update: Any = None  # (P,) weighted update_sq when measured with before=


@dataclasses.dataclass
class LayerRows:
    """One call's statistics, not yet reduced to rows: `vec` is (world, 4P) on the device,
    every rank's grad_sq, param_sq, update_sq and max |grad| (world 1 without a process group);
    `matrices()` turns many calls into (P, 5) rows at once.

    Under a process group `vec` is filled by an asynchronous all_gather, waited for at the next
    flush, long after it arrived: a blocking collective in the optimizer step would hold the
    step until the slowest rank reaches it, spinning meanwhile (0.2-0.3 ms a call on 2 CPU
    ranks here), for numbers nobody reads before the flush. Roots and ratios are taken at the
    flush too, for all its calls in one set of kernels instead of eight per call."""

    step: int
    names: list[str]
    numel: list[int]
    vec: Any
    has_update: bool
    work: Any = None  # the all_gather's handle while it runs

    def arrived(self) -> bool:
        """Whether every rank's part is here (a flush writes these and keeps the rest)."""
        return self.work is None or bool(self.work.is_completed())

    def settle(self) -> None:
        """Wait for the collective (a rank that does not write the rows: nothing to compute).
        Calls gathered together share one handle: waiting again on a completed one is free."""
        if self.work is not None:
            self.work.wait()
            self.work = None


#: A failed run's writer waits at most this long in all for gathers other ranks may never
#: join (a peer that died closes its connections, which ends the wait sooner).
FAILED_WAIT_S = 5.0


def completed(layers: Sequence[LayerRows], timeout_s: float = FAILED_WAIT_S) -> list[LayerRows]:
    """The calls whose gather completes within `timeout_s` in all, in order up to the first
    that does not: closing a failed run, whose other ranks may never send their part."""
    import time
    from datetime import timedelta

    deadline = time.monotonic() + timeout_s
    out: list[LayerRows] = []
    for item in layers:
        if item.work is not None:
            left = deadline - time.monotonic()
            try:
                if left <= 0 or item.work.wait(timedelta(seconds=left)) is False:
                    break
            except Exception:  # noqa: BLE001 - a timeout or a peer gone: these rows are lost
                break
            item.work = None
        out.append(item)
    return out


def matrices(layers: Sequence[LayerRows]) -> list[Any]:
    """Each call's (P, 5) rows in COLUMNS order, on the device: calls with the same parameter
    count are reduced together (sum over ranks of the squares, max of the maxima, roots and
    ratios) in one set of kernels."""
    import torch

    for item in layers:
        item.settle()
    out: list[Any] = [None] * len(layers)
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(layers):
        groups.setdefault((tuple(item.vec.shape), item.vec.device), []).append(i)
    for (shape, _), idx in groups.items():
        P = shape[1] // 4
        v = torch.stack([layers[i].vec for i in idx])  # (k, world, 4P)
        sums, gmax = v[:, :, :3 * P].sum(1).view(-1, 3, P).sqrt(), v[:, :, 3 * P:].amax(1)
        gn, pn, un = sums.unbind(1)
        mats = torch.stack([gn, pn, un, un / pn.clamp(min=1e-30), gmax], dim=2)  # (k, P, 5)
        for j, i in enumerate(idx):
            out[i] = mats[j]
    return out


def measure(step: int, model: Any, *, before: Any = None, keep_snapshot: bool = False) -> LayerPending:
    """This rank's local statistics of the parameters that require grad (see
    AuditRun.log_layer_stats for when to call it). With `before`, the update is measured now;
    with `keep_snapshot`, the parameters are copied so `update_sq` can measure it after the step.

    Everything runs under no_grad, so no tensor is detached (a dispatcher call each); the
    parameter list comes from `model_params` (walked again only when the model changed)."""
    import torch

    names, params, numel = model_params(model)
    with torch.no_grad():
        ws = locals_of(params)
        dev = ws[0].device
        grads = [p.grad for p in params]
        for g in grads:
            pl = getattr(g, "placements", None)
            if pl is not None and any(x.is_partial() for x in pl):
                raise ValueError("log_layer_stats: gradients with a Partial placement are not reduced yet: "
                                 "call it after the gradient reduction")
        grads = locals_of([g if g is not None else torch.zeros((), dtype=w.dtype, device=w.device)
                           for g, w in zip(grads, ws)])
        weights = count_weights(params, dev)
        gmax = max_abs(grads, dev)
        snapshot = update = None
        if before is not None:
            prev = align_before(before, names, params)
            sums = _sq_norms(grads + prev, dev)  # grad and parameter norms: one foreach call
            update = _sq_norms(torch._foreach_sub(ws, prev), dev).mul_(weights)
        else:
            sums = _sq_norms(grads + ws, dev)
            if keep_snapshot:
                snapshot = snapshot_of(params, ws)
        sums.view(2, -1).mul_(weights)
    return LayerPending(step, names, numel, sums, gmax, before is not None,
                        weights, snapshot, params if snapshot is not None else None, update=update)


class _Plan:
    """Where a model's parameters live: (module, attribute, name, parameter) in
    `named_parameters` order, shared parameters once. Walking the module tree costs more than
    any single statistic of a small model (0.1-0.2 ms for 40 parameters); checking that every
    attribute still holds its parameter costs a dict lookup each."""

    __slots__ = ("entries", "calls", "numel")

    def __init__(self, model: Any) -> None:
        seen: set[int] = set()
        self.entries: list[tuple[Any, str, str, Any]] = []
        for prefix, mod in model.named_modules():
            for attr, p in mod._parameters.items():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                self.entries.append((mod, attr, f"{prefix}.{attr}" if prefix else attr, p))
        self.calls = 0
        self.numel = {id(p): int(p.numel()) for *_, p in self.entries}

    def current(self) -> bool:
        return all(mod._parameters.get(attr) is p for mod, attr, _, p in self.entries)


_PLANS: Any = None  # weakref.WeakKeyDictionary: model -> _Plan
#: A parameter registered on a new submodule after the first call is not seen by `current`;
#: the tree is walked again every this many calls, so it is picked up within them.
PLAN_REFRESH = 64


def model_params(model: Any) -> tuple[list[str], list, list[int]]:
    """Names, parameters and element counts of the parameters that require grad, as
    `named_parameters` gives them, cached per model: the tree is walked again when a parameter
    was replaced (FSDP2 swapping sharded and unsharded parameters included) and every
    PLAN_REFRESH calls; requires_grad is read every call (freezing takes effect at once)."""
    global _PLANS
    if _PLANS is None:
        import weakref

        _PLANS = weakref.WeakKeyDictionary()
    if not hasattr(model, "named_modules"):
        raise ValueError(f"log_layer_stats: {type(model).__name__} is not a torch.nn.Module")
    plan = _PLANS.get(model)
    if plan is None or plan.calls >= PLAN_REFRESH or not plan.current():
        plan = _PLANS[model] = _Plan(model)
    plan.calls += 1
    names, params, numel = [], [], []
    for _, _, name, p in plan.entries:
        if p.requires_grad:
            names.append(name)
            params.append(p)
            numel.append(plan.numel[id(p)])
    if not params:
        raise ValueError("log_layer_stats: the model has no parameters that require grad")
    return names, params, numel


def _sq_norms(ts: list, dev: Any) -> Any:
    import torch

    return stack_on(torch._foreach_norm(ts, 2, dtype=torch.float32), dev).pow_(2)


def update_sq(item: LayerPending) -> Any:
    """After the optimizer step: the squared update norms against the snapshot (weighted)."""
    import torch

    with torch.no_grad():
        now = locals_of(item.params or [])
        snap = item.snapshot or []
        torch._foreach_sub_(snap, now)  # in place: the snapshot is spent, and no new buffers
        out = _sq_norms(snap, item.sums.device).mul_(item.weights)
    release_snapshot(item.snapshot)
    return out


def reduce(item: LayerPending, update: Any = None) -> LayerRows:
    """This rank's part of the rows, ready for `gather` (under a process group) or `matrices`:
    `update` is the squared update norms measured after the step (else those of `before=`,
    else zeros: no update)."""
    import torch

    if item.handle is not None:
        item.handle.remove()
    release_snapshot(item.snapshot)  # a measurement dropped before its update (a skipped step)
    item.snapshot = item.params = None
    P = len(item.names)
    has_update = item.has_update or update is not None
    if update is None:
        update = item.update if item.update is not None else item.gmax.new_zeros(P)
    mine = torch.cat([item.sums, update, item.gmax.to(item.sums.dtype)])
    return LayerRows(item.step, item.names, item.numel, mine.view(1, -1), has_update)


def gather(layers: Sequence[LayerRows]) -> None:
    """Start the reduction over ranks of these calls: one asynchronous all_gather of every
    rank's sums and maxima for all of them (a collective's fixed price, paid once instead of
    once a call, or twice with an all_reduce for the sums and one for the maxima), after which
    each call's `vec` is its (world, 4P) view; `matrices()` waits and finishes. Collective:
    every rank calls it with the same calls."""
    import torch

    d = process_group()
    if not layers or d is None or d.get_world_size() == 1:
        return
    world = d.get_world_size()
    mine = torch.cat([item.vec.view(-1) for item in layers])
    every = mine.new_empty(world * mine.numel())  # flat: gloo wants rank chunks of mine's shape
    work = d.all_gather_into_tensor(every, mine, async_op=True)
    every, off = every.view(world, -1), 0
    for item in layers:
        n = item.vec.numel()
        item.vec, item.work = every[:, off:off + n], work
        off += n


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


def locals_of(ts: Sequence[Any]) -> list:
    """`local_shard` of every tensor, reading DTensor's field inline: this runs for every
    parameter three times a measurement, and a function call and an import per tensor add up."""
    out = []
    for t in ts:
        loc = getattr(t, "_local_tensor", None)
        out.append(loc if loc is not None else local_shard(t))
    return out


def stack_on(ts: Sequence[Any], dev: Any) -> Any:
    """The 0-d results of a foreach op stacked on `dev`. They are on one device unless the model
    spans several; asking every tensor for its device costs more than the stack."""
    import torch

    try:
        out = torch.stack(list(ts))
    except RuntimeError:  # tensors on several devices
        return torch.stack([t if t.device == dev else t.to(dev) for t in ts])
    return out if out.device == dev else out.to(dev)


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


__all__ = ["COLUMNS", "process_group", "LayerPending", "LayerRows", "completed", "gather", "matrices", "measure", "update_sq", "reduce", "layer_columns", "local_shard", "stack_on", "grad_norm", "max_abs", "count_weights",
           "align_before", "inner_optimizer"]
