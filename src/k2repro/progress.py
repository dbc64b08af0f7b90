"""Phases and progress of long commands (`train`, `eval`, `forensics`) on stderr.

A terminal utility with no k2repro dependency, so any layer can report progress through it
(docs/architecture.md, "Layers": core).

stdout stays for results (`--json` prints one object there), so progress never mixes with
them. On a terminal, with `rich` installed, a live spinner shows the current phase, a bar
counts the units of work (checkpoints) and both clear when done; elsewhere (pipes, CI logs,
DVC stages) each phase is one plain line, which logs keep and tests can read.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    """`progress("phase text")` announces a phase (prefixed with `prog` when given); `total(n)` and `advance()` count units of
    work. Callable, so it fits every `progress: Callable[[str], None]` parameter."""

    def __init__(self, prog: str = "", stream: TextIO | None = None, fancy: bool | None = None) -> None:
        self.prog = prog
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.perf_counter()
        self._bar: Any = None
        self._task: Any = None
        use_rich = _isatty(self.stream) if fancy is None else fancy
        if use_rich:
            try:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    SpinnerColumn,
                    TextColumn,
                    TimeElapsedColumn,
                )
                from rich.progress import Progress as Live
            except ImportError:  # rich is optional: plain lines then
                return
            console = Console(file=self.stream, force_terminal=True if fancy else None)
            self._bar = Live(
                SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), console=console, transient=True)
            self._task = self._bar.add_task(prog or "working", total=None)
            self._bar.start()

    @property
    def fancy(self) -> bool:
        return self._bar is not None

    def __call__(self, msg: str) -> None:
        self.phase(msg)

    def phase(self, msg: str) -> None:
        text = f"{self.prog}: {msg}" if self.prog else msg
        if self._bar is not None:
            self._bar.update(self._task, description=text)
            return
        print(text, file=self.stream, flush=True)

    def note(self, msg: str) -> None:
        """A line that stays (a result per unit of work), above the live bar on a terminal."""
        if self._bar is not None:
            self._bar.console.print(msg, markup=False, highlight=False)
            return
        print(msg, file=self.stream, flush=True)

    def total(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, total=n, completed=0)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def close(self, msg: str | None = None) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if msg:
            text = f"{self.prog}: {msg}" if self.prog else msg
            print(f"{text} [{time.perf_counter() - self.t0:.1f}s]", file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


__all__ = ["Progress"]
