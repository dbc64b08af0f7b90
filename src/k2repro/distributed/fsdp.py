"""FSDP2: `fully_shard` each transformer block, then the root."""

from __future__ import annotations

import torch
from torch import nn


def apply_fsdp(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """Shard parameters over the default process group. With bf16, parameters are cast to bf16
    for compute and gradients are reduced in fp32 (K2 trained in bf16)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.layers:  # type: ignore[attr-defined]
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself otherwise); shares storage.

    DTensor keeps it in `_local_tensor`: reading the field costs 0.4 us, `to_local()` 7 us and
    `detach().to_local()` 15 us through the dispatcher (measured here), and the step and the
    layer statistics ask for every parameter and gradient: about a millisecond a step for 80
    tensors. `to_local()` remains the fallback should the field ever go."""
    loc = getattr(t, "_local_tensor", None)
    if loc is not None:
        return loc
    return t.to_local() if hasattr(t, "to_local") else t
