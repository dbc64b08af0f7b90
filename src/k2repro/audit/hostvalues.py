"""Values a training loop logs, kept as they come (numbers, or tensors left on their device)
until a flush moves them all to the host at once: one transfer per (device, dtype), since a
`.item()` per value per step would be a host-device sync each. Then typed by the schema.

Importing this module does not import torch; tensors are recognised by their attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def as_step(step: Any) -> int:
    import operator

    try:
        s = operator.index(step)
    except TypeError:
        raise ValueError(f"step must be an integer (got {type(step).__name__})") from None
    if s < 0:
        raise ValueError(f"step must be >= 0 (got {s})")
    return int(s)


def is_tensor(x: Any) -> bool:
    return hasattr(x, "detach") and hasattr(x, "device") and hasattr(x, "numel")


def scalar(val: Any, key: str) -> Any:
    """A number, or a detached one-element tensor (no sync: numel is metadata)."""
    if type(val) is float or type(val) is int:  # the common case first: a dozen a step
        return val
    if is_tensor(val):
        if val.numel() != 1:
            raise ValueError(f"'{key}' must be a scalar (got a tensor of shape {tuple(val.shape)})")
        return val.detach().reshape(())
    if isinstance(val, bool | int | float):
        return val
    if hasattr(val, "item") and getattr(val, "size", 1) == 1:  # numpy scalar
        return val.item()
    raise ValueError(f"'{key}' must be a number or a 0-d tensor (got {type(val).__name__})")


def keep(val: Any, key: str) -> Any:
    if is_tensor(val):
        return val.detach().reshape(-1)
    if isinstance(val, str | bytes):
        raise ValueError(f"'{key}' must be a sequence or a tensor (got {type(val).__name__})")
    try:
        return list(val)
    except TypeError:
        raise ValueError(f"'{key}' must be a sequence or a tensor (got {type(val).__name__})") from None


def length(val: Any) -> int:
    if is_tensor(val):
        return int(val.numel())
    return len(val)


def as_float(v: Any) -> float | None:
    if v is None:
        return None
    return float(v)


class _Ref:
    """A placeholder for a tensor being fetched by Host."""

    __slots__ = ("key", "index")

    def __init__(self, key: tuple, index: int) -> None:
        self.key, self.index = key, index


class Host:
    """Collects tensors to move to the host and fetches them with one transfer per (device,
    dtype); everything else passes through."""

    def __init__(self) -> None:
        self._groups: dict[tuple, list] = {}
        self._out: dict[tuple, Any] = {}

    def add(self, v: Any) -> Any:
        if type(v) is float or type(v) is int or not is_tensor(v):
            return v
        key = (str(v.device), str(v.dtype))
        group = self._groups.setdefault(key, [])
        group.append(v)
        return _Ref(key, len(group) - 1)

    def fetch(self) -> None:
        import torch

        for key, ts in self._groups.items():
            flat = torch.cat([t.reshape(-1) for t in ts]).cpu()  # the one host-device sync
            if flat.dtype.is_floating_point:
                flat = flat.double()  # exact for fp32/bf16/fp16
            arr = flat.numpy()
            off = 0
            for i, t in enumerate(ts):
                n = t.numel()
                self._out[(key, i)] = arr[off:off + n].reshape(tuple(t.shape))
                off += n
        self._groups.clear()

    def get(self, v: Any) -> Any:
        return self._out[(v.key, v.index)] if isinstance(v, _Ref) else v


def host_scalar(v: Any) -> Any:
    if hasattr(v, "ndim"):  # a fetched numpy array
        return v.reshape(()).item() if v.size == 1 else v.tolist()
    return v


def losses_by_step(samples: list, host: Host, carry: Mapping[int, Any]) -> dict[int, Any]:
    import numpy as np

    out: dict[int, list] = {k: [v] for k, v in carry.items()}
    for step, _, loss_ref, _ in samples:
        v = host.get(loss_ref)
        out.setdefault(step, []).append(np.asarray(v, dtype=np.float64).reshape(-1))
    return {k: np.concatenate(v) for k, v in out.items()}


def step_columns(steps: list, host: Host, per_step: Mapping[int, Any]) -> dict[str, list]:
    """Host values typed by the steps schema. With world size 1, a step's per-sample losses
    (log_samples) fill loss_min/loss_max/loss_std where the loop did not give them."""
    from k2repro.audit import schema as S
    from k2repro.data.loader import batch_hash

    types = {c.name: c.type for c in S.columns("steps")}
    rows = []
    for step, when, cols in steps:
        r: dict[str, Any] = {"step": step, "time": when}
        for k, v in cols.items():
            v = host.get(v)
            if k == "batch_hash":
                r[k] = v if isinstance(v, str) else batch_hash([int(x) for x in (v.tolist() if hasattr(v, "tolist") else v)])
                continue
            v = host_scalar(v)
            t = types[k]
            if t == "float64":
                v = float(v)
            elif t in ("int64", "int32") and isinstance(v, float) and v.is_integer():
                v = int(v)
            elif t == "bool":
                v = bool(v)
            r[k] = v
        losses = per_step.get(step)
        if losses is not None and losses.size:
            for k, f in (("loss_min", losses.min), ("loss_max", losses.max), ("loss_std", losses.std)):
                r.setdefault(k, float(f()))
        if "tokens_per_s" not in r and r.get("tokens") is not None and r.get("step_time_s"):
            r["tokens_per_s"] = float(r["tokens"]) / float(r["step_time_s"])
        rows.append(r)
    names: list[str] = []
    for r in rows:
        names.extend(k for k in r if k not in names)
    return {k: [r.get(k) for r in rows] for k in names}


def sample_columns(samples: list, host: Host, rank: int) -> dict[str, list]:
    cols: dict[str, list] = {"step": [], "rank": [], "sample_id": [], "loss": [], "n_tokens": []}
    for step, ids_ref, loss_ref, nt_ref in samples:
        ids = host.get(ids_ref)
        losses = host.get(loss_ref)
        ids = [int(x) for x in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        losses = [float(x) for x in (losses.tolist() if hasattr(losses, "tolist") else losses)]
        nt = host.get(nt_ref)
        if nt is None or isinstance(nt, int):
            nts = [nt] * len(ids)
        else:
            nts = [int(x) for x in (nt.tolist() if hasattr(nt, "tolist") else nt)]
        cols["step"] += [step] * len(ids)
        cols["rank"] += [rank] * len(ids)
        cols["sample_id"] += ids
        cols["loss"] += losses
        cols["n_tokens"] += nts
    return cols


__all__ = ["as_step", "is_tensor", "scalar", "keep", "length", "as_float", "Host", "host_scalar", "losses_by_step",
           "step_columns", "sample_columns"]
