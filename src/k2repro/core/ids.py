"""Run ids: one per process launch, sortable by start time, safe as a folder name.

One rule for every writer (the trainer, `k2repro.audit.start`, importers, bundle import):
the trainer and the audit API used to build ids their own ways, and a run named `_ablation`
got an id the store then refused (issue 19).
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timezone

from k2repro.errors import BadInputError

# A run id names a folder: no separators, no leading dot (dot folders are staging areas that
# the query layer skips), no spaces.
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def name_prefix(name: str | None) -> str:
    """The part of a run id that comes from a user's run name: letters, digits, `-` and `_`
    (anything else becomes `-`), at most 40 characters, never starting or ending with `-`/`_`
    (so `_ablation` gives `ablation`); `run` when nothing is left. The name itself is kept
    whole in `runs.name`."""
    safe = _NAME_CHARS.sub("-", name or "")[:40].strip("-_")
    return safe or "run"


def new_run_id(name: str | None = None, now: datetime | None = None) -> str:
    """`<name>-YYYYmmdd-HHMMSS-xxxxxxxx` (UTC time + 32 random bits; no name prefix when `name`
    is None): unique without coordination, and runs of one name sort by start time."""
    t = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    stamp = f"{t:%Y%m%d-%H%M%S}-{secrets.token_hex(4)}"
    return stamp if name is None else f"{name_prefix(name)}-{stamp}"


def check_run_id(run_id: str) -> str:
    """Return `run_id` if it is a valid folder name, else raise BadInputError."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise BadInputError(
            f"invalid run id {run_id!r}: use letters, digits, '.', '_', '-' (not first), at most 128")
    return run_id


__all__ = ["name_prefix", "new_run_id", "check_run_id"]
