"""The model with its seeded initial weights, for everyone who needs one: the trainer, `k2repro
eval` and `k2repro train --dry-run` (which builds it on the meta device). Here, with the model,
so that building one does not import the trainer."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from k2repro.model.llama import ModelArgs, Transformer

#: the RNG stream of the initial weights (purposes keep seeded streams apart; docs/reproducibility.md)
PURPOSE_INIT = 3


def init_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, PURPOSE_INIT]).generate_state(1)[0]))
    return g


def build_model(model_cfg: Any, seed: int, device: torch.device | str = "cpu") -> Transformer:
    """`model_cfg` is the `model` section of the run config. The same weights on every rank and
    world size; on `meta` only shapes (a 65B model can be described, not built, on a laptop)."""
    with torch.device("meta" if str(device) == "meta" else "cpu"):
        model = Transformer(ModelArgs.from_config(model_cfg))
    if str(device) != "meta":
        model.init_weights(init_generator(seed))
        model.to(device)
    return model


__all__ = ["build_model", "init_generator", "PURPOSE_INIT"]
