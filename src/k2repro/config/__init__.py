"""Typed configuration: schema, Hydra composition, validation."""

from k2repro.config.schema import RunConfig

__all__ = ["RunConfig"]
