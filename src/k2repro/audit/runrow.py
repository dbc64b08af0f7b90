"""The `runs` row and the `run_end` marker: what every writer of a run fills in, in one place.

The trainer, `k2repro.audit.start` (and the trainer integrations on it) and the importers all
record runs. Each used to build the row its own way, and they drifted: `git_dirty` was read as
"true" in one place and "True" in another. Here a writer gives what only it knows (name,
source, lineage, config) and this module fills the rest the same way for all of them.
"""

from __future__ import annotations

import abc
import json
import os
import socket
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from k2repro.audit import schema as S

#: the columns a writer may give (run_id is the folder's)
RUN_COLUMNS = tuple(c.name for c in S.TABLES["runs"] if c.name != "run_id")


def launcher(environ: Mapping[str, str] | None = None) -> str:
    """How this process was started: torchrun (torch elastic), slurm, mpi or plain python."""
    e = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" in e or ("LOCAL_RANK" in e and "WORLD_SIZE" in e and "MASTER_PORT" in e):
        return "torchrun"
    if "SLURM_JOB_ID" in e:
        return "slurm"
    if "OMPI_COMM_WORLD_RANK" in e or "PMI_RANK" in e:
        return "mpi"
    return "python"


def git_fields(facts: Mapping[str, Any] | None) -> dict[str, Any]:
    """`git_commit` and `git_dirty` from the captured facts (`git.commit`, `git.dirty`): the
    facts say "absent" outside a checkout, the columns say NULL; `git.dirty` is "true"/"false"
    (older stores and other writers: any case)."""
    facts = facts or {}
    commit = facts.get("git.commit")
    dirty = str(facts.get("git.dirty", "")).strip().lower()
    return {"git_commit": None if commit in (None, "", "absent") else str(commit),
            "git_dirty": {"true": True, "false": False}.get(dirty)}


def runs_row(identity: Mapping[str, Any], *, store_path: str, world_size: int = 1,
             facts: Mapping[str, Any] | None = None, live: bool = True) -> dict[str, Any]:
    """The whole `runs` row. `identity` holds what the writer knows (name, source,
    parent_run_id, resumed_from_step, config_hash, config_json, ...; any column may be given).
    `live`: the row describes this process (start time, host, pid, launcher, argv), as for a
    training run; an import describes a run that happened elsewhere and leaves them empty.
    Git columns come from `facts` unless given."""
    unknown = sorted(set(identity) - set(RUN_COLUMNS))
    if unknown:
        raise ValueError(f"runs row: unknown column(s) {', '.join(unknown)}")
    from k2repro import __version__

    row: dict[str, Any] = dict.fromkeys(RUN_COLUMNS)
    row.update(source="train", world_size=world_size, store_path=str(store_path),
               schema_version=S.SCHEMA_VERSION, k2repro_version=__version__, **git_fields(facts))
    if live:
        row.update(started_at=datetime.now(timezone.utc), host=socket.gethostname(), pid=os.getpid(),
                   launcher=launcher(), argv=list(sys.argv))
    row.update(identity)
    if isinstance(row["argv"], list | tuple):
        row["argv"] = json.dumps(list(row["argv"]))
    return row


def end_row(rank: int, status: str, error: str | None = None,
            ended_at: datetime | None = None) -> dict[str, list]:
    """One rank's end marker (`run_end`, columnar): what the derived run status reads."""
    return {"rank": [rank], "status": [status], "ended_at": [ended_at or datetime.now(timezone.utc)],
            "error": [error], "pid": [os.getpid()], "host": [socket.gethostname()]}


class EndsOnExit(abc.ABC):
    """`with run:` ends the run when the block ends: `completed`, or `failed` with the
    traceback of the exception that left it (the sink and the audit API's run alike)."""

    @abc.abstractmethod
    def close(self, status: str = "completed", error: str | None = None) -> None:
        """End the run with `status` (and `error`, for a failed one)."""

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.close("completed")
        else:
            import traceback

            self.close("failed", "".join(traceback.format_exception(exc_type, exc, tb)))


__all__ = ["RUN_COLUMNS", "launcher", "git_fields", "runs_row", "end_row", "EndsOnExit"]
