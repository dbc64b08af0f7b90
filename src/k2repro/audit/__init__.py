"""The audit store: schema, facts capture, redaction, the sink a training loop calls, and the
query side (`open_store`). See docs/audit-store.md.

Submodules are imported on use: `k2repro.audit.store` (queries) must not pull in pyarrow or
torch, `k2repro.audit.sink` (writing) needs pyarrow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from k2repro.audit.sink import AuditSink
    from k2repro.audit.store import Store

__all__ = ["AuditSink", "Store", "open_store", "write_run_tables", "append_table", "new_run_id",
           "capture_facts", "start"]


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
        from k2repro.core.ids import new_run_id

        return new_run_id
    if name == "start":  # docs/audit-api.md: audit any training loop
        from k2repro.audit.api import start

        return start
    if name == "capture_facts":
        from k2repro.audit.facts import capture_facts

        return capture_facts
    raise AttributeError(name)
