"""Progress of a data stage: documents/s, MB/s, percent and ETA.

A stage over a gigabyte runs for minutes; silence (`pack` said nothing for 12.6 s on 18 MB)
looks like a hang. On a terminal one line is redrawn in place (`\\r`, at most ~4 times a
second); anywhere else (a log file, a pipe, `dvc repro`) the same figures go out as plain
`logging` lines every `every` seconds (K2REPRO_PROGRESS_EVERY, default 10) plus one summary
line at the end, so a log shows progress without a carriage-return mess.

`update()` is called once per document, so it only adds to counters and compares an integer;
the clock is read every `stride` calls, a stride adapted (doubling at most per read) so that
reads happen ~50 times a second whatever the document rate (bench: tens of ns a call).

How a stage uses it::

    with Progress("pack", total_docs=n, total_bytes=nbytes) as prog:
        for doc in docs:
            ...
            prog.update(1, len(doc_bytes))      # or prog.update(len(batch), batch_bytes)

    texts = prog.wrap(texts)  # a generator that counts what it yields (str: UTF-8 bytes)

A stage running as N parallel tasks gives each its own `Progress(f"{stage} task {rank}/{N}",
..., redraw=False)` with that task's totals: each task's lines are complete on their own, and
no two tasks redraw over each other on a shared terminal.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, TypeVar

LOGGER = logging.getLogger("k2repro.progress")
ENV_EVERY = "K2REPRO_PROGRESS_EVERY"
DEFAULT_EVERY_S = 10.0
TTY_EVERY_S = 0.25
CLOCK_READS_PER_S = 50
T = TypeVar("T")


def enable_logging(environ: Mapping[str, str] | None = None) -> None:
    """Let progress lines through at the CLI's default level (WARNING): a data stage's log
    should show its progress unless the user chose a level with K2REPRO_LOG_LEVEL. Call once
    at an entry point, after `k2repro.logs.configure`."""
    env = os.environ if environ is None else environ
    if not env.get("K2REPRO_LOG_LEVEL"):
        LOGGER.setLevel(logging.INFO)


def _every_from_env() -> float:
    try:
        return max(float(os.environ.get(ENV_EVERY, DEFAULT_EVERY_S)), 0.0)
    except ValueError:
        return DEFAULT_EVERY_S


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Counts documents and bytes of one stage and reports rates (see the module doc)."""

    def __init__(self, stage: str, total_docs: int | None = None, total_bytes: int | None = None,
                 stream: IO[str] | None = None, every: float | None = None,
                 tty_every: float = TTY_EVERY_S, logger: logging.Logger | None = None,
                 redraw: bool | None = None) -> None:
        """`redraw=False` forces log lines even on a terminal: for a stage's parallel tasks,
        whose redrawn lines would overwrite each other on the one terminal they share."""
        self.stage = stage
        self.total_docs = total_docs
        self.total_bytes = total_bytes
        self.stream = sys.stderr if stream is None else stream
        self.logger = LOGGER if logger is None else logger
        self.tty = _isatty(self.stream) if redraw is None else redraw and _isatty(self.stream)
        self.every = tty_every if self.tty else (_every_from_env() if every is None else every)
        # neither a terminal nor a log that shows INFO: count only
        self.active = self.tty or self.logger.isEnabledFor(logging.INFO)
        self.docs = 0
        self.nbytes = 0
        self.lines = 0  # reports written (redraws or log lines), for tests and callers
        self._calls = 0
        self._next_check = 1
        self._stride = 1
        self.t0 = self._last_check = time.monotonic()
        self._due = self.t0 + self.every
        self._closed = False
        self._width = 0

    # ---- counting -----------------------------------------------------------------------
    def update(self, docs: int = 1, nbytes: int = 0) -> None:
        """Add `docs` documents and `nbytes` bytes; reports when one is due."""
        self.docs += docs
        self.nbytes += nbytes
        self._calls += 1
        if self._calls >= self._next_check:
            self._check()

    def wrap(self, items: Iterable[T]) -> Iterator[T]:
        """Yield `items`, counting one document each (bytes: len of bytes, UTF-8 len of str)."""
        for x in items:
            n = len(x) if isinstance(x, bytes | bytearray) else len(x.encode("utf-8")) if isinstance(x, str) else 0
            self.update(1, n)
            yield x

    def _check(self) -> None:
        now = time.monotonic()
        dt = now - self._last_check
        # adapt the stride so that the clock is read ~CLOCK_READS_PER_S times a second; it
        # at most doubles per read, so one burst of fast calls cannot make it skip a slow phase
        if dt > 0:
            rate = self._stride / dt
            self._stride = max(1, min(int(rate / CLOCK_READS_PER_S), 2 * self._stride, 1 << 20))
        self._last_check = now
        self._next_check = self._calls + self._stride
        if self.active and now >= self._due:
            self._emit(self.line(now))
            self._due = now + self.every

    # ---- reporting ----------------------------------------------------------------------
    def fields(self, now: float | None = None) -> dict:
        """Counts, rates, percent and ETA (None when the totals are unknown) at `now`."""
        now = time.monotonic() if now is None else now
        el = max(now - self.t0, 1e-9)
        out = {"stage": self.stage, "docs": self.docs, "mb": self.nbytes / 1e6, "seconds": el,
               "docs_per_s": self.docs / el, "mb_per_s": self.nbytes / 1e6 / el, "percent": None, "eta_s": None}
        done = total = None
        if self.total_bytes:
            done, total = self.nbytes, self.total_bytes
        elif self.total_docs:
            done, total = self.docs, self.total_docs
        if total:
            frac = min(done / total, 1.0)
            out["percent"] = 100.0 * frac
            if done > 0:
                out["eta_s"] = el * (1 - frac) / frac
        return out

    def line(self, now: float | None = None) -> str:
        f = self.fields(now)
        docs = f"{f['docs']:,}" + (f"/{self.total_docs:,}" if self.total_docs else "") + " docs"
        parts = [f"{self.stage}: {docs}", f"{f['mb']:,.1f} MB", f"{f['docs_per_s']:,.1f} docs/s",
                 f"{f['mb_per_s']:,.2f} MB/s"]
        if f["percent"] is not None:
            parts.append(f"{f['percent']:.1f}%")
            parts.append("ETA " + (_hms(f["eta_s"]) if f["eta_s"] is not None else "?"))
        return ", ".join(parts)

    def summary(self) -> str:
        f = self.fields()
        return (f"{self.stage}: done, {f['docs']:,} docs, {f['mb']:,.1f} MB in {f['seconds']:.1f} s "
                f"({f['docs_per_s']:,.1f} docs/s, {f['mb_per_s']:,.2f} MB/s)")

    def _emit(self, text: str) -> None:
        self.lines += 1
        if self.tty:
            pad = max(self._width - len(text), 0)
            self._width = len(text)
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
        else:
            self.logger.info("%s", text)

    def close(self, ok: bool = True) -> None:
        """Final report: the last redraw and a newline on a terminal, a summary line in logs.
        After a failure (`ok=False`) a terminal line is only ended, so the one-line error that
        follows starts on its own line and no `done` is claimed."""
        if self._closed:
            return
        self._closed = True
        if not self.active:
            return
        if ok:
            self._emit(self.summary())
        if self.tty and (ok or self.lines):
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(ok=exc_type is None)


__all__ = ["Progress", "enable_logging"]
