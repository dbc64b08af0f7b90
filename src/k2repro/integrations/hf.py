"""Audit a Hugging Face Transformers `Trainer` run: `trainer = Trainer(..., callbacks=[K2ReproCallback(store)])`.

The callback turns the Trainer's own hooks into `k2repro.audit.start` calls (docs/audit-api.md):
- on_train_begin: starts the run; `hparams` hold the TrainingArguments (`trainer.*`), the model
  config (`model.*`) and the callback's settings (`audit.*`);
- on_pre_optimizer_step: `layer_stats` every `layer_stats_every` optimizer steps (after the
  Trainer's clipping: per-parameter grad norms are post-clip when max_grad_norm > 0);
- on_log: `steps` rows from the Trainer's logs (loss, grad_norm, learning_rate; set
  `logging_steps=1` for one row per step: with N the loss is the Trainer's mean over N steps);
  other numeric logs go to `metrics`;
- on_save: `checkpoints`, and `k2repro_audit.json` (run id, step) in the checkpoint folder so a
  resumed run names its parent;
- on_train_end: ends the run; `cb.run` (and `cb.run_id`) keep naming it afterwards. The Trainer has no exception hook: use the callback as a context
  manager around `trainer.train()` to record a failure with its traceback (otherwise the sink
  marks the run failed when the process exits).

Per-sample losses and the batch's sample ids never reach a callback: `sample_stats` and
`steps.batch_hash` are recorded as absent (an `audit_absent` event).
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from k2repro.audit.api import AuditRun, start

#: TrainingArguments that say where and under which name a run writes, not what it computes.
VOLATILE_ARGS = ("output_dir", "logging_dir", "run_name", "hub_model_id", "hub_token", "push_to_hub",
                 "report_to", "resume_from_checkpoint", "overwrite_output_dir")
MARKER = "k2repro_audit.json"


class K2ReproCallback(TrainerCallback):
    """A `transformers.TrainerCallback` writing the run to a k2repro audit store."""

    def __init__(self, store: str | Path | None = None, *, name: str | None = None,
                 layer_stats_every: int = 1, flush_every: int = 10, config: dict | None = None,
                 data_manifest: list[dict] | None = None, run_id: str | None = None,
                 secrets: tuple[str, ...] = ()) -> None:
        self.store, self.name, self.layer_stats_every = store, name, int(layer_stats_every)
        self.flush_every, self.extra_config, self.data_manifest = flush_every, config, data_manifest
        self.run_id_arg, self.secrets = run_id, secrets
        #: The latest run this callback started: live during training, closed (and still
        #: here, for `run.run_id` and queries) after it; None before the first fit.
        self.run: AuditRun | None = None
        self.run_id: str | None = None  # the same run's id
        self._active: AuditRun | None = None  # the run being recorded, None between fits
        self._last_logged = 0
        self._t_logged = time.perf_counter()
        self._tokens_seen = 0

    # -- Trainer hooks ------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self._active is not None:
            return
        mcfg = getattr(model, "config", None)
        config = {"trainer": args, "model": mcfg if mcfg is not None else {},
                  "audit": {"adapter": "transformers", "layer_stats_every": self.layer_stats_every,
                            "flush_every": self.flush_every}}
        if self.extra_config:
            config["user"] = self.extra_config
        parent, resumed = None, None
        if state.global_step > 0:
            resumed = int(state.global_step)
            parent = _parent_of(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        import transformers

        self._active = self.run = start(self.store, config=config, name=self.name or _name(args), rank=args.process_index,
                         world_size=args.world_size, run_id=self.run_id_arg, source="api:transformers",
                         data_manifest=self.data_manifest, flush_every=self.flush_every, secrets=self.secrets,
                         parent_run_id=parent, resumed_from_step=resumed,
                         hash_exclude=[f"trainer.{k}" for k in VOLATILE_ARGS],
                         facts={"audit.adapter": "transformers", "transformers.version": transformers.__version__},
                         absent={
                             "sample_stats": "the Trainer reduces the loss over the batch before any callback "
                                             "sees it (override compute_loss and call run.log_samples)",
                             "steps.batch_hash": "the Trainer's callbacks never see the batch's sample ids"})
        self.run_id = self._active.run_id
        if parent is not None:
            self._active.log_event("resume", step=resumed, parent_run_id=parent)
        self._last_logged = int(state.global_step)
        self._t_logged = time.perf_counter()
        self._tokens_seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None,
                              optimizer: Any = None, **kwargs: Any) -> None:
        step = state.global_step + 1
        if self._active is not None and self.layer_stats_every and step % self.layer_stats_every == 0:
            self._active.log_layer_stats(step, model, optimizer)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self._active is None or not logs:
            return
        step = int(state.global_step)
        numeric = {k: v for k, v in logs.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if "loss" in logs and step > self._last_logged:
            now = time.perf_counter()
            n = step - self._last_logged
            seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
            tokens = (seen - self._tokens_seen) // n if seen > self._tokens_seen else None
            extra = {k: v for k, v in numeric.items() if k not in ("loss", "grad_norm", "learning_rate")}
            self._active.log_step(step, loss=logs["loss"], lr=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                              tokens=tokens, step_time_s=(now - self._t_logged) / n, **extra)
            self._last_logged, self._t_logged, self._tokens_seen = step, now, seen
        elif numeric and self._active.rank == 0:  # evaluation and the end-of-training summary
            self._active.sink.log_metrics({"step": [step] * len(numeric), "name": list(numeric),
                                       "value": [float(v) for v in numeric.values()],
                                       "rank": [self._active.rank] * len(numeric)})

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._active is None:
            return
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self._active.rank == 0 and path.is_dir():
            (path / MARKER).write_text(json.dumps({"run_id": self._active.run_id, "step": int(state.global_step)}))
        self._active.log_checkpoint(int(state.global_step), path)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self, status: str = "completed", error: str | None = None) -> None:
        """End the run (the next `train()` starts a new one)."""
        if self._active is not None:
            run, self._active = self._active, None
            run.close(status, error)

    def __enter__(self) -> K2ReproCallback:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.close("failed", "".join(traceback.format_exception(exc_type, exc, tb)))
        else:
            self.close()


def _name(args: Any) -> str:
    rn = getattr(args, "run_name", None)
    if rn and rn != args.output_dir:
        return str(rn)
    return "hf-" + (Path(args.output_dir).name or "run")


def _parent_of(ckpt: Path) -> str | None:
    try:
        return json.loads((ckpt / MARKER).read_text()).get("run_id")
    except (OSError, ValueError):
        return None


__all__ = ["K2ReproCallback", "MARKER", "VOLATILE_ARGS"]
