"""Run ids (torch-free, so launchers can name a run before importing the trainer)."""

from __future__ import annotations

import secrets
from datetime import datetime, timezone


def new_run_id(name: str) -> str:
    """`<name>-<UTC yyyymmdd-HHMMSS>-<6 hex>`: sortable by start time, unique across hosts."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40] or "run"
    return f"{safe}-{stamp}-{secrets.token_hex(3)}"
