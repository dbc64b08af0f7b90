"""The audit store: schema, facts capture, redaction, the sink a training loop calls, and the
query side (`open_store`). See docs/audit-store.md.

Submodules are imported on use: `k2repro.audit.store` (queries) must not pull in pyarrow or
torch, `k2repro.audit.sink` (writing) needs pyarrow.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from k2repro.audit.sink import AuditSink
    from k2repro.audit.store import Store

__all__ = ["AuditSink", "Store", "open_store", "write_run_tables", "append_table", "new_run_id",
           "capture_facts", "start"]


def start(store: str | Path | None = None, *, name: str = "run", config: dict | None = None,
          run_id: str | None = None, rank: int = 0, world_size: int = 1,
          data_manifest: list[dict] | None = None, source: str = "train",
          parent_run_id: str | None = None, resumed_from_step: int | None = None,
          flush_every: int = 10, heartbeat_s: float = 2.0, secrets: Iterable[str] = ()) -> AuditSink:
    """Audit any training loop: a started AuditSink with the facts of this process, the git
    state and diff, and `config` as hparams. Log with `log_steps`/`log_metrics`, end with
    `close()` (or use it as a context manager). All ranks must pass the same `run_id`."""
    import os

    from k2repro.audit.facts import capture_facts, git_diff_text
    from k2repro.audit.runid import new_run_id
    from k2repro.audit.sink import AuditSink

    root = Path(store) if store is not None else Path(os.environ.get("K2REPRO_STORE") or "runs")
    cfg = dict(config or {})
    facts = capture_facts(rank, world_size)
    sink = AuditSink(root, run_id or new_run_id(), rank=rank, world_size=world_size,
                     flush_every=flush_every, heartbeat_s=heartbeat_s, secrets=secrets)
    commit = facts.get("git.commit")
    sink.start({
        "name": name, "source": source, "parent_run_id": parent_run_id,
        "resumed_from_step": resumed_from_step,
        "config_hash": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16],
        "git_commit": None if commit in (None, "absent") else commit,
        "git_dirty": {"true": True, "false": False}.get(facts.get("git.dirty", "")),
    }, cfg, facts, list(data_manifest or []), git_diff=git_diff_text() if rank == 0 else None)
    return sink


def __getattr__(name: str) -> Any:
    if name == "AuditSink":
        from k2repro.audit.sink import AuditSink

        return AuditSink
    if name in ("Store", "open_store"):
        from k2repro.audit import store

        return getattr(store, name)
    if name in ("write_run_tables", "append_table"):
        from k2repro.audit import writer

        return getattr(writer, name)
    if name == "new_run_id":
        from k2repro.audit.runid import new_run_id

        return new_run_id
    if name == "capture_facts":
        from k2repro.audit.facts import capture_facts

        return capture_facts
    raise AttributeError(name)
