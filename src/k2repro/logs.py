"""Diagnostics through `logging`, configured once at each process's edge.

Library modules log to `logging.getLogger(__name__)` and never configure anything; the entry
points (`k2repro ...`, a training rank, an eval worker) call `configure()` once. What a command
prints for its user (results, step lines, `run_id=`, one-line errors) stays plain output.

`K2REPRO_LOG_LEVEL` (default WARNING) sets the level. Under torchrun every line says its rank,
and ranks above 0 only show errors unless `K2REPRO_LOG_ALL_RANKS=1`: N ranks repeating the
same warning help nobody.
"""

from __future__ import annotations

import logging
import os
import sys

_HANDLER_NAME = "k2repro"


class _Formatter(logging.Formatter):
    """`k2repro import: warning: ...`, the form of the CLI's own `error:` lines; below INFO the
    module that logged is named too (for whoever debugs)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        where = f" ({record.name})" if record.levelno < logging.INFO else ""
        return f"{self.prefix}: {record.levelname.lower()}: {record.getMessage()}{where}"


def configure(prog: str = "k2repro", environ: dict[str, str] | None = None) -> logging.Logger:
    """Attach one stderr handler to the `k2repro` logger (idempotent; other libraries' loggers
    are left alone). Returns that logger."""
    env = os.environ if environ is None else environ
    root = logging.getLogger("k2repro")
    level = logging.getLevelName(env.get("K2REPRO_LOG_LEVEL", "WARNING").upper())
    if not isinstance(level, int):
        level = logging.WARNING
    rank, world = int(env.get("RANK", "0") or 0), int(env.get("WORLD_SIZE", "1") or 1)
    if rank > 0 and env.get("K2REPRO_LOG_ALL_RANKS") != "1":
        level = max(level, logging.ERROR)
    where = f" rank {rank}" if world > 1 else ""
    for h in list(root.handlers):
        if h.get_name() == _HANDLER_NAME:
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(_Formatter(f"{prog}{where}"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    return root


__all__ = ["configure"]
