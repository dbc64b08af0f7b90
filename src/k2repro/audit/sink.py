"""AuditSink: what a training loop calls to record a run into the store.

The loop hands columnar batches (column -> list of values, about once per `flush_every` steps)
to `log_*`, then `flush()`: that only moves references into a bounded queue. A background
thread turns each flush into one Parquet segment per table (explicit schema, redacted strings,
temp + rename), so the loop never waits on disk. When the writer falls behind, queued flushes
are merged into one segment per table.

Back-pressure: if the queue holds `queue_size` flushes, `flush()` blocks until the writer
takes one (memory stays bounded, nothing is dropped) and records an `audit_backpressure`
warning event with the seconds waited. The writer never waits on the loop, so this cannot
deadlock; if the writer thread dies (disk full, ...), the next `log_*`/`flush`/`close` raises
AuditWriteError instead of blocking.

Crash safety: segments appear whole or not at all; a SIGKILL loses the flushes still in the
queue (normally at most the last `flush_every` steps) and nothing else. A heartbeat file per
rank (`<run>/_heartbeat/r<rank>.json`, mtime touched every `heartbeat_s`) and the end marker
(`run_end`, written by `close`) let the query side derive running/completed/failed/crashed.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import socket
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from k2repro.audit import schema as S
from k2repro.audit.heartbeat import Heartbeat, lower_thread_priority
from k2repro.audit.hparams import hparam_rows
from k2repro.audit.redact import Redactor
from k2repro.audit.runrow import EndsOnExit, end_row, runs_row
from k2repro.audit.storemeta import ensure_store
from k2repro.audit.views import HEARTBEAT_DIR
from k2repro.audit.writer import (
    WriteHook,
    to_arrow,
    utcnow,
    write_run_marker,
    write_segment,
)
from k2repro.core.ids import check_run_id
from k2repro.core.layout import RUN_MARKER
from k2repro.errors import BadInputError

#: Bytes each rank keeps in a reserve file (`<run>/.reserve-r<rank>`) from start to close: when
#: a full disk kills the writer, deleting it makes room for the end marker and the error, so
#: the run reads `failed` with its reason instead of `crashed` without one. An end marker is
#: about 2 KB; small enough that a nearly full disk still grants every rank its reserve.
RESERVE_BYTES = 32 * 1024

#: A rank's open segment of a table is rewritten (as a superset) until it holds this many
#: writes or rows; then a new segment starts. Each rewrite re-encodes every row of the open
#: segment, so the writer's CPU per flush grows with this number: measured in instructions
#: (callgrind, the writes of a 1-rank default run replayed), 32 writes cost 15.3 M per flush,
#: 8 cost 9.7 M and a fresh segment every flush 7.9 M (docs/audit-store.md, "What the audit
#: costs"). 8 keeps a 100k-flush run at ~12k files per table and rank, which
#: `k2repro gc --compact` merges into large zstd segments.
ROLL_FLUSHES = 8
ROLL_ROWS = 50_000


class AuditWriteError(RuntimeError):
    """The background writer failed; the run's audit trail is incomplete from here on."""


_STOP = object()
_KNOWN = {t: frozenset(S.column_names(t)) for t in S.TABLES}


class _Barrier:
    """Queued behind data: set once everything before it is on disk (flush(wait=True))."""

    def __init__(self) -> None:
        self.done = threading.Event()


class AuditSink(EndsOnExit):
    """Records one rank of one run. Methods are called from the training thread only."""

    def __init__(self, store_root: str | Path, run_id: str, rank: int = 0, world_size: int = 1,
                 flush_every: int = 10, queue_size: int = 1024, heartbeat_s: float = 2.0,
                 secrets: Iterable[str] = (), *, on_write: WriteHook | None = None,
                 fsync: bool = False) -> None:
        self.store_root = Path(store_root)
        self.run_id = check_run_id(run_id)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.flush_every = int(flush_every)
        self.heartbeat_s = float(heartbeat_s)
        if queue_size < 1 or heartbeat_s <= 0:
            raise ValueError("queue_size must be >= 1 and heartbeat_s > 0")
        self.redactor = Redactor.from_env(secrets=secrets)
        self._on_write = on_write
        self._fsync = fsync
        self._run_dir = self.store_root / self.run_id
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._buffers: dict[str, list[Mapping[str, Any]]] = {}
        self._seq = 0
        self._open: dict[str, tuple[str, Any, int]] = {}  # table -> (segment name, rows, writes)
        self._error: BaseException | None = None
        self._started = False
        #: the run's `runs` row is in the store (rank 0): from here on it can be named
        self.recorded = False
        self._closed = False
        self._writer: threading.Thread | None = None
        self._heartbeat = Heartbeat(self._run_dir / HEARTBEAT_DIR / f"r{self.rank}.json", self.run_id, self.rank,
                                    self.heartbeat_s)
        self._reserve_path = self._run_dir / f".reserve-r{self.rank}"
        self.segments_written = 0
        self.backpressure_s = 0.0
        self.writer_cpu_s = 0.0  # CPU time of the writer thread's conversions and writes

    # ------------------------------------------------------------------ public API

    @property
    def run_dir(self) -> Path:
        return self._run_dir

    @property
    def heartbeat_cpu_s(self) -> float:
        """CPU time of this sink's heartbeat thread so far."""
        return self._heartbeat.cpu_s

    def start(self, run: dict, hparams: dict[str, Any], env: dict[str, str],
              data_manifest: list[dict], *, git_diff: str | None = None) -> None:
        """Write the run's identity synchronously (a crash right after still shows the run),
        then start the writer and heartbeat threads. Rank 0 writes `runs`, `hparams`,
        `data_manifest`, a `start` event and (if given) the `git_diff` event; every rank writes
        its `env` rows. Raises BadInputError if the run id already exists."""
        if self._started:
            raise RuntimeError("AuditSink.start() called twice")
        # Values under secret-named config keys are secrets everywhere (argv, diff, ...).
        self.redactor.add_from_mapping(hparams)
        self.redactor.add_from_mapping(run)
        if self.rank == 0:
            ensure_store(self.store_root)
            if (self._run_dir / RUN_MARKER).exists():
                raise BadInputError(f"run {self.run_id} already exists in {self.store_root}")
        self._run_dir.mkdir(parents=True, exist_ok=True)
        self._make_reserve()  # first: a disk that fills during the writes below still has it
        self._seq = self._next_free_seq()
        try:
            self._write_identity(run, hparams, env, data_manifest, git_diff)
        except BaseException as exc:  # a full disk already: still end the run as failed, if possible
            self._release_reserve()
            self._open = {}
            try:
                self._write_now("run_end", self._end_row("failed", f"audit start failed: {exc!r}"))
            except Exception:
                pass
            raise
        self._started = True
        self._writer = threading.Thread(target=self._writer_loop, name=f"k2repro-audit-writer-r{self.rank}",
                                        daemon=True)
        self._writer.start()
        self._heartbeat.start()
        _LIVE.add(self)

    def _write_identity(self, run: dict, hparams: dict[str, Any], env: dict[str, str],
                        data_manifest: list[dict], git_diff: str | None) -> None:
        """The synchronous part of start(): heartbeat file, run marker and identity tables."""
        self._heartbeat.write()
        if self.rank == 0:
            write_run_marker(self._run_dir, self.run_id)
            self._write_now("runs", {k: [v] for k, v in self._run_row(run, hparams, env).items()})
            self.recorded = True
            self._write_now("hparams", hparam_rows(hparams))
            if data_manifest:
                cols = sorted({k for row in data_manifest for k in row})
                self._write_now("data_manifest", {c: [row.get(c) for row in data_manifest] for c in cols})
            events = [self._event_row("start", None, "info", {
                "pid": os.getpid(), "host": socket.gethostname(), "world_size": self.world_size,
                "argv": list(sys.argv)})]
            if git_diff is not None:
                import hashlib

                events.append(self._event_row("git_diff", None, "info", {
                    "sha256": hashlib.sha256(git_diff.encode()).hexdigest(), "diff": git_diff}))
            self._write_now("events", self._columns(events))
        env_rows = {"rank": [self.rank] * len(env), "key": list(env), "value": [str(v) for v in env.values()]}
        self._write_now("env", env_rows)

    def log_steps(self, rows: dict[str, list]) -> None:
        """A columnar batch of `steps` rows (rank 0)."""
        self._buffer("steps", rows)

    def log_layer_stats(self, rows: dict[str, list]) -> None:
        """A columnar batch of `layer_stats` rows (rank 0)."""
        self._buffer("layer_stats", rows)

    def log_samples(self, rows: dict[str, list]) -> None:
        """A columnar batch of `sample_stats` rows of this rank (`rank` filled in if absent)."""
        if "rank" not in rows:
            n = len(next(iter(rows.values()), []))
            rows = {**rows, "rank": [self.rank] * n}
        self._buffer("sample_stats", rows)

    def log_checkpoint(self, row: dict) -> None:
        """One `checkpoints` row (`time` defaults to now)."""
        self._buffer("checkpoints", {k: [v] for k, v in ({"time": utcnow()} | dict(row)).items()})

    def log_evals(self, rows: dict[str, list]) -> None:
        self._buffer("evals", rows)

    def log_metrics(self, rows: dict[str, list]) -> None:
        """Free-form scalars (`step`, `name`, `value`) without a column of their own."""
        self._buffer("metrics", rows)

    def log(self, table: str, rows: dict[str, list]) -> None:
        """Any table by name (columnar)."""
        self._buffer(table, rows)

    def log_event(self, kind: str, step: int | None = None, severity: str = "info",
                  detail: dict | None = None) -> None:
        """Written at the next flush."""
        self._buffer("events", self._columns([self._event_row(kind, step, severity, detail)]))

    def flush(self, wait: bool = False) -> None:
        """Hand everything buffered to the writer thread; returns at once (unless the queue is
        full, see the module doc). `wait=True` also blocks until it is on disk."""
        self._raise_if_failed()
        if self._buffers:
            item, self._buffers = self._buffers, {}
            self._put(item)
        if wait and self._writer is not None:
            barrier = _Barrier()
            self._put(barrier)
            while not barrier.done.wait(0.1):
                if self._writer is None or not self._writer.is_alive():
                    break
            self._raise_if_failed()

    def close(self, status: str = "completed", error: str | None = None) -> None:
        """Drain the queue (blocks), write the end marker (`run_end`; a failed run's error or
        traceback also goes to `events`), stop the heartbeat. Idempotent."""
        if self._closed:
            return
        if status not in ("completed", "failed", "interrupted"):
            raise ValueError(f"status must be 'completed', 'failed' or 'interrupted' (got {status!r})")
        _LIVE.discard(self)
        if not self._started:
            self._closed = True
            return
        ends = [self._event_row("end", None, {"completed": "info", "interrupted": "warning"}.get(status, "error"),
                                {"status": status})]
        if error is not None:
            ends.insert(0, self._event_row("error", None, "error", {"error": error}))
        self._buffer("events", self._columns(ends), check=False)
        self._closed = True
        try:
            if self._error is None:
                self.flush()
        except AuditWriteError:
            pass
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join()
        failure = self._error
        self._release_reserve()  # room for the end marker, even on a full disk
        try:
            if failure is None:
                self._write_now("run_end", self._end_row(status, error))
            else:
                error = (error + "\n" if error else "") + f"audit writer failed: {failure!r}"
                # Fresh, small segments from here (no rewrite of a large open one), the end
                # marker first: it alone makes the run read `failed` with its error.
                self._open = {}
                self._write_now("run_end", self._end_row("failed", error))
                try:  # the writer is gone: whatever is still buffered goes out now, if it fits
                    for table, batches in self._merge([self._buffers]).items():
                        self._write_now(table, batches)
                except Exception:
                    pass
        finally:
            self._heartbeat.stop(last_seq=self._seq - 1)
        if failure is not None:
            raise AuditWriteError(f"audit writer failed: {failure!r}") from failure

    # ------------------------------------------------------------------ internals

    def _buffer(self, table: str, rows: Mapping[str, Any], check: bool = True) -> None:
        if check:
            self._raise_if_failed()
        if self._closed:
            raise RuntimeError("AuditSink is closed")
        if not self._started:
            raise RuntimeError("AuditSink.start() must come before logging")
        known = _KNOWN.get(table) or S.column_names(table)  # raises for an unknown table
        unknown = [k for k in rows if k not in known]
        if unknown:
            raise ValueError(f"{table}: unknown column(s) {unknown} (known: {', '.join(known)})")
        lengths = {len(v) for v in rows.values()}
        if len(lengths) > 1:
            raise ValueError(f"{table}: columns differ in length: { {k: len(v) for k, v in rows.items()} }")
        # Copy the lists: the loop may reuse its own after the call returns.
        self._buffers.setdefault(table, []).append(
            {k: (v.copy() if hasattr(v, "copy") else list(v)) for k, v in rows.items()})

    def _put(self, item: Any) -> None:
        try:
            self._queue.put_nowait(item)
            return
        except queue.Full:
            pass
        t0 = time.perf_counter()
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.2)
                break
            except queue.Full:
                continue
        waited = time.perf_counter() - t0
        self.backpressure_s += waited
        self._buffers.setdefault("events", []).append(self._columns([self._event_row(
            "audit_backpressure", None, "warning",
            {"waited_s": waited, "queue_size": self._queue.maxsize})]))

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise AuditWriteError(f"audit writer failed: {self._error!r}") from self._error

    def _event_row(self, kind: str, step: int | None, severity: str, detail: dict | None) -> dict:
        return {"time": utcnow(), "rank": self.rank, "step": step, "kind": kind, "severity": severity,
                "detail": None if detail is None else json.dumps(self.redactor.redact_obj(detail),
                                                                 default=str, sort_keys=True)}

    @staticmethod
    def _columns(rows: list[dict]) -> dict[str, list]:
        cols = sorted({k for r in rows for k in r})
        return {c: [r.get(c) for r in rows] for c in cols}

    def _run_row(self, run: Mapping[str, Any], hparams: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
        """audit/runrow.py fills what the caller did not give; without a config_json, the
        hparams (redacted) stand for it."""
        identity = {k: v for k, v in run.items() if k != "run_id"}
        identity.setdefault("config_json", json.dumps(self.redactor.redact_obj(dict(hparams)), default=str,
                                                      sort_keys=True))
        return runs_row(identity, store_path=str(self.store_root), world_size=self.world_size, facts=env)

    def _next_free_seq(self) -> int:
        """Segment numbers continue after any this rank already wrote (never overwrite)."""
        prefix = f"r{self.rank}-"
        top = -1
        if self._run_dir.exists():
            for d in self._run_dir.iterdir():
                if d.is_dir() and d.name in S.TABLES:
                    for f in d.iterdir():
                        if f.name.startswith(prefix) and f.name.endswith(".parquet"):
                            try:
                                top = max(top, int(f.name[len(prefix):-len(".parquet")]))
                            except ValueError:
                                pass
        return top + 1

    def _write_now(self, table: str, cols: Mapping[str, Any]) -> None:
        """Write rows of `table` into this rank's open segment of that table: the segment is
        replaced by a superset of itself (temp + rename onto the same name) until it holds
        ROLL_FLUSHES writes or ROLL_ROWS rows, then the next one opens. Readers see either
        version, both complete; a run keeps one file per ROLL_FLUSHES flushes per table, not one per flush."""
        import pyarrow as pa

        new = to_arrow(table, cols, self.run_id, self.redactor)
        cur = self._open.get(table)
        # A batch big enough to be a good file on its own (the writer fell behind and merged
        # many flushes) gets its own segment instead of rewriting the open one.
        if (cur is not None and cur[2] < ROLL_FLUSHES and new.num_rows * 4 < ROLL_ROWS
                and cur[1].num_rows + new.num_rows <= ROLL_ROWS):
            name, tbl, writes = cur[0], pa.concat_tables([cur[1], new]), cur[2] + 1
        else:
            name, tbl, writes = f"r{self.rank}-{self._seq:08d}.parquet", new, 1
            self._seq += 1
        write_segment(self._run_dir / table, name, tbl, on_write=self._on_write, fsync=self._fsync,
                      scrubbed=True)  # to_arrow scrubbed the new rows; the open ones were
        self._open[table] = (name, tbl, writes)
        self.segments_written += 1

    @staticmethod
    def _merge(items: list[dict[str, list[Mapping[str, Any]]]]) -> dict[str, dict[str, list]]:
        """Concatenate the column batches of several flushes per table (NULL-padding columns
        that some batches lack), so each table becomes one segment."""
        import numpy as np

        per_table: dict[str, list[Mapping[str, Any]]] = {}
        for item in items:
            for table, batches in item.items():
                per_table.setdefault(table, []).extend(batches)
        out: dict[str, dict[str, Any]] = {}
        for table, batches in per_table.items():
            if len(batches) == 1:  # numpy columns stay arrays: Arrow takes them without a loop
                out[table] = dict(batches[0])
                continue
            names: list[str] = []
            for b in batches:
                names.extend(k for k in b if k not in names)
            merged: dict[str, Any] = {}
            for k in names:
                parts = [b.get(k) for b in batches]
                if all(isinstance(v, np.ndarray) for v in parts):
                    merged[k] = np.concatenate(parts)
                    continue
                col: list = []
                for b, v in zip(batches, parts):
                    if v is None:
                        col.extend([None] * len(next(iter(b.values()), [])))
                    else:
                        col.extend(v.tolist() if isinstance(v, np.ndarray) else v)
                merged[k] = col
            out[table] = merged
        return out

    def _writer_loop(self) -> None:
        lower_thread_priority()
        stop = False
        while not stop:
            items = [self._queue.get()]
            while True:  # take whatever else is waiting: fewer, larger segments when behind
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            pending: list[dict] = []
            for it in items:
                if it is _STOP or isinstance(it, _Barrier):
                    self._write_pending(pending)
                    pending = []
                    if it is _STOP:
                        stop = True
                    else:
                        it.done.set()
                else:
                    pending.append(it)
            self._write_pending(pending)

    def _write_pending(self, pending: list[dict]) -> None:
        if not pending or self._error is not None:
            return  # after a failure, queued data is dropped so producers never block
        t0 = time.thread_time()
        try:
            for table, cols in self._merge(pending).items():
                self._write_now(table, cols)
        except BaseException as exc:  # surfaced to the training thread on its next call
            self._error = exc
        self.writer_cpu_s += time.thread_time() - t0

    def _end_row(self, status: str, error: str | None) -> dict[str, list]:
        """This rank's end marker (`run_end`): what the derived run status reads."""
        return end_row(self.rank, status, self.redactor.scrub(error) if error else None)

    def _make_reserve(self) -> None:
        """Real bytes (random, so no compressing or deduplicating file system keeps them
        sparse). A disk too full for them already just gets no reserve."""
        try:
            with open(self._reserve_path, "wb") as fh:
                fh.write(os.urandom(RESERVE_BYTES))
        except OSError:
            self._reserve_path.unlink(missing_ok=True)

    def _release_reserve(self) -> None:
        try:
            self._reserve_path.unlink(missing_ok=True)
        except OSError:
            pass


# Sinks that were started and not closed: at interpreter exit they are closed as failed, so a
# loop that forgot close() (or died of an uncaught exception) is not shown as running forever.
_LIVE: weakref.WeakSet[AuditSink] = weakref.WeakSet()


@atexit.register
def _close_forgotten() -> None:
    for sink in list(_LIVE):
        try:
            exc = getattr(sys, "last_value", None)
            msg = "process exited without AuditSink.close()"
            if exc is not None:
                msg += "\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            sink.close("failed", msg)
        except Exception:
            pass
