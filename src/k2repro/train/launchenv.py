"""What a launcher tells the processes it starts, as one typed object.

`k2repro train` (through torchrun) and `k2repro replay` start training processes that must
know things the config does not hold: the run id every rank writes under, where to leave the
exit code, whether a SIGTERM was the user's. They travel as environment variables (the only
channel torchrun passes through unchanged); this module is the one place that names them, so a
reader finds every one here and the trainer reads them once, at start, not ad hoc.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

#: field -> environment variable. `audit/facts.py` records every K2REPRO_* variable in `env`
#: (redacted) and `tools/diff.py` ignores these per-launch ones.
VARS: dict[str, str] = {
    "run_id": "K2REPRO_RUN_ID",
    "config_name": "K2REPRO_CONFIG_NAME",
    "params_file": "K2REPRO_PARAMS_FILE",
    "exit_file": "K2REPRO_EXIT_FILE",
    "stop_file": "K2REPRO_STOP_FILE",
    "source": "K2REPRO_SOURCE",
    "parent_run_id": "K2REPRO_PARENT_RUN_ID",
    "timings_file": "K2REPRO_TIMINGS_FILE",
}


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """One training launch as its parent described it (all optional: a plain
    `python -m k2repro.train` has none of them)."""

    run_id: str | None = None  # the id the launcher chose, so every rank writes one run
    config_name: str = "config"  # `--config-name` for the ranks' own composition
    params_file: str | None = None  # `--params FILE`: load this composed YAML instead of conf/
    exit_file: str | None = None  # each rank leaves its exit code in `<exit_file>.<rank>`
    stop_file: str | None = None  # exists once the user asked to stop (a SIGTERM without it is
    #                               torchrun stopping the survivors of a failed rank)
    source: str = "train"  # `runs.source` (`replay` for a replay)
    parent_run_id: str | None = None  # `runs.parent_run_id` of a replay
    timings_file: str | None = None  # benchmarks: step wall times and every rank's audit costs

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> LaunchEnv:
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(**{f: env.get(var) or getattr(defaults, f) for f, var in VARS.items()})

    def to_environ(self) -> dict[str, str]:
        """The variables to add to a child's environment (only those set)."""
        return {VARS[f]: str(v) for f, v in dataclasses.asdict(self).items()
                if v is not None and v != getattr(LaunchEnv(), f)}

    def write_exit_code(self, code: int, rank: int) -> None:
        """Leave this rank's exit code where the launcher looks (best effort: the launcher
        falls back to torchrun's own status)."""
        if self.exit_file:
            try:
                with open(f"{self.exit_file}.{rank}", "w") as fh:
                    fh.write(str(code))
            except OSError:
                pass


#: variables a child must not inherit from its parent's launch (a replay is a new launch)
PER_LAUNCH = ("K2REPRO_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK")

__all__ = ["LaunchEnv", "VARS", "PER_LAUNCH"]
