"""Any training config as the flat dotted `hparams` keys and a hash: a mapping, dataclass,
argparse namespace, OmegaConf container or an object with `to_dict()` (Transformers'
TrainingArguments, Lightning's hparams), so the audit API records what a loop ran with without
knowing its framework."""

from __future__ import annotations

import argparse
import dataclasses
import enum
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def config_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict of `config`: a mapping, dataclass, argparse/SimpleNamespace,
    OmegaConf container, or an object with `to_dict()` (Transformers' TrainingArguments and
    model configs) or `model_dump()` (pydantic). Values that are none of these become strings."""
    if config is None:
        return {}
    out = _plain(config)
    if not isinstance(out, dict):
        raise ValueError(f"config must be a mapping-like object, got {type(config).__name__}")
    return out


def _plain(x: Any) -> Any:
    if x is None or isinstance(x, bool | int | float | str):
        return x
    mod = type(x).__module__ or ""
    if mod.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return _plain(OmegaConf.to_container(x, resolve=True))
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, enum.Enum):
        return _plain(x.value)
    if isinstance(x, list | tuple | set | frozenset):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    to_dict = getattr(x, "to_dict", None) or getattr(x, "model_dump", None)
    if callable(to_dict) and not isinstance(x, type):
        try:
            return _plain(to_dict())
        except TypeError:
            pass
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, argparse.Namespace) or type(x).__name__ == "SimpleNamespace":
        return {str(k): _plain(v) for k, v in vars(x).items()}
    if hasattr(x, "tolist") and getattr(x, "ndim", 1) == 0:  # numpy / torch scalars
        return x.tolist()
    return str(x)


def config_hash_of(flat: Mapping[str, Any], exclude: Iterable[str] = ()) -> str:
    """sha256 (16 hex) of the canonical JSON of the flattened config, minus the keys (or
    dotted prefixes) in `exclude`: output paths and run names do not change the computation."""
    from k2repro.core.hashing import canonical_hash

    ex = tuple(exclude)
    return canonical_hash({k: v for k, v in flat.items() if not any(k == e or k.startswith(e + ".") for e in ex)})


__all__ = ["config_dict", "config_hash_of"]
