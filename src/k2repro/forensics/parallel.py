"""The whole-series robust-z passes of the signals besides the primary one, computed in a
forked child while the parent works on the primary signal.

Each pass is a handful of sliding order statistics over every logged point (SciPy's rank
filter, which holds the GIL, so threads cannot share the work): on a million-step log the
three signals forensics scans whole (loss, loss_max, grad_norm) cost about a second one after
the other. With `workers=2` the parent forks once, right after reading the steps; the child
writes the other signals' (z, scale, pred) into anonymous shared memory and exits, and the
parent picks them up when it needs them. The child touches no DuckDB connection, no file and
no logging, and leaves with `os._exit`. Where fork is missing (not POSIX) or fails, or the
child fails, the parent computes the same values itself: the result never depends on the
route.
"""

from __future__ import annotations

import logging
import mmap
import os
from typing import Any

import numpy as np

from k2repro.core.spike import RobustZ
from k2repro.forensics.detect import robust_z_parts

logger = logging.getLogger(__name__)

#: below this many points a fork costs more than it saves
MIN_POINTS = 200_000

Parts = tuple[np.ndarray, np.ndarray, np.ndarray]


class Precomputed:
    """robust_z_parts of some signals, maybe still being computed by a child process."""

    def __init__(self, series: dict[str, np.ndarray], steps: np.ndarray, rule: RobustZ, workers: int) -> None:
        self.series, self.steps, self.rule = series, steps, rule
        self.names = list(series)
        self._parts: dict[str, Parts] = {}
        self._pid: int | None = None
        self._buf: np.ndarray | None = None
        n = int(steps.size)
        if workers < 2 or not self.names or n < MIN_POINTS or not hasattr(os, "fork"):
            return
        import scipy.ndimage  # noqa: F401 - imported before the fork, never inside the child

        mm = mmap.mmap(-1, len(self.names) * 3 * n * 8)  # MAP_SHARED | MAP_ANONYMOUS
        self._buf = np.frombuffer(mm, dtype=np.float64).reshape(len(self.names), 3, n)
        try:
            pid = os.fork()
        except OSError as exc:
            logger.debug("forensics: no fork (%s); computing in this process", exc)
            self._buf = None
            return
        if pid == 0:  # the child: compute, write, leave without running any exit handler
            code = 0
            try:
                for i, name in enumerate(self.names):
                    for j, arr in enumerate(robust_z_parts(self.series[name], rule, steps)):
                        self._buf[i, j] = arr
            except BaseException:  # noqa: BLE001 - any failure: the parent computes instead
                code = 1
            os._exit(code)
        self._pid = pid

    def _join(self) -> None:
        if self._pid is None:
            return
        try:  # (a Ctrl-C here leaves _pid set, so close() still reaps the child)
            _, status = os.waitpid(self._pid, 0)
            ok = os.waitstatus_to_exitcode(status) == 0
        except ChildProcessError:
            ok = False
        self._pid = None
        if ok and self._buf is not None:
            for i, name in enumerate(self.names):
                self._parts[name] = tuple(np.array(self._buf[i, j]) for j in range(3))
        self._buf = None

    def get(self, name: str) -> Parts:
        """(z, scale, pred) of signal `name` (waits for the child the first time)."""
        self._join()
        if name not in self._parts:
            self._parts[name] = robust_z_parts(self.series[name], self.rule, self.steps)
        return self._parts[name]

    def close(self) -> None:
        """Reap the child if nobody asked for its results (an error on the way)."""
        self._join()


def precompute(series: dict[str, Any], steps: np.ndarray, rule: RobustZ, workers: int) -> Precomputed:
    """Start the whole-series robust-z passes of `series` (name -> values)."""
    return Precomputed({k: np.asarray(v, dtype=np.float64) for k, v in series.items()}, steps, rule, workers)


__all__ = ["MIN_POINTS", "Precomputed", "precompute"]
