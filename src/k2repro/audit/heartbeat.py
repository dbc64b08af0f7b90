"""A rank's heartbeat file (`<run>/_heartbeat/r<rank>.json`) and the low priority of the
audit's own threads.

A process that dies without closing its run writes no end marker; the query side derives
`crashed` from a heartbeat whose mtime is older than a few `heartbeat_s`, or whose pid is gone
(with its start time, so a reused pid does not look alive). A thread only touches the file's
mtime: no write, no fsync, nothing for a reader to see half-done.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from k2repro.core.atomic import atomic_write_bytes

#: Nice increment of the writer and heartbeat threads (Linux: per thread).
WRITER_NICE = 10


def lower_thread_priority() -> None:
    """On Linux, setpriority() on a thread id renices that thread only. The writer's CPU then
    goes to the training threads first: on a laptop where every core runs a rank, the writer
    works in the gaps (collectives, data waits) instead of stretching the next step, and it
    still gets the CPU whenever a core is idle, so nothing is dropped or delayed for long."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
    except (OSError, AttributeError):
        pass


def _pid_start() -> float | None:
    try:
        import psutil

        return psutil.Process(os.getpid()).create_time()
    except Exception:
        return None


class Heartbeat:
    """The heartbeat of one rank of one run: `write` (re)writes the file, a thread touches it
    every `interval` seconds between `start` and `stop`."""

    def __init__(self, path: Path, run_id: str, rank: int, interval: float) -> None:
        self.path, self.run_id, self.rank, self.interval = path, run_id, rank, interval
        self._started_at: str | None = None  # kept when the file is rewritten
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cpu_s = 0.0  # this thread's CPU time (what the heartbeat costs a rank)

    def write(self, last_seq: int | None = None) -> None:
        """The whole file; `last_seq` (at close) is the last segment number this rank used, so
        `verify-store` sees a deleted newest segment."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._started_at = self._started_at or datetime.now(timezone.utc).isoformat()
        body = {"run_id": self.run_id, "rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(),
                "pid_start": _pid_start(), "heartbeat_s": self.interval, "started_at": self._started_at}
        if last_seq is not None:
            body["last_seq"] = last_seq
        atomic_write_bytes(self.path, json.dumps(body).encode())

    def touch(self) -> None:
        try:
            os.utime(self.path)
        except FileNotFoundError:
            self.write()
        except OSError:
            pass

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"k2repro-audit-hb-r{self.rank}", daemon=True)
        self._thread.start()

    def stop(self, last_seq: int) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.write(last_seq=last_seq)
        except OSError:
            self.touch()

    def _loop(self) -> None:
        c0 = time.thread_time()
        lower_thread_priority()
        while not self._stop.wait(self.interval):
            self.touch()
            self.cpu_s = time.thread_time() - c0
        self.cpu_s = time.thread_time() - c0


__all__ = ["Heartbeat", "lower_thread_priority", "WRITER_NICE"]
