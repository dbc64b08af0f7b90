"""`k2repro.audit.start`: audit any training loop (docs/audit-api.md).

Most people who need an audit trail already have a trainer. This module is the library face of
the audit layer: a run object with `log_step`, `log_samples`, `log_layer_stats`,
`log_checkpoint` and `log_event` on top of the same `AuditSink`, facts capture, redaction, crash
safety and run lifecycle that k2repro's own trainer uses (not a copy of them).

The loop never waits: values may be 0-d tensors, which stay on their device (detached) until
the next flush, where all of them move to the host in one transfer per device and dtype (a
`.item()` per value per step would be a host-device sync each). Per-parameter statistics are
reduced on the device with one asynchronous all_gather of every rank's sums and maxima when a
process group is initialized, waited for at the flush (FSDP2/DTensor shards are counted once).

Importing this module does not import torch; tensors are recognised when they are logged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from k2repro.audit.auditrun import ABSENT_EVENT, ABSENT_RULES_OUT, AuditRun
from k2repro.audit.config_view import config_dict, config_hash_of
from k2repro.audit.layerstats import grad_norm, process_group
from k2repro.core.layout import default_store


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else torch.distributed's, else the RANK/WORLD_SIZE environment, else 0/1."""
    d = process_group()
    if rank is None:
        rank = d.get_rank() if d is not None else int(os.environ.get("RANK", "0"))
    if world_size is None:
        world_size = d.get_world_size() if d is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return int(rank), int(world_size)


def _resolve_run_id(run_id: str | None, name: str, world_size: int) -> str:
    """Every rank must write under the same run id. Order: `run_id=`, $K2REPRO_RUN_ID, rank 0's
    new id broadcast over the initialized process group, a new id (world size 1)."""
    from k2repro.core.ids import check_run_id, new_run_id

    if run_id:
        return check_run_id(run_id)
    if os.environ.get("K2REPRO_RUN_ID"):
        return check_run_id(os.environ["K2REPRO_RUN_ID"])
    fresh = new_run_id(name)
    d = process_group()
    if d is not None and d.get_world_size() > 1:
        box = [fresh]
        d.broadcast_object_list(box, src=0)
        return check_run_id(str(box[0]))
    if world_size > 1:
        from k2repro.errors import BadInputError

        raise BadInputError(f"world_size={world_size} without an initialized process group: pass the same "
                            "run_id= on every rank (or set K2REPRO_RUN_ID), or init torch.distributed first")
    return fresh


def start(store: str | Path | None = None, *, config: Any = None, name: str = "run",
          rank: int | None = None, world_size: int | None = None, run_id: str | None = None,
          data_manifest: list[dict] | None = None, source: str = "api",
          parent_run_id: str | None = None, resumed_from_step: int | None = None,
          flush_every: int = 10, heartbeat_s: float = 2.0, queue_size: int = 1024,
          secrets: Iterable[str] = (), absent: Mapping[str, str] | Iterable[str] = (),
          hash_exclude: Iterable[str] = (), facts: Mapping[str, Any] | None = None) -> AuditRun:
    """Start auditing a training loop; use the result as a context manager (an exception in
    the block marks the run failed with its traceback) or call `close()`.

    `config` is flattened to dotted `hparams` keys (redaction happens in the sink). `store`
    defaults to $K2REPRO_STORE, else `runs`. `rank`/`world_size` default to torch.distributed's
    (or RANK/WORLD_SIZE). Every rank calls `start` (collective when a process group is up: rank
    0's run id is broadcast). `absent` declares what this loop cannot give (name -> why), see
    ABSENT_RULES_OUT; `facts` adds `env` rows (e.g. the adapter in use)."""
    from k2repro.audit.facts import capture_facts, git_diff_text
    from k2repro.audit.sink import AuditSink
    from k2repro.config.load import flatten

    root = Path(store) if store is not None else default_store()
    rank, world_size = rank_and_world(rank, world_size)
    nested = config_dict(config)
    flat = flatten(nested)
    rid = _resolve_run_id(run_id, name, world_size)
    env = capture_facts(rank, world_size, extra={"audit.api": "k2repro.audit.start", **dict(facts or {})})
    sink = AuditSink(root, rid, rank=rank, world_size=world_size, flush_every=flush_every,
                     queue_size=queue_size, heartbeat_s=heartbeat_s, secrets=secrets)
    run = {  # the rest of the row: audit/runrow.py, in the sink
        "name": name, "source": source, "parent_run_id": parent_run_id,
        "resumed_from_step": resumed_from_step, "config_hash": config_hash_of(flat, hash_exclude),
        "config_json": json.dumps(nested, sort_keys=True, default=str),
    }
    sink.start(run, flat, env, list(data_manifest or []), git_diff=git_diff_text() if rank == 0 else None)
    declared = dict(absent) if isinstance(absent, Mapping) else {k: "declared absent by the caller" for k in absent}
    out = AuditRun(sink, declared=declared, has_manifest=bool(data_manifest))
    if declared and rank == 0:
        out._log_absent(declared)
    return out


__all__ = ["start", "AuditRun", "config_dict", "config_hash_of", "rank_and_world", "ABSENT_EVENT",
           "ABSENT_RULES_OUT", "grad_norm"]
