"""Audit a PyTorch Lightning run: `Trainer(..., callbacks=[K2ReproCallback(store)])`.

The callback turns Lightning's own hooks into `k2repro.audit.start` calls (docs/audit-api.md):
- on_fit_start: starts the run; `hparams` hold the module's `hparams` (`module.*`), the
  Trainer's settings (`trainer.*`), each optimizer's type and defaults (`optimizer.<i>.*`) and the
  callback's settings (`audit.*`);
- on_before_optimizer_step (gradients unscaled, not yet clipped): the global grad norm and lr
  of the step, and `layer_stats` every `layer_stats_every` steps;
- on_train_batch_end: one `steps` row per optimizer step: the mean of the micro-batch losses
  (`outputs["loss"]`, kept on the device), grad norm, lr, tokens (`count_tokens(batch)`, times
  the world size);
- on_save_checkpoint: puts `{"run_id", "step"}` under `checkpoint["k2repro"]` (a resume names its
  parent) and logs a `checkpoints` row once the file is written (ModelCheckpoint's path);
- on_exception: ends the run as failed with the traceback; on_fit_end: completed. `callback.run`
  (and `callback.run_id`) keep naming the run afterwards.

Per-sample losses and the batch's sample ids are not visible to a callback: `sample_stats` and
`steps.batch_hash` are recorded as absent unless the module calls `callback.run.log_samples`.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from k2repro.audit.api import AuditRun, grad_norm, start


def default_count_tokens(batch: Any) -> int | None:
    """Tokens in this rank's batch: an integer tensor's elements, or a mapping's `input_ids`
    (or the first element of a tuple/list batch). None when it cannot tell."""
    if isinstance(batch, Mapping):
        batch = batch.get("input_ids")
    elif isinstance(batch, list | tuple) and batch:
        batch = batch[0]
    dtype = getattr(batch, "dtype", None)
    if dtype is not None and hasattr(batch, "numel") and not dtype.is_floating_point:
        return int(batch.numel())
    return None


class K2ReproCallback(Callback):
    """A Lightning `Callback` writing the run to a k2repro audit store."""

    def __init__(self, store: str | Path | None = None, *, name: str | None = None,
                 layer_stats_every: int = 1, flush_every: int = 10, config: dict | None = None,
                 data_manifest: list[dict] | None = None, run_id: str | None = None,
                 count_tokens: Callable[[Any], int | None] | None = default_count_tokens,
                 secrets: tuple[str, ...] = ()) -> None:
        self.store, self.name, self.layer_stats_every = store, name, int(layer_stats_every)
        self.flush_every, self.extra_config, self.data_manifest = flush_every, config, data_manifest
        self.run_id_arg, self.count_tokens, self.secrets = run_id, count_tokens, secrets
        #: The latest run this callback started: live during training, closed (and still
        #: here, for `run.run_id` and queries) after it; None before the first fit.
        self.run: AuditRun | None = None
        self.run_id: str | None = None  # the same run's id
        self._active: AuditRun | None = None  # the run being recorded, None between fits
        self._resume: dict | None = None
        self._reset()

    def _reset(self) -> None:
        self._last_step = 0
        self._loss_sum: Any = None
        self._n_loss = 0
        self._tokens = 0
        self._gn: Any = None
        self._lr: float | None = None
        self._ckpt_pending: list[tuple[int, float]] = []
        self._t_step = time.perf_counter()

    # -- Lightning hooks ----------------------------------------------------------------------

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict) -> None:
        info = checkpoint.get("k2repro") or {}
        self._resume = {"parent": info.get("run_id"), "step": checkpoint.get("global_step", info.get("step"))}

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self._active is not None:
            return
        import lightning

        config: dict[str, Any] = {
            "module": dict(getattr(pl_module, "hparams", {}) or {}),
            "trainer": _trainer_facts(trainer),
            "optimizer": {str(i): _optimizer_facts(o) for i, o in enumerate(trainer.optimizers)},
            "audit": {"adapter": "lightning", "layer_stats_every": self.layer_stats_every,
                      "flush_every": self.flush_every},
        }
        if self.extra_config:
            config["user"] = self.extra_config
        resume = self._resume or {}
        self._active = self.run = start(self.store, config=config, name=self.name or type(pl_module).__name__,
                         rank=trainer.global_rank, world_size=trainer.world_size, run_id=self.run_id_arg,
                         source="api:lightning", data_manifest=self.data_manifest, flush_every=self.flush_every,
                         secrets=self.secrets, parent_run_id=resume.get("parent"),
                         resumed_from_step=resume.get("step") if resume.get("parent") else None,
                         hash_exclude=["trainer.default_root_dir"],
                         facts={"audit.adapter": "lightning", "lightning.version": lightning.__version__},
                         absent={"steps.batch_hash": "Lightning's callbacks never see the batch's sample ids"})
        self.run_id = self._active.run_id
        self._resume = None
        if resume.get("parent"):
            self._active.log_event("resume", step=resume.get("step"), parent_run_id=resume["parent"])
        self._reset()
        self._last_step = int(trainer.global_step)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._log_saved_checkpoints(trainer)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._active is None:
            return
        step = trainer.global_step + 1
        self._gn = grad_norm(pl_module)
        self._lr = float(optimizer.param_groups[0]["lr"])
        if self.layer_stats_every and step % self.layer_stats_every == 0:
            self._active.log_layer_stats(step, pl_module, optimizer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._active is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None and hasattr(loss, "detach"):
            loss = loss.detach()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._n_loss += 1
        n = self.count_tokens(batch) if self.count_tokens is not None else None
        if n is not None:
            self._tokens += n * self._active.world_size
        step = int(trainer.global_step)
        if step <= self._last_step:  # accumulating gradients: no optimizer step yet
            return
        now = time.perf_counter()
        self._active.log_step(step, loss=None if self._loss_sum is None else self._loss_sum / self._n_loss,
                          lr=self._lr, grad_norm=self._gn, tokens=self._tokens or None,
                          step_time_s=(now - self._t_step) / (step - self._last_step))
        self._last_step, self._t_step = step, now
        self._loss_sum, self._n_loss, self._tokens, self._gn = None, 0, 0, None

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict) -> None:
        if self._active is None:
            return
        checkpoint["k2repro"] = {"run_id": self._active.run_id, "step": int(trainer.global_step)}
        self._ckpt_pending.append((int(trainer.global_step), time.time()))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._log_saved_checkpoints(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self._active is not None:
            run, self._active = self._active, None
            run.close("failed", "".join(traceback.format_exception(type(exception), exception,
                                                                   exception.__traceback__)))

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self._active is not None:
            self._log_saved_checkpoints(trainer)
            run, self._active = self._active, None
            run.close("completed")

    # -- internals ----------------------------------------------------------------------------

    def _log_saved_checkpoints(self, trainer: Any) -> None:
        """on_save_checkpoint runs before the file exists and without its path: log it once
        ModelCheckpoint has written it (its `_last_checkpoint_saved`/`last_model_path`)."""
        if not self._ckpt_pending or self._active is None:
            return
        paths = []
        for cb in getattr(trainer, "checkpoint_callbacks", []) or []:
            for attr in ("_last_checkpoint_saved", "last_model_path", "best_model_path"):
                p = getattr(cb, attr, "") or ""
                if p and Path(p).exists():
                    paths.append(Path(p))
        for step, t in self._ckpt_pending:
            fresh = [p for p in paths if p.stat().st_mtime >= t - 1.0]
            self._active.log_checkpoint(step, fresh[0] if fresh else None)
        self._ckpt_pending = []


def _trainer_facts(trainer: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("max_steps", "max_epochs", "min_steps", "accumulate_grad_batches", "gradient_clip_val",
                "gradient_clip_algorithm", "precision", "num_devices", "num_nodes", "world_size",
                "check_val_every_n_epoch", "val_check_interval", "log_every_n_steps", "default_root_dir"):
        v = getattr(trainer, key, None)
        if v is None:
            v = getattr(getattr(trainer, "fit_loop", None), key, None)
        if v is not None:
            out[key] = v if isinstance(v, int | float | str | bool) else str(v)
    out["strategy"] = type(trainer.strategy).__name__
    out["accelerator"] = type(trainer.accelerator).__name__
    prec = getattr(trainer, "precision_plugin", None) or getattr(trainer.strategy, "precision_plugin", None)
    if prec is not None and "precision" not in out:
        out["precision"] = str(getattr(prec, "precision", type(prec).__name__))
    return out


def _optimizer_facts(opt: Any) -> dict[str, Any]:
    inner = getattr(opt, "_optimizer", opt)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
    return {"type": type(inner).__name__, "defaults": dict(getattr(inner, "defaults", {})),
            "param_groups": [{**g, "n_params": len(pg["params"])} for g, pg in zip(groups, inner.param_groups)]}


__all__ = ["K2ReproCallback", "default_count_tokens"]
