"""One training process from start to exit code: the launch environment, signals, the
trainer's lifetime, how each kind of failure ends the run and what the user sees.

Exit codes (docs/architecture.md): 0 done, 1 the machine or a bug (OSError: one scrubbed line;
a bug: a scrubbed traceback), 2 bad input, 3 the spike guard aborted, 128+N stopped by signal N
after a checkpoint. Every rank leaves its code in the launcher's exit file.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from k2repro.config.load import load_config, load_params_file
from k2repro.config.schema import RunConfig
from k2repro.core.ids import new_run_id
from k2repro.distributed.init import DistInfo, barrier, broadcast_object, init_distributed, teardown
from k2repro.errors import GuardAbort, K2ReproError
from k2repro.logs import configure
from k2repro.train.launchenv import LaunchEnv
from k2repro.train.progress import PROG, TrainProgress
from k2repro.train.trainer import STOP, Trainer

logger = logging.getLogger(__name__)


class Terminated(Exception):
    """SIGTERM from the launcher (torchrun stops the other ranks when one fails)."""


def _signal_handler(launch: LaunchEnv):  # noqa: ANN202 - a signal handler
    def on_signal(signum: int, frame) -> None:  # noqa: ANN001
        """Ctrl-C or a preemption: note it; the loop stops at a step all ranks agree on,
        flushes and checkpoints. `k2repro train` creates the stop file before it forwards a
        signal, so a SIGTERM without it is torchrun stopping the survivors of a failed rank:
        stop at once."""
        if signum == signal.SIGTERM and launch.stop_file and not os.path.exists(launch.stop_file):
            raise Terminated("terminated by SIGTERM (the launcher stops every rank when one fails)")
        if not STOP.signum:
            STOP.signum = int(signum)

    return on_signal


def run_training(cfg: RunConfig, run_id: str | None = None,
                 launch: LaunchEnv | None = None) -> tuple[int, str, list[dict]]:
    """Train in this process (one rank of a torchrun launch, or world size 1).
    Returns (exit code, run id, step rows seen on this rank)."""
    launch = launch or LaunchEnv.from_environ()
    info = init_distributed(cfg.parallel.backend)
    if threading.current_thread() is threading.main_thread():
        STOP.signum = 0
        handler = _signal_handler(launch)
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
    rid = broadcast_object(run_id or launch.run_id or new_run_id(cfg.run.name), info)
    trainer: Trainer | None = None
    announced = False  # run_id= printed (stdout: what scripts read)
    try:
        trainer = Trainer(cfg, info, rid, progress=TrainProgress(info.is_main), launch=launch)
        if cfg.train.resume:
            trainer.resume(cfg.train.resume)
        trainer.start_audit()
        if info.is_main:  # once the run is recorded: an error before it names no run
            print(f"run_id={rid}", flush=True)
            announced = True
        history = trainer.fit()
        return _finish(trainer, info, launch), trainer.run_id, history
    except GuardAbort as exc:
        _end_failed(trainer, f"GuardAbort: {exc}")
        _say(info, f"spike guard aborted: {exc}")
        return exc.exit_code, rid, []
    except K2ReproError as exc:
        _end_failed(trainer, f"{type(exc).__name__}: {exc}")
        _say(info, f"error: {exc}")
        return exc.exit_code, rid, []
    except Exception as exc:  # noqa: BLE001 - every failure ends the run and gets an exit code
        return _failed(exc, trainer, info, rid, announced), rid, []
    finally:
        if trainer is not None:
            trainer.progress.close()
        teardown()


def _finish(trainer: Trainer, info: DistInfo, launch: LaunchEnv) -> int:
    """The loop ended (all steps, or a stop the ranks agreed on): end the run and say how."""
    trainer.progress.close()
    barrier(info)
    if trainer.sink is not None:
        costs = trainer.costs
        if costs.per_step and costs.writer_mark_a is not None and trainer.rollbacks == 0:
            trainer.sink.flush(wait=True)  # the last step's rows written: the end of the steady rate
            costs.writer_mark_b = (max(costs.step_wall_s, default=0), trainer.sink.writer_cpu_s)
        trainer.sink.close("interrupted" if trainer.interrupted else "completed")
        costs.add_sink(trainer.sink)
    if trainer.interrupted:
        name = signal.Signals(trainer.interrupted).name
        _say(info, f"interrupted by {name} at step {trainer.saved_step}/{trainer.cfg.train.max_steps}; "
                   f"checkpoint saved; continue with: k2repro train train.resume={trainer.run_id} "
                   "(and the same overrides)")
        return 128 + trainer.interrupted
    if launch.timings_file:
        _write_timings(trainer, info, launch.timings_file)
    return 0


def _write_timings(trainer: Trainer, info: DistInfo, path: str) -> None:
    """Benchmarks (bench/audit_overhead.py): rank 0's step wall times, and every rank's own
    costs by clock (train/costs.py)."""
    if info.is_main:
        Path(path).write_text(json.dumps([[r["step"], r["step_time_s"]] for r in trainer.history]))
    Path(f"{path}.r{info.rank}.json").write_text(json.dumps(trainer.costs.summary(info.rank)))


def _say(info: DistInfo, msg: str) -> None:
    """One line on stderr from rank 0: every rank reaches the same decision, one says it."""
    if info.is_main:
        print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def _failed(exc: Exception, trainer: Trainer | None, info: DistInfo, rid: str, announced: bool) -> int:
    """An OSError (the machine, not the code: a full disk, also under the audit writer; a
    folder that cannot be made) is one line on the rank that met it; anything else is a bug,
    whose traceback is worth having. Both scrubbed like everything k2repro writes."""
    from k2repro.audit.redact import scrub_text

    if isinstance(exc, OSError) or isinstance(exc.__cause__, OSError):
        msg = scrub_text(f"{type(exc).__name__}: {exc}")
        _end_failed(trainer, msg)
        _announce_failed(trainer, rid, announced)
        where = f" (rank {info.rank})" if info.world_size > 1 else ""
        print(f"{PROG}: error{where}: {msg}", file=sys.stderr, flush=True)
        return 1
    tb = scrub_text(traceback.format_exc())
    _end_failed(trainer, tb)
    _announce_failed(trainer, rid, announced)
    print(tb, file=sys.stderr, end="", flush=True)
    return 1


def _end_failed(trainer: Trainer | None, error: str) -> None:
    """End the run as failed, if the sink got far enough to record it (best effort: on a full
    disk the end marker may not fit either, and the run then reads as crashed)."""
    if trainer is not None and trainer.sink is not None:
        try:
            trainer.sink.close("failed", error=error)
        except Exception as exc:  # noqa: BLE001 - already failing: the first error is the one to report
            # (close() re-raises the writer's own error after writing the end marker)
            logger.debug("ending run %s as failed: %r", trainer.run_id, exc)


def _announce_failed(trainer: Trainer | None, rid: str, announced: bool) -> None:
    """`run_id=` on stdout for a run that failed after its identity reached the store but
    before it was announced (a disk that fills while the run is being recorded)."""
    if not announced and trainer is not None and trainer.sink is not None and trainer.info.is_main \
            and trainer.sink.recorded:
        print(f"run_id={rid}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m k2repro.train` (what `torchrun` launches)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    configure(PROG)
    launch = LaunchEnv.from_environ()
    config_name = launch.config_name
    if argv and argv[0] == "--config-name":
        config_name, argv = argv[1], argv[2:]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = (load_params_file(launch.params_file, argv, world) if launch.params_file
               else load_config(argv, config_name, world_size=world))
    except K2ReproError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        launch.write_exit_code(exc.exit_code, rank)
        return exc.exit_code
    code, _, _ = run_training(cfg, launch=launch)
    launch.write_exit_code(code, rank)
    return code


__all__ = ["run_training", "main", "Terminated"]
