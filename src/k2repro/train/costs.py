"""What one rank spent on what, by the clocks that machine noise moves least.

`bench/audit_overhead.py` needs the audit's own cost per step, per rank: the writer and
heartbeat threads' CPU time (thread clocks), the loop's time in `flush()`, and the step's own
CPU time with and without the audit's statistics. Wall-clock step times on a shared 2-core
machine swing by +-10% from run to run; thread CPU clocks do not count the time a thread waits
for a core, so they resolve a 1% goal. Written to `$K2REPRO_TIMINGS_FILE.r<rank>.json` when
the launch asks (train/run.py).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

#: the first steps (allocator warm-up, lazy inits, the first flushes) are left out of medians
WARMUP_STEPS = 10


@dataclasses.dataclass
class Costs:
    """Totals always (a few floats); per-step times only when `per_step` (a benchmark asked
    through `$K2REPRO_TIMINGS_FILE`): a million-step run keeps no million-entry dicts."""

    per_step: bool = False
    step_wall_s: dict[int, float] = dataclasses.field(default_factory=dict)  # step -> wall, flush included
    step_cpu_s: dict[int, float] = dataclasses.field(default_factory=dict)  # step -> loop-thread CPU in train_step
    flush_wall_s: float = 0.0  # the loop thread's wall time in flush()
    flush_cpu_s: float = 0.0  # ... and its CPU time there
    flushes: int = 0
    writer_cpu_s: float = 0.0  # the writer threads' CPU (every sink of this launch: a rollback closes one)
    heartbeat_cpu_s: float = 0.0
    #: the loop thread's CPU in the step's audit-only work (sample records, max |grad| and the
    #: parameter/update norms on layer-statistics steps), timed where it happens: the difference
    #: of two runs' step CPU cannot resolve it (gloo's waits move it by +-2 ms a step)
    audit_step_cpu_s: float = 0.0
    #: (step, writer CPU s) once the writer has drained the first flush after WARMUP_STEPS, and
    #: again before close: their difference is the writer's steady cost per step, apart from
    #: what a launch pays once (imports, the identity tables, the first writes, the end marker)
    writer_mark_a: tuple[int, float] | None = None
    writer_mark_b: tuple[int, float] | None = None

    def step(self, step: int, wall_s: float, cpu_s: float) -> None:
        if self.per_step:
            self.step_wall_s[step] = wall_s
            self.step_cpu_s[step] = cpu_s

    def add_sink(self, sink: Any) -> None:
        self.writer_cpu_s += sink.writer_cpu_s
        self.heartbeat_cpu_s += sink.heartbeat_cpu_s

    def summary(self, rank: int) -> dict[str, Any]:
        """Per-step figures in ms (medians over steps after WARMUP_STEPS; totals / steps)."""
        kept = [s for s in self.step_wall_s if s > WARMUP_STEPS] or list(self.step_wall_s)
        n = max(1, len(self.step_wall_s))

        def med(d: dict[int, float]) -> float | None:
            vals = [d[s] for s in kept if s in d]
            return statistics.median(vals) * 1e3 if vals else None

        return {"rank": rank, "steps": len(self.step_wall_s), "flushes": self.flushes,
                "step_wall_ms": med(self.step_wall_s), "step_cpu_ms": med(self.step_cpu_s),
                "flush_wall_ms": self.flush_wall_s / n * 1e3, "flush_cpu_ms": self.flush_cpu_s / n * 1e3,
                "writer_cpu_ms": self.writer_cpu_s / n * 1e3, "heartbeat_cpu_ms": self.heartbeat_cpu_s / n * 1e3,
                "audit_step_cpu_ms": self.audit_step_cpu_s / n * 1e3,
                **self._writer_steady(n),
                # the totals the old bench read, kept for its readers
                "flush_s": self.flush_wall_s, "writer_cpu_s": self.writer_cpu_s}


    def _writer_steady(self, n: int) -> dict[str, float | None]:
        """The writer's CPU per step between the two marks, and what the launch paid beyond
        that rate (ms per launch). None without both marks (a rollback, a run too short)."""
        a, b = self.writer_mark_a, self.writer_mark_b
        if a is None or b is None or b[0] <= a[0]:
            return {"writer_steady_cpu_ms": None, "writer_launch_cpu_ms": None}
        rate = (b[1] - a[1]) / (b[0] - a[0])
        return {"writer_steady_cpu_ms": rate * 1e3, "writer_launch_cpu_ms": (self.writer_cpu_s - rate * n) * 1e3}


__all__ = ["Costs", "WARMUP_STEPS"]
