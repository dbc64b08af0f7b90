"""Audit an OLMo-core training run: add `K2ReproCallback(store)` to the Trainer's callbacks.

OLMo-core (`ai2-olmo-core`, extra `olmo-core`) is an FSDP2 pretraining trainer with a callback
API, a global data-order index and its own skip-step optimizer. This callback turns its hooks
into `k2repro.audit.start` calls (one implementation of layer statistics, host transfer, run
rows and lineage: this module computes none of them itself):

- pre_train: starts the run on every rank (rank 0's run id is broadcast). `hparams`: the config
  the user passes (`config=`, e.g. the experiment config; else a `ConfigSaverCallback`'s
  config) under `config.*`, and what the trainer, train module, optimizer, data loader and
  dataset say about themselves under `olmo_core.*`. `env`: the usual facts per rank plus the
  OLMo-core version. `data_manifest`: every token file (path, bytes, tokens, sha256 when small
  enough to hash), with the dataset fingerprint, the data-order seed and the fixed-length
  layout (`k2repro batch` reads a step's token ids through it);
- pre_step: the step's global instance indices, from the data loader's global index and
  `batches_processed` (every rank checks its own share, `batch["index"]`, against them): they
  become `steps.batch_hash` and `sample_stats` rows (sample id, batch position, the rank it went
  to; loss NULL: OLMo-core sums the loss inside `train_batch` and never shows per-instance
  losses), written by the last rank for the whole batch. A rank whose share differs logs an
  `audit_data_order` warning and writes the instances it was given (batch position NULL);
- pre_optim_step: `layer_stats` every `layer_stats_every` steps, with the optimizer (exact
  updates), FSDP2 shards reduced on the device (`AuditRun.log_layer_stats`);
- log_metrics (rank-reduced numbers, delivered late and from OLMo-core's bookkeeping thread):
  queued, then written from the training thread as one `steps` row per step: `train/CE loss`,
  `optim/total grad norm`, the lr, tokens, wall time; every other OLMo-core metric (z-loss,
  throughput, ...) goes to `metrics` under its own name. `optim/step skipped` (SkipStepAdamW)
  and the trainer's `steps_to_skip` set `steps.skipped` and write a `step_skipped` event;
- post_checkpoint_saved: a `checkpoints` row (path, step, size); the callback's state
  (run id, step) goes into OLMo-core's checkpoint, so a resumed run names its parent
  (`parent_run_id`, `resumed_from_step`) and writes a `resume` event;
- on_error / close: ends the run as failed (with the traceback) / completed.

Imports OLMo-core only here (k2repro itself imports without it).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

try:
    from olmo_core.train.callbacks import Callback
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("k2repro.integrations.olmo_core needs OLMo-core: pip install 'k2repro[olmo-core]' "
                      "(ai2-olmo-core>=3.0,<3.1)") from exc

from k2repro.audit.api import AuditRun, config_dict, start
from k2repro.audit.layerstats import layer_stats_writer

log = logging.getLogger(__name__)

#: OLMo-core metric names that have a `steps` column of their own.
LOSS_METRIC = "train/CE loss"
GRAD_NORM_METRIC = "optim/total grad norm"
LR_METRIC = "optim/LR (group 0)"
SKIPPED_METRIC = "optim/step skipped"
#: Derived by OLMo-core from the loss (exp): not worth a second row per step.
_DROP = ("train/PPL",)
#: Token files up to this many bytes in total are hashed at start (rank 0); bigger corpora get
#: sha256 NULL and rely on OLMo-core's fingerprint (names and sizes) instead.
HASH_LIMIT_BYTES = 1 << 30
#: Config keys that say where a run writes, not what it computes (left out of config_hash).
VOLATILE = ("olmo_core.trainer.save_folder", "olmo_core.trainer.work_dir", "olmo_core.data_loader.work_dir",
            "olmo_core.dataset.paths", "olmo_core.dataset.work_dir")


@dataclass
class K2ReproCallback(Callback):
    """An OLMo-core `Callback` writing the run to a k2repro audit store (docs/integrations.md).

    Its priority is above the checkpointer's (1): it runs first in every hook, so a checkpoint
    saved at a step never comes before this step's sample ids, layer statistics and timing
    are recorded. `run`/`run_id` name the latest run (kept after `fit()`); `host_s` and
    `host_calls` count the wall time spent in the callback's per-step hooks (`host_cpu_s`: the
    training thread's CPU time in them, which other processes on the machine do not inflate),
    `setup_s` the time in starting and closing the run (bench/integrations.py)."""

    priority: ClassVar[int] = 2

    store: str | None = None
    name: str | None = None
    layer_stats_every: int = 10
    flush_every: int = 10
    config: Any = None
    run_id_arg: str | None = None
    secrets: tuple[str, ...] = ()
    hash_limit_bytes: int = HASH_LIMIT_BYTES

    run: AuditRun | None = field(default=None, init=False, repr=False)
    run_id: str | None = field(default=None, init=False)
    host_s: float = field(default=0.0, init=False)
    host_cpu_s: float = field(default=0.0, init=False)
    host_calls: int = field(default=0, init=False)
    setup_s: float = field(default=0.0, init=False)
    _active: AuditRun | None = field(default=None, init=False, repr=False)
    _parent: dict | None = field(default=None, init=False, repr=False)
    _loaded_from: str | None = field(default=None, init=False, repr=False)
    _inbox: list = field(default_factory=list, init=False, repr=False)
    _lock: Any = field(default_factory=threading.Lock, init=False, repr=False)
    _pending: dict = field(default_factory=dict, init=False, repr=False)
    _t_prev: float | None = field(default=None, init=False, repr=False)
    _order_ok: bool | None = field(default=None, init=False, repr=False)
    _indices: tuple | None = field(default=None, init=False, repr=False)  # ((loader, epoch), global indices)
    _done: int = field(default=0, init=False, repr=False)
    _failed: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.store is not None:
            self.store = str(self.store)
        self.layer_stats_every = int(self.layer_stats_every)

    # -- state in OLMo-core's checkpoint ------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to name its parent (saved in OLMo-core's checkpoint)."""
        return {"run_id": self.run_id, "step": int(self.trainer.global_step)} if self.run_id else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("run_id"):
            self._parent = {"run_id": str(state_dict["run_id"]), "step": int(state_dict.get("step") or 0)}

    def post_checkpoint_loaded(self, path: Any) -> None:
        self._loaded_from = str(path)

    # -- hooks --------------------------------------------------------------------------------

    def pre_train(self) -> None:
        t0 = time.perf_counter()
        if self._active is not None:
            return
        from importlib.metadata import version

        tr = self.trainer
        rank = _rank()
        resumed = int(tr.global_step) if tr.global_step > 0 else None  # a checkpoint was loaded
        parent = self._parent if (self._parent and resumed) else None
        manifest = self._manifest() if rank == 0 else []
        user = self.config
        if user is None:  # OLMo-core's own convention: the experiment config on ConfigSaverCallback
            for cb in tr.callbacks.values():
                if type(cb).__name__ == "ConfigSaverCallback" and getattr(cb, "config", None):
                    user = cb.config
        cfg: dict[str, Any] = {"olmo_core": _trainer_facts(tr),
                               "audit": {"adapter": "olmo_core", "layer_stats_every": self.layer_stats_every,
                                         "flush_every": self.flush_every}}
        if user is not None:
            cfg["config"] = _as_config(user)
        self._active = self.run = start(
            self.store, config=cfg, name=self.name or "olmo-core", run_id=self.run_id_arg,
            source="api:olmo_core", data_manifest=manifest, flush_every=self.flush_every, secrets=self.secrets,
            parent_run_id=parent["run_id"] if parent else None,
            resumed_from_step=resumed,
            hash_exclude=VOLATILE,
            facts={"audit.adapter": "olmo_core", "olmo_core.version": version("ai2-olmo-core")},
            absent={"sample_stats": "OLMo-core sums the loss inside train_batch and never shows per-instance "
                                    "losses: sample_stats rows hold each step's instance ids and batch "
                                    "positions with loss NULL (no data attribution)"})
        self.run_id = self._active.run_id
        if resumed:
            self._active.log_event("resume", step=resumed, parent_run_id=parent["run_id"] if parent else None,
                                   checkpoint=self._loaded_from)
        self._t_prev = None
        self._pending, self._done = {}, int(tr.global_step)
        self.setup_s += time.perf_counter() - t0

    def pre_step(self, batch: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        c0 = time.thread_time()
        run = self._active
        if run is None:
            return
        self._drain()
        step = int(self.trainer.global_step)
        info: dict[str, Any] = {}
        if self._t_prev is None:  # the first step of this process: timed from its start
            self._t_prev = t0
        dl = self.trainer.data_loader
        n_tok = dl.global_num_tokens_in_batch(batch)
        if n_tok is not None:
            info["tokens"] = int(n_tok)
        local = _ints(batch.get("index"))
        glob = self._global_ids(dl) if local is not None else None
        if glob is not None:
            ws, r = run.world_size, run.rank
            if glob[r::ws] == local:
                info["batch_ids"] = glob
            else:
                glob = None
                if self._order_ok is not False:
                    run.log_event("audit_data_order", step=step, severity="warning",
                                  reason="this rank's batch['index'] is not its share of the loader's global "
                                         "indices: batch_hash left out")
                self._order_ok = False
        n_tok_row = int(batch["input_ids"].shape[-1])
        if glob is not None:
            # The step's instances come from the loader's global index, which every rank holds
            # and checked its own share of: the last rank writes the whole batch's rows (with
            # the rank each instance went to), beside the layer statistics it writes already.
            # Rank 0 writes steps and metrics: three segments a flush there cost a third more.
            if run.rank == layer_stats_writer(run.world_size):
                n = len(glob)
                run.sink.log_samples({"step": [step] * n, "sample_id": glob, "loss": [None] * n,
                                      "batch_pos": list(range(n)), "rank": [i % run.world_size for i in range(n)],
                                      "n_tokens": [n_tok_row] * n})
        elif local is not None:  # no global order to trust: each rank writes what it was given
            run.sink.log_samples({"step": [step] * len(local), "sample_id": local, "loss": [None] * len(local),
                                  "batch_pos": [None] * len(local), "n_tokens": [n_tok_row] * len(local)})
        skip = getattr(self.trainer, "steps_to_skip", None) or []
        if any(sr.start <= step < sr.stop for sr in skip):
            info["skipped_by_config"] = True
        self._pending.setdefault(step, {}).update(info)
        self._tick(t0, c0)

    def pre_optim_step(self) -> None:
        t0 = time.perf_counter()
        c0 = time.thread_time()
        run = self._active
        step = int(self.trainer.global_step)
        if run is not None and self.layer_stats_every > 0 and step % self.layer_stats_every == 0:
            tm = self.trainer.train_module
            run.log_layer_stats(step, tm.model, getattr(tm, "optim", None))
        self._tick(t0, c0)

    def post_train_batch(self) -> None:
        t0 = time.perf_counter()
        c0 = time.thread_time()
        if self._active is not None:
            info = self._pending.setdefault(int(self.trainer.global_step), {})
            opt = getattr(self.trainer.train_module, "optim", None)
            groups = getattr(opt, "param_groups", None)
            if groups:
                info["lr"] = groups[0].get("lr")  # as the scheduler set it for this step
            # from the previous step's end (this hook runs before the checkpointer's save)
            if self._t_prev is not None:
                info["step_time_s"] = t0 - self._t_prev
            self._t_prev = t0
        self._tick(t0, c0)

    def post_step(self) -> None:
        t0 = time.perf_counter()
        c0 = time.thread_time()
        if self._active is not None:
            self._drain()
        self._tick(t0, c0)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        # OLMo-core calls this from its bookkeeping thread (async bookkeeping, the default on
        # CPU/gloo): only queue here; the training thread writes (AuditRun is not thread-safe).
        with self._lock:
            self._inbox.append((int(step), dict(metrics)))

    def post_checkpoint_saved(self, path: Any) -> None:
        # Async saves call this from a thread too: queue it.
        m = re.search(r"step(\d+)", str(path))
        with self._lock:
            self._inbox.append((int(m.group(1)) if m else int(self.trainer.global_step), {"__checkpoint__": str(path)}))

    def on_error(self, exc: BaseException) -> None:
        self._failed = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))

    def close(self) -> None:
        """OLMo-core calls this last, after its bookkeeping threads finished: every step's
        metrics have arrived, so all rows are written before the run ends."""
        run = self._active
        if run is None:
            return
        t0 = time.perf_counter()
        try:
            try:  # on failure too: what arrived is worth keeping (no collectives in here)
                self._drain(final=True)
            except Exception:  # noqa: BLE001 - the run still ends, as failed, with both errors
                self._failed = (self._failed or "") + "\nwhile writing the last steps:\n" + traceback.format_exc()
            self._active = None
            run.close("failed" if self._failed else "completed", self._failed)
        finally:
            self._active, self._failed = None, None
            self.setup_s += time.perf_counter() - t0

    # -- internals ----------------------------------------------------------------------------

    def _tick(self, t0: float, c0: float) -> None:
        self.host_s += time.perf_counter() - t0
        self.host_cpu_s += time.thread_time() - c0
        self.host_calls += 1
        run = self._active
        if run is not None and run.hook_cpu_s:  # the update norm, measured inside the optimizer
            self.host_cpu_s += run.hook_cpu_s  # step by the audit's hook: the callback's work too
            run.hook_cpu_s = 0.0

    def _global_ids(self, dl: Any) -> list[int] | None:
        """The global batch's instance indices in order (FSL loaders: the global index reshaped
        to batches, row `batches_processed - 1`); None for loaders without that structure."""
        get = getattr(dl, "get_global_indices", None)
        ds = getattr(dl, "dataset", None)
        seq = getattr(ds, "sequence_length", None)
        total = getattr(dl, "total_size", None)
        if get is None or not seq or not total:
            return None
        per = int(dl.global_batch_size) // int(seq)
        b = int(dl.batches_processed) - 1
        if per <= 0 or b < 0 or (b + 1) * per > int(total):
            return None
        # OLMo-core maps its index file anew on every get_global_indices() call (a third of
        # the callback's time per step at the defaults): keep one map per loader, epoch and seed
        # (the fields its file name is made of; the path itself is a property built per call),
        # seen as a plain ndarray (slicing a memmap makes a memmap object each time).
        key = (id(dl), getattr(dl, "epoch", None), getattr(dl, "seed", None), id(getattr(dl, "_global_indices", None)))
        if self._indices is None or self._indices[0] != key:
            import numpy as np

            self._indices = (key, np.asarray(get()).view(np.ndarray))
        return self._indices[1][b * per:(b + 1) * per].tolist()

    def _drain(self, final: bool = False) -> None:
        """Write the steps whose metrics are complete. OLMo-core delivers a step's metrics in
        order but late, and a checkpoint save splits one step in two parts (what was recorded
        before the save, then what post_step recorded after it). A step is written once metrics
        of a later step arrived, at a checkpoint (everything up to its step, then a flush: the
        store then holds the steps the checkpoint holds), or at the end; parts arriving for a
        step already written go to `metrics` only."""
        run = self._active
        if run is None:
            return
        if not self._inbox and not final:  # nothing arrived since the last drain
            return
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for step, metrics in inbox:
            ck = metrics.pop("__checkpoint__", None)
            if ck is not None:
                self._write_upto(step)
                run.log_checkpoint(step, None if "://" in ck else Path(ck))
                run.flush()
            elif step <= self._done:
                self._late(step, metrics)
            else:
                self._pending.setdefault(step, {}).setdefault("metrics", {}).update(metrics)
        if final:
            self._write_upto(None)
            return
        with_metrics = [s for s, v in self._pending.items() if "metrics" in v]
        if with_metrics:
            self._write_upto(max(with_metrics) - 1)

    def _write_upto(self, last: int | None) -> None:
        for s in sorted(self._pending):
            if last is not None and s > last:
                break
            self._write_step(s, self._pending.pop(s))
            self._done = max(self._done, s)

    def _late(self, step: int, metrics: dict[str, Any]) -> None:
        run = self._active
        if run is None or run.rank != 0:
            return
        vals = {k: float(v) for k, v in metrics.items()
                if k not in _DROP and isinstance(v, int | float) and not isinstance(v, bool)}
        if vals:
            run.sink.log_metrics({"step": [step] * len(vals), "name": list(vals), "value": list(vals.values()),
                             "rank": [0] * len(vals)})

    def _write_step(self, step: int, info: dict[str, Any]) -> None:
        run = self._active
        assert run is not None
        m = {k: v for k, v in info.get("metrics", {}).items() if k not in _DROP}
        loss = m.pop(LOSS_METRIC, None)
        gn = m.pop(GRAD_NORM_METRIC, None)
        lr = m.pop(LR_METRIC, info.get("lr"))
        skipped_opt = m.pop(SKIPPED_METRIC, None)
        skipped = bool(info.get("skipped_by_config")) or bool(skipped_opt)
        extra = {k: float(v) for k, v in m.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if info.get("skipped_by_config") or skipped_opt is not None:
            extra["skipped"] = skipped
        if skipped:
            run.log_event("step_skipped", step=step, severity="warning",
                          by="trainer.steps_to_skip" if info.get("skipped_by_config") else "optimizer",
                          loss=loss, grad_norm=gn)
        run.log_step(step, loss=loss, lr=lr, grad_norm=gn, tokens=info.get("tokens"),
                     batch_ids=info.get("batch_ids"), step_time_s=info.get("step_time_s"), **extra)

    def _manifest(self) -> list[dict[str, Any]]:
        """Rows of `data_manifest` for the training dataset (rank 0)."""
        import json

        from k2repro.data.packed import sha256_file

        dl = self.trainer.data_loader
        ds = getattr(dl, "dataset", None)
        paths = [str(p) for p in getattr(ds, "paths", ()) or ()]
        if ds is None or not paths:
            return []
        try:
            sizes = list(ds.file_sizes)
        except Exception:  # noqa: BLE001 - remote paths: sizes unknown
            sizes = [None] * len(paths)
        offsets = list(getattr(ds, "offsets", None) or [(None, None)] * len(paths))
        dtype = getattr(ds, "dtype", None)
        dtype_name = getattr(dtype, "__name__", None) or (None if dtype is None else str(dtype))
        item = _itemsize(dtype)
        do_hash = all(s is not None for s in sizes) and sum(sizes) <= self.hash_limit_bytes \
            and all("://" not in p for p in paths)
        common = {"dataset": type(ds).__name__, "fingerprint": getattr(ds, "fingerprint", None),
                  "fingerprint_version": getattr(ds, "fingerprint_version", None),
                  "seed": getattr(dl, "seed", None), "layout": "fsl" if getattr(ds, "sequence_length", None) else None,
                  "dtype": dtype_name, "sequence_length": getattr(ds, "sequence_length", None),
                  "global_batch_size_tokens": getattr(dl, "global_batch_size", None)}
        rows = []
        for i, (p, size, off) in enumerate(zip(paths, sizes, offsets)):
            detail = {**common, "file_index": i, "first_sample": off[0], "end_sample": off[1]}
            rows.append({"artifact": f"olmo_core/train/{i}", "path": p, "sha256": sha256_file(p) if do_hash else None,
                         "n_tokens": None if size is None or item is None else size // item,
                         "bytes": size, "detail": json.dumps(detail, sort_keys=True, default=str)})
        return rows


# ---------------------------------------------------------------------------------- helpers


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _ints(x: Any) -> list[int] | None:
    if x is None:
        return None
    if hasattr(x, "tolist"):
        x = x.tolist()
    return [int(v) for v in x]


def _itemsize(dtype: Any) -> int | None:
    try:
        import numpy as np

        return int(np.dtype(dtype).itemsize)
    except TypeError:
        return None


def _as_config(user: Any) -> Any:
    """OLMo-core configs serialise themselves (`as_config_dict`, with class names); anything
    else goes through the audit API's `config_dict`."""
    to = getattr(user, "as_config_dict", None)
    if callable(to) and not isinstance(user, type):
        return to()
    if isinstance(user, dict):
        return {k: _as_config(v) for k, v in user.items()}
    return user


def _trainer_facts(tr: Any) -> dict[str, Any]:
    """What the built trainer says about itself: trainer settings, train module, optimizer,
    data loader and dataset (the config objects are gone once a Trainer is built)."""
    out: dict[str, Any] = {}
    t: dict[str, Any] = {}
    for k in ("save_folder", "work_dir", "metrics_collect_interval", "global_batch_size", "rank_batch_size",
              "max_steps", "max_tokens", "load_path", "async_bookkeeping", "save_overwrite"):
        try:
            v = getattr(tr, k, None)
        except Exception:  # noqa: BLE001 - properties that need state
            v = None
        if v is not None:
            t[k] = v if isinstance(v, int | float | str | bool) else str(v)
    t["max_duration"] = str(getattr(tr, "max_duration", None))
    t["steps_to_skip"] = [f"{s.start}-{s.stop}" for s in (getattr(tr, "steps_to_skip", None) or [])]
    t["callbacks"] = list(getattr(tr, "callbacks", {}).keys())
    out["trainer"] = t
    tm = tr.train_module
    m: dict[str, Any] = {"type": type(tm).__name__}
    for k in ("max_grad_norm", "z_loss_multiplier", "rank_microbatch_size", "max_sequence_length",
              "autocast_precision", "label_ignore_index"):
        v = getattr(tm, k, None)
        if v is not None:
            m[k] = v if isinstance(v, int | float | str | bool) else str(v)
    model = getattr(tm, "model", None)
    if model is not None:
        m["model_type"] = type(model).__name__
        m["n_params"] = int(sum(p.numel() for p in model.parameters()))
    out["train_module"] = m
    opt = getattr(tm, "optim", None)
    if opt is not None:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        out["optim"] = {"type": type(opt).__name__,
                        "param_groups": [{**config_dict(g), "n_params": len(pg["params"])}
                                         for g, pg in zip(groups, opt.param_groups)]}
    sched = getattr(tm, "scheduler", None)
    if sched is not None:
        out["scheduler"] = config_dict(sched) if hasattr(sched, "__dataclass_fields__") else str(sched)
    dl = tr.data_loader
    out["data_loader"] = {"type": type(dl).__name__, "work_dir": str(getattr(dl, "work_dir", ""))}
    for k in ("seed", "global_batch_size", "num_workers", "shuffle", "dp_world_size", "chunk_size"):
        v = getattr(dl, k, None)
        if isinstance(v, int | float | str | bool):
            out["data_loader"][k] = v
    ds = getattr(dl, "dataset", None)
    if ds is not None:
        d: dict[str, Any] = {"type": type(ds).__name__}
        for k in ("sequence_length", "max_target_sequence_length", "vocab_size", "eos_token_id", "pad_token_id",
                  "bos_token_id", "fingerprint", "fingerprint_version"):
            try:
                v = getattr(ds, k, None)
            except Exception:  # noqa: BLE001
                v = None
            if v is not None:
                d[k] = v if isinstance(v, int | float | str | bool) else str(v)
        dt = getattr(ds, "dtype", None)
        d["dtype"] = getattr(dt, "__name__", None) or str(dt)
        d["paths"] = [str(p) for p in getattr(ds, "paths", ()) or ()]
        d["work_dir"] = str(getattr(ds, "work_dir", ""))
        out["dataset"] = d
    return out


__all__ = ["K2ReproCallback", "HASH_LIMIT_BYTES"]
