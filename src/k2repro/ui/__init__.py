"""`k2repro ui`: a live, interactive run browser over the audit store (docs/ui.md).

Layer `ui` (docs/architecture.md): it reads the store through `audit.query` and the tools
(batch, diff, lineage), never the CLI. `serve()` runs it; `create_app()` gives the ASGI app.
"""

from __future__ import annotations

from typing import Any


def create_app(*args: Any, **kwargs: Any) -> Any:
    """The Starlette app (lazy: importing k2repro.ui does not import Starlette)."""
    from k2repro.ui.app import create_app as make

    return make(*args, **kwargs)


__all__ = ["create_app"]
