"""What `k2repro train` shows while it works: phases, then steps.

A 2-rank launch spends ~10 s in torchrun, imports, data checks and model build before the
first step; without phases that looks like a hang. The launcher says it is launching; rank 0
names each phase (loading data, building model, resuming) and then counts steps. On a
terminal (with `rich`) a live bar counts steps on stderr and the step lines print above it;
elsewhere (pipes, CI logs, DVC stages) phases are plain `k2repro train: ...` lines on stderr
and step lines stay on stdout, where scripts read them (k2repro/progress.py does the drawing).
"""

from __future__ import annotations

import sys

from k2repro.progress import Progress

PROG = "k2repro train"


def phase(msg: str) -> None:
    """One plain phase line from a process that draws no bar (the launcher)."""
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


class TrainProgress:
    """Rank 0's phases and step counter; other ranks get a silent one (`enabled=False`)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._p = Progress(PROG) if enabled else None

    def __call__(self, msg: str) -> None:
        if self._p is not None:
            self._p.phase(msg)

    def warn(self, msg: str) -> None:
        """A warning line on stderr, whether or not this rank draws phases (the caller picks
        the rank)."""
        if self._p is not None and self._p.fancy:
            self._p.note(f"{PROG}: warning: {msg}")
        else:
            print(f"{PROG}: warning: {msg}", file=sys.stderr, flush=True)

    def steps(self, first: int, last: int) -> None:
        """Training begins: the bar (on a terminal) counts from `first` to `last`."""
        if self._p is not None:
            self._p.phase(f"training steps {first + 1}..{last}")
            self._p.total(last - first)

    def step_line(self, line: str, advanced: int) -> None:
        """A flush's step line: stdout for scripts, or above the live bar on a terminal."""
        if self._p is None:
            return
        self._p.advance(advanced)
        if self._p.fancy:
            self._p.note(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._p is not None:
            self._p.close()


__all__ = ["TrainProgress", "phase"]
