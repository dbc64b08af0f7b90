"""The data stages' engine: datatrove pipelines on its Local or Ray executor.

Every stage is a list of datatrove `PipelineStep`s that `run_pipeline` hands to
`LocalPipelineExecutor` (`data.executor=local`) or `RayPipelineExecutor` (`ray`, on an existing
cluster at `data.ray_address`). Sharding and parallelism are separate knobs:

- `data.tasks` fixes how the work is cut (task `r` of `T` reads shards `r, r+T, ...` and writes
  its own output shard), so it fixes every output byte;
- `data.workers` is how many tasks run at once (processes, or Ray actors); it changes only
  the wall time.

Outputs are byte-deterministic: shard files are named by shard index, gzip members carry no
name and mtime 0, JSON has sorted keys, and nothing in an output names a host, a time or an
absolute path. How a stage ran (executor, workers) is kept apart in `execution.json`, the one
file of an output folder that may differ between two runs of equal `data.tasks`.

datatrove logs with loguru to stderr by default (a banner per task, timings at INFO); here its
records go to the `k2repro.data.datatrove` logger (`K2REPRO_LOG_LEVEL=DEBUG` shows them) and to
its per-task log files in a scratch folder that is removed with the stage.

Bad input raised inside a task (`BadInputError`, `ConfigError`) is written by the step to the
scratch folder before the task fails, and re-raised here with its one-line message: Ray
swallows task errors into a warning, and a process pool would only show a traceback.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import io
import json
import logging
import os
import shutil
import tempfile
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from k2repro.errors import BadInputError, ConfigError

log = logging.getLogger(__name__)
_DT_LOG = logging.getLogger("k2repro.data.datatrove")
EXECUTORS = ("local", "ray")
EXECUTION = "execution.json"
ERRORS_DIR = "errors"
GZIP_LEVEL = 3  # fast; the outputs are intermediate, and level 6 triples the time for ~10 %
# Worker processes come from a fork server (datatrove's default), never from a plain fork of
# the command: rensa and HF tokenizers run Rust thread pools, and a process forked after they
# ran deadlocks in them (a library caller that deduplicated in-process, then ran a stage with
# workers > 1, hung). The server preloads the stage modules once, so each worker starts with
# them imported instead of importing datatrove and k2repro again (~1 s each).
START_METHOD = "forkserver"
RAYON_THREADS_ENV = "RAYON_NUM_THREADS"
PRELOAD = ["k2repro.data.engine", "k2repro.data.prepare", "k2repro.data.dedup", "k2repro.data.pack",
           "k2repro.data.tokenizer", "k2repro.data.readers", "numpy"]


@dataclass(frozen=True)
class Engine:
    """How the stages run: `tasks` fixes the output, `workers` only the wall time."""

    executor: str = "local"
    tasks: int = 1
    workers: int = 1
    ray_address: str = ""

    def checked(self) -> Engine:
        if self.executor not in EXECUTORS:
            raise ConfigError(f"config key 'data.executor': must be one of {', '.join(EXECUTORS)} (got {self.executor!r})")
        if self.tasks < 1:
            raise ConfigError(f"config key 'data.tasks': must be >= 1 (got {self.tasks})")
        if self.workers < 1:
            raise ConfigError(f"config key 'data.workers': must be >= 1 (got {self.workers})")
        if self.executor == "ray" and not self.ray_address:
            raise ConfigError("config key 'data.ray_address': data.executor=ray needs the address of a running "
                              "Ray cluster (e.g. 127.0.0.1:6379; `ray start --head` prints it)")
        return self

    def redraw(self) -> bool:
        """Whether a task may redraw a progress line: only when tasks run one at a time here."""
        return self.executor == "local" and self.workers == 1

    def execution(self, stage: str) -> dict:
        """What `execution.json` records (not the cluster address: it names a machine)."""
        return {"stage": stage, "executor": self.executor, "tasks": self.tasks, "workers": self.workers,
                "datatrove": datatrove_version()}


def engine_from_config(d: Any) -> Engine:  # noqa: ANN401 - the composed DataConfig
    return Engine(str(getattr(d, "executor", "local")), int(getattr(d, "tasks", 1)),
                  int(getattr(d, "workers", 1)), str(getattr(d, "ray_address", "") or "")).checked()


def datatrove_version() -> str:
    return version("datatrove")


# --- logging: datatrove's loguru records -> the standard `logging` tree ---------------------------

_LEVELS = {"WARNING": logging.WARNING}


# Said on every Ray run with our scratch folder; docs/data.md says it must be shared storage.
_KNOWN = ("Logging directory points to a local filesystem",)


def _to_logging(message: Any) -> None:  # noqa: ANN401 - a loguru Message
    rec = message.record
    # datatrove logs the exception of a failed task at ERROR with a traceback; the stage re-raises
    # it as one line, so here it stays at DEBUG like the rest of datatrove's chatter.
    level = _LEVELS.get(rec["level"].name, logging.DEBUG)
    if rec["message"].startswith(_KNOWN):
        level = logging.DEBUG
    _DT_LOG.log(level, "%s", rec["message"])


def _default_logger() -> None:
    from loguru import logger

    logger.remove()
    logger.add(_to_logging, level="DEBUG", format="{message}", catch=True)


def _task_logger(logging_dir: Any, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:  # noqa: ANN401, ARG001
    """datatrove's `add_task_logger` without its stderr sink: the task's log file plus `logging`."""
    from loguru import logger

    logger.remove()
    logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
    logger.add(logfile, level="DEBUG", format="{time:HH:mm:ss} | {level: <8} | {name}:{line} - {message}")
    logger.add(_to_logging, level="DEBUG", format="{message}", catch=True)
    return logfile


def quiet_datatrove() -> None:
    """Route datatrove's loguru output through `logging` in this process (idempotent). Called
    by the driver and again inside every task: forkserver and Ray workers import fresh."""
    import datatrove.executor.base as base
    import datatrove.utils.logging as dtlog

    dtlog.setup_default_logger = _default_logger
    base.add_task_logger = _task_logger
    with contextlib.suppress(ImportError):  # ray is optional
        import datatrove.executor.ray as dtray

        dtray.add_task_logger = _task_logger
    _default_logger()


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def thread_share(workers: int, cpus: int | None = None) -> int:
    """Threads each of `workers` side-by-side worker processes may use: their share of the CPUs."""
    return max(1, (cpus or cpu_count()) // max(1, workers))


def set_thread_share(threads: int) -> None:
    """Cap the Rust thread pools of this process (HF tokenizers' and rensa's rayon pools read
    RAYON_NUM_THREADS when they first start) at `threads`. Without it every worker process
    starts a pool of one thread per CPU, so N workers on N CPUs run N x N threads; with HF
    tokenizers' own switch (TOKENIZERS_PARALLELISM=false) instead, a worker on a machine with
    more CPUs than workers would encode on one thread. A value the user set wins. Must run
    before the first parallel call of the process: the forkserver's workers start fresh."""
    os.environ.setdefault(RAYON_THREADS_ENV, str(threads))


def _executor_classes() -> tuple[type, type]:
    """Local and Ray executors that quieten datatrove's logging inside each task first."""
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.executor.ray import RayPipelineExecutor

    class _Local(LocalPipelineExecutor):
        threads = 0  # > 0: each task's process caps its Rust thread pools at this many threads

        def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:  # noqa: ANN401
            quiet_datatrove()
            if self.threads:
                set_thread_share(self.threads)
            return super()._run_for_rank(rank, local_rank, node_rank)

    class _Ray(RayPipelineExecutor):
        def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:  # noqa: ANN401
            quiet_datatrove()
            return super()._run_for_rank(rank, local_rank, node_rank)

    return _Local, _Ray


# --- steps ------------------------------------------------------------------------------------------

def _step_base() -> type:
    from datatrove.pipeline.base import PipelineStep

    return PipelineStep


class Step(_step_base()):  # type: ignore[misc]
    """A datatrove step of ours: `work(rank, world_size)` does the task's share. Bad input is
    written to `<scratch>/errors/<rank>.json` before the task fails, so the driver can re-raise
    it as one line whatever the executor did with the exception."""

    type = "k2repro"
    name = "step"

    def __init__(self, scratch: str) -> None:
        super().__init__()
        self.scratch = scratch

    @abstractmethod
    def work(self, rank: int, world_size: int) -> None:
        """Task `rank` of `world_size`: its share of the stage (each subclass says which)."""

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator:  # noqa: ANN401
        if data:
            yield from data
        try:
            with self.track_time("task"):
                self.work(rank, world_size)
        except (BadInputError, ConfigError) as exc:
            p = Path(self.scratch) / ERRORS_DIR / f"{rank:05d}.json"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps({"type": type(exc).__name__, "message": str(exc)}), encoding="utf-8")
            raise


class CallStep(Step):
    """One task that calls `fn(*args, engine)` (a module-level function, so it pickles by
    name) and keeps its JSON result: for work that is one process by nature (BPE training)."""

    name = "one task"

    def __init__(self, scratch: str, fn: Callable, args: tuple, engine: Engine) -> None:
        super().__init__(scratch)
        self.fn, self.args, self.engine = fn, args, engine
        self.name = f"{fn.__module__}.{fn.__name__}"

    def work(self, rank: int, world_size: int) -> None:  # noqa: ARG002
        result = self.fn(*self.args, self.engine)
        (Path(self.scratch) / "result.json").write_text(json.dumps(result), encoding="utf-8")


def run_one_task(fn: Callable, engine: Engine | None, near: Path, *args: Any) -> Any:  # noqa: ANN401
    """Run `fn(*args, engine)` as a single datatrove task on the configured executor (scratch
    folder next to `near`); returns its JSON result."""
    engine = (engine or Engine()).checked()
    with scratch_dir(near) as sc:
        run_pipeline([CallStep(str(sc), fn, args, engine)], engine, 1, sc)
        return json.loads((sc / "result.json").read_text(encoding="utf-8"))


def task_progress(stage: str, rank: int, world_size: int, total_docs: int | None, redraw: bool) -> Any:  # noqa: ANN401
    """A task's `Progress` (documents/s, MB/s, ETA); named by task when there are several."""
    from k2repro.data.progress import Progress

    name = stage if world_size == 1 else f"{stage} task {rank}/{world_size}"
    return Progress(name, total_docs=total_docs, redraw=redraw)


def _raise_task_error(scratch: Path) -> None:
    errs = sorted((scratch / ERRORS_DIR).glob("*.json")) if (scratch / ERRORS_DIR).is_dir() else []
    if errs:
        e = json.loads(errs[0].read_text(encoding="utf-8"))
        raise (ConfigError if e["type"] == "ConfigError" else BadInputError)(e["message"])


def _ray_init(address: str) -> None:
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config key 'data.ray_address': cannot connect to a Ray cluster at {address} ({msg})") from None


def run_pipeline(steps: list, engine: Engine, tasks: int, scratch: Path) -> None:
    """Run `steps` as `tasks` datatrove tasks on the configured executor, `engine.workers` at a
    time; raise the first task's bad input (lowest rank) as one line."""
    quiet_datatrove()
    local_cls, ray_cls = _executor_classes()
    logs = scratch / "datatrove" / f"{len(list((scratch / 'datatrove').glob('*'))) if (scratch / 'datatrove').exists() else 0}"
    workers = max(1, min(engine.workers, tasks))
    if engine.executor == "ray":
        _ray_init(engine.ray_address)
        ex = ray_cls(steps, tasks=tasks, workers=workers, logging_dir=str(logs), skip_completed=False,
                     mem_per_cpu_gb=0.25)
    else:
        if workers > 1:
            import multiprocess

            multiprocess.get_context(START_METHOD).set_forkserver_preload(PRELOAD)
        ex = local_cls(steps, tasks=tasks, workers=workers, logging_dir=str(logs), skip_completed=False,
                       start_method=START_METHOD)
        if workers > 1:  # side-by-side workers share the CPUs; one worker (this process) has them all
            ex.threads = thread_share(workers)
    failed: BaseException | None = None
    try:
        if engine.executor == "local" and workers == 1:
            # datatrove's own sequential path (a fresh copy of the steps per task, then its
            # `_run_for_rank`), without the multiprocess Manager process `run()` starts even
            # for one worker: ~0.3 s per pipeline, three pipelines in dedup.
            for rank in range(tasks):
                ex.pipeline = copy.deepcopy(steps)
                ex._run_for_rank(rank)
        else:
            ex.run()
    except Exception as exc:  # noqa: BLE001 - a task failed; its bad input is in the scratch folder
        failed = exc
    finally:
        quiet_datatrove()  # datatrove's close_task_logger re-adds its default sink in this process
    _raise_task_error(scratch)
    if failed is not None:
        raise failed
    done = {p.name for p in (logs / "completions").glob("*")} if (logs / "completions").exists() else set()
    missing = [r for r in range(tasks) if f"{r:05d}" not in done]
    if missing:
        raise RuntimeError(f"data engine: tasks {missing[:5]} of {tasks} did not complete (logs in {logs})")


@contextlib.contextmanager
def scratch_dir(out: Path) -> Iterator[Path]:
    """A temporary work folder next to `out` (on the same, shared filesystem as the output, so
    Ray workers on other machines see it), removed afterwards whatever happened."""
    out.parent.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def write_execution(out: Path, engine: Engine, stage: str, upstream: Iterable[Path] = ()) -> None:
    """`execution.json`: this stage's engine facts, plus those of the stages before it."""
    chain: list[dict] = []
    for u in upstream:
        p = u / EXECUTION
        if p.exists():
            chain += json.loads(p.read_text(encoding="utf-8")).get("stages", [])
    by_stage = {c["stage"]: c for c in chain if c.get("stage") != stage}  # each stage once, in order
    chain = [*by_stage.values(), engine.execution(stage)]
    (out / EXECUTION).write_text(json.dumps({"stages": chain}, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --- shards: gzip JSONL without timestamps ------------------------------------------------------------

def shard_name(split: str, k: int) -> str:
    return f"{split}/{k:05d}.jsonl.gz"


@contextlib.contextmanager
def gzip_writer(path: Path) -> Iterator[io.TextIOWrapper]:
    """A text file written as gzip with no file name and mtime 0 in its header, so equal
    content written the same way gives equal bytes (zlib's output also depends on how the
    content was cut into writes: keep every writer of a shard on this text path)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                 compresslevel=GZIP_LEVEL) as gz, \
            io.TextIOWrapper(gz, encoding="utf-8", newline="\n") as f:
        yield f


def dump_doc(d: dict) -> str:
    return json.dumps(d, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n"


def iter_shard(path: Path) -> Iterator[dict]:
    """Documents of one shard (a stage's own output, so a bad line is corruption)."""
    if not path.exists():
        raise BadInputError(f"{path}: missing (run the previous `k2repro data` stage)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                d = json.loads(line)
                yield {"doc_id": d["doc_id"], "domain": d["domain"], "text": d["text"]}
            except (json.JSONDecodeError, KeyError, TypeError):
                raise BadInputError(f"{path}:{lineno}: not a document record (doc_id, domain, text)") from None


def iter_shard_lines(path: Path) -> Iterator[str]:
    """The lines (newline included) of one shard, unparsed."""
    if not path.exists():
        raise BadInputError(f"{path}: missing (run the previous `k2repro data` stage)")
    with gzip.open(path, "rt", encoding="utf-8", newline="\n") as f:
        yield from f


def shards_of(manifest: dict, splits: Iterable[str]) -> list[str]:
    """Relative shard paths of a docs folder's manifest, in a fixed order (split, index)."""
    want = set(splits)
    return [a["path"] for a in manifest["artifacts"] if a.get("split") in want]


def my_share(items: list, rank: int, world_size: int) -> list:
    """Task `rank`'s items: every `world_size`-th from `rank` (datatrove's own file sharding)."""
    return items[rank::world_size]


