"""Run ids: one per process launch, sortable by start time, safe as a folder name."""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timezone

from k2repro.errors import BadInputError

# A run id names a folder: no separators, no leading dot (dot folders are staging areas that
# the query layer skips), no spaces.
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def new_run_id(now: datetime | None = None) -> str:
    """`YYYYmmdd-HHMMSS-xxxxxxxx` (UTC time + 32 random bits): unique without coordination,
    and `ORDER BY run_id` is start order."""
    t = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return f"{t:%Y%m%d-%H%M%S}-{secrets.token_hex(4)}"


def check_run_id(run_id: str) -> str:
    """Return `run_id` if it is a valid folder name, else raise BadInputError."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise BadInputError(
            f"invalid run id {run_id!r}: use letters, digits, '.', '_', '-' (not first), at most 128")
    return run_id
