"""k2repro: reproducibility and audit toolkit for LLM pretraining.

Importing the package is cheap (no torch): the query tools must answer in about a second.
"""

from __future__ import annotations

__version__ = "0.1.0"


def open_store(path: str | None = None):  # noqa: ANN201 - lazy import keeps torch out
    """Open an audit store for queries (see docs/audit-store.md)."""
    from k2repro.audit.store import open_store as _open

    return _open(path)


__all__ = ["__version__", "open_store"]
