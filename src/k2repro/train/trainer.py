"""The training loop of one launch: build, restore, step, flush, checkpoint, guard.

The loop computes; the audit sink records. Statistics stay on the device as tensors and move
to the host once per flush (`audit.flush_every` steps); every per-step reduction is folded into
the one collective the step already does for gradient clipping (`train/stepstats.py`). The
batch a step sees, with injected faults and counterfactual masks, comes from
`train/batches.py`; the process around the loop (signals, exit codes, the launch environment)
is `train/run.py`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from k2repro.audit.layerstats import layer_stats_writer, max_abs
from k2repro.config.load import config_hash, flatten, packed_window_note, to_dict
from k2repro.config.schema import RunConfig
from k2repro.core.ids import new_run_id
from k2repro.core.layout import step_dirname
from k2repro.data.loader import StepSampler, batch_hash, data_position
from k2repro.data.packed import PackedDataset
from k2repro.distributed.determinism import set_determinism
from k2repro.distributed.fsdp import apply_fsdp, local
from k2repro.distributed.init import DistInfo, broadcast_object
from k2repro.errors import BadInputError, GuardAbort
from k2repro.model.build import build_model
from k2repro.model.flops import flops_per_token
from k2repro.model.hardware import peak_flops
from k2repro.model.llama import token_losses
from k2repro.train import checkpoint as ckpt
from k2repro.train import faults as F
from k2repro.train import stepstats
from k2repro.train.batches import BatchSource, StepBatch
from k2repro.train.costs import WARMUP_STEPS, Costs
from k2repro.train.guard import LogGuard, SpikeGuard
from k2repro.train.launchenv import LaunchEnv
from k2repro.train.optim import build_optimizer, lr_at
from k2repro.train.progress import TrainProgress

logger = logging.getLogger(__name__)



class StopRequest:
    """The signal (SIGINT/SIGTERM) asking this rank to stop cleanly; 0 while none came. Set by
    `train/run.py`'s handler, read by the step (it rides in the step's collective)."""

    signum: int = 0


STOP = StopRequest()


class Trainer:
    """Owns the model, optimizer, data order, checkpoints and the audit sink of one launch."""

    def __init__(self, cfg: RunConfig, info: DistInfo, run_id: str, progress: TrainProgress | None = None,
                 launch: LaunchEnv | None = None) -> None:
        self.cfg, self.info, self.run_id = cfg, info, run_id
        self.launch = launch or LaunchEnv()
        self.progress = progress or TrainProgress(False)
        t = cfg.train
        self.progress(f"loading data ({cfg.data.packed_dir})")
        self.det = set_determinism(t.deterministic)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.data = self._open_data()
        self.progress(f"building model ({cfg.model.name}, {info.world_size} rank(s) on {info.device.type})")
        self.model = build_model(cfg.model, t.seed, info.device)
        self.param_names = [n for n, _ in self.model.named_parameters()]
        if info.distributed:
            apply_fsdp(self.model, t.precision)
        self.params = [p for _, p in self.model.named_parameters()]
        self.opt = build_optimizer(self.model, cfg.optim)
        if t.compile:  # compile each block (FSDP units stay intact); recorded in hparams
            for block in self.model.layers:
                block.compile()
        self.sampler = StepSampler(t.seed, len(self.data), t.global_batch_size, t.max_steps)
        self.sampler.deferred = sorted(set(t.defer_positions))
        self.batches = BatchSource(self.data, self.sampler, t, cfg.faults, info.rank, info.world_size, info.device)
        self.fpt = flops_per_token(cfg.model, t.seq_len)
        name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else None
        self.peak = peak_flops(name, t.precision)
        self.ckpt_base = Path(cfg.ckpt.dir or cfg.audit.store)
        self.ckpt_dir = self.ckpt_base / run_id / "checkpoints"
        self.skip_steps = set(t.skip_steps)
        # A guard that acts (skip/rollback/abort) decides on the device every step. One that only
        # logs needs no per-step work: its flags come from the same rule on the host, once per
        # flush, over the flushed values (`LogGuard`), so logging spikes costs nothing in the step.
        self.guard = SpikeGuard(cfg.guard, info.device) if cfg.guard.action != "log" else None
        self.log_guard = LogGuard(cfg.guard) if cfg.guard.action == "log" else None
        self.history: list[dict] = []  # this launch's step rows, as the flushes saw them
        self.sink = None
        self.pending = stepstats.Pending()
        self.start_step = 0
        self.parent_run_id: str | None = None
        self.rollbacks = 0
        self.resumed_from: str | None = None
        self.stop_flag: torch.Tensor | None = None  # the agreed stop request of the last step
        self.interrupted = 0  # the signal number a stop was agreed on (0: ran to the end)
        self.saved_step: int | None = None
        self.costs = Costs(per_step=bool(self.launch.timings_file))  # bench/audit_overhead.py

    def _open_data(self) -> PackedDataset:
        """The packed training split, refused (exit 2, naming the key) when it cannot serve
        this config: a changed artefact, a window shorter than seq_len, a larger vocabulary."""
        cfg, t = self.cfg, self.cfg.train
        data = PackedDataset(cfg.data.packed_dir, "train")
        if cfg.data.verify and self.info.is_main:
            data.verify()  # names a changed artefact: exit 2 before any step
        if data.seq_len < t.seq_len:
            raise BadInputError(
                f"config key 'train.seq_len': {t.seq_len} exceeds the packed window "
                f"{data.seq_len} of {cfg.data.packed_dir} (re-run `k2repro data pack`)")
        self.window_note = packed_window_note(t.seq_len, data.seq_len, cfg.data.packed_dir)
        if self.window_note and self.info.is_main:
            self.progress.warn(self.window_note["message"])
        if data.vocab_size > cfg.model.vocab_size:
            raise BadInputError(
                f"config key 'model.vocab_size': {cfg.model.vocab_size} is smaller than the "
                f"tokenizer's {data.vocab_size} ({cfg.data.packed_dir})")
        if len(data) < t.global_batch_size:
            raise BadInputError(f"data: {cfg.data.packed_dir} has {len(data)} samples, fewer than "
                                f"train.global_batch_size={t.global_batch_size}")
        return data

    # ---- resume and rollback ----------------------------------------------------------------
    def restore(self, path: Path, defer: list[int]) -> tuple[dict, dict]:
        """Load a checkpoint's model, optimizer, data order, guard and RNG state (RNG only at the
        same world size), moving the data positions `defer` to the end of the data order. A
        resume and a rollback both come through here. Returns (manifest, rank state)."""
        manifest, state = ckpt.load_checkpoint(path, self.model, self.opt, self.info.rank, self.info.world_size)
        self.sampler.load_state_dict(state.get("sampler", {}))
        self.sampler.deferred = sorted(set(self.sampler.deferred) | set(defer))
        if self.guard is not None and state.get("guard") is not None:
            self.guard.load_state_dict(state["guard"])
        if int(manifest["world_size"]) == self.info.world_size:
            ckpt.set_rng_state(state["rng"])
        self.start_step = int(manifest["step"])
        self.resumed_from = str(path)
        return manifest, state

    def resume(self, target: str) -> None:
        """`train.resume`: continue a run from its newest checkpoint (or a checkpoint folder)."""
        path = ckpt.find_checkpoint(target, self.ckpt_base)
        self.progress(f"resuming from {path}")
        manifest, state = self.restore(path, list(self.cfg.train.defer_positions))
        last = self.cfg.train.stop_at_step or self.cfg.train.max_steps
        if self.start_step >= last:  # e.g. the final checkpoint of a finished run: nothing to do
            raise BadInputError(
                f"config key 'train.resume': {path} is at step {self.start_step}, and the run stops at step "
                f"{last}: nothing to train (raise train.max_steps to go on)")
        self.parent_run_id = manifest.get("run_id")
        self.rollbacks = int(state.get("rollbacks", 0))

    # ---- audit --------------------------------------------------------------------------------
    def start_audit(self, resume_path: str | None = None) -> None:
        cfg, info = self.cfg, self.info
        if not cfg.audit.enabled:
            return
        from k2repro.audit.facts import capture_facts, git_diff_text
        from k2repro.audit.sink import AuditSink

        self.sink = AuditSink(cfg.audit.store, self.run_id, rank=info.rank, world_size=info.world_size,
                              flush_every=cfg.audit.flush_every, queue_size=cfg.audit.queue_size,
                              heartbeat_s=cfg.audit.heartbeat_s)
        env = capture_facts(info.rank, info.world_size, extra=self.det)
        resolved = to_dict(cfg)
        if resume_path:  # a rollback's child run: its config says where it started and what it deferred
            resolved["train"]["resume"] = resume_path
            resolved["train"]["defer_positions"] = list(self.sampler.deferred)
        # A replay (or any tool that launches training on behalf of a run) names its parent.
        if resume_path is None:  # a rollback's child names its real parent, whoever launched us
            self.parent_run_id = self.launch.parent_run_id or self.parent_run_id
        run = {
            "name": cfg.run.name, "parent_run_id": self.parent_run_id,
            "resumed_from_step": self.start_step if (self.parent_run_id and (cfg.train.resume or resume_path))
            else None,
            "source": self.launch.source, "config_hash": config_hash(cfg),
            "config_json": json.dumps(resolved, sort_keys=True, default=str),
        }
        self.sink.start(run, flatten(resolved), env, self.data.manifest_rows(),
                        git_diff=git_diff_text() if info.is_main else None)
        if self.parent_run_id and info.is_main:
            self.sink.log_event("resume", step=self.start_step, detail={
                "parent_run_id": self.parent_run_id, "checkpoint": self.resumed_from})
        if self.window_note and info.is_main:
            self.sink.log_event("data_window_cut", severity="warning", detail=self.window_note)

    # ---- one step -----------------------------------------------------------------------------
    def train_step(self, step: int, want_layers: bool) -> None:
        """Forward/backward over the rank's micro-batches, one collective for every statistic,
        clipping, the guard's decision and the optimizer step. Nothing here waits on the host."""
        batch = self.batches.get(step)
        if batch.fault is not None and self.sink is not None and self.info.is_main:
            self.sink.log_event("fault_injected", step=step, severity="warning", detail=batch.fault)
        losses, logz = self._forward_backward(batch)
        F.maybe_kill(self.cfg.faults, step, self.info.rank, "step")
        grads = [local(p.grad) if p.grad is not None else torch.zeros(1, device=self.info.device)
                 for p in self.params]
        sums, maxes = stepstats.all_reduce(*self._local_stats(losses, logz, batch, grads, want_layers),
                                           self.info.world_size)
        self.stop_flag = maxes.stop
        self.pending.emit_carried(sums.prev_param_sq, sums.prev_update_sq)
        grad_norm = sums.grad_sq.sum().sqrt()
        clipped = self._clip(grads, grad_norm)
        lr = self._set_lr(step)
        n_tok = float(self.cfg.train.seq_len)
        loss = sums.loss_tok_sum / (sums.n_samples * n_tok)
        loss_std = (sums.loss_sq_sum / sums.n_samples - loss * loss).clamp(min=0).sqrt()
        apply, flag = self._decide(step, loss, grad_norm)
        norms = self.opt.step(apply=apply, norms_for=self.params if want_layers else None)
        if want_layers:
            self.costs.audit_step_cpu_s += self.opt.take_norms_cpu()
        self.opt.zero_grad(set_to_none=True)
        if want_layers:
            self.pending.norms = stepstats.CarriedNorms(step, sums.grad_sq, maxes.grad_max, norms[0], norms[1])
        applied = torch.ones((), device=self.info.device) if apply is None else apply.float()
        values = torch.stack([loss, grad_norm, clipped, maxes.neg_loss_min.neg(), maxes.loss_max, loss_std,
                              sums.logz_sum / sums.n_samples, applied, flag.float()])
        self._record(step, batch, lr, values, losses)

    def _forward_backward(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of the batch's mean token loss (masked samples count for nothing); returns
        each sample's mean loss and mean log Z (zeros when nothing records log Z)."""
        t, dev, info = self.cfg.train, self.info.device, self.info
        denom = float((t.global_batch_size - batch.n_masked) * t.seq_len) / info.world_size
        sample_losses, sample_logz = [], []
        self.model.train()
        for i, chunk in enumerate(batch.tokens):
            x = torch.from_numpy(chunk)
            if dev.type == "cuda":  # pinned, so the copy is asynchronous
                x = x.pin_memory().to(dev, non_blocking=True)
            if info.distributed:
                self.model.set_requires_gradient_sync(i == len(batch.tokens) - 1)
            logits = self.model(x[:, :-1])
            loss_tok, lse = token_losses(logits, x[:, 1:], with_logz=self.sink is not None)
            loss_tok = F.maybe_nan(self.cfg.faults, loss_tok, batch.step, info.rank, i)
            if batch.weights is not None:
                loss_tok = loss_tok * batch.weights[i][:, None]
            (loss_tok.sum() / denom).backward()
            sample_losses.append(loss_tok.detach().mean(dim=1))
            if lse is not None:  # log Z is an audit statistic: skipped when nothing records it
                sample_logz.append(lse.mean(dim=1))
        sl = torch.cat(sample_losses).float()
        return sl, (torch.cat(sample_logz).float() if sample_logz else torch.zeros_like(sl))

    def _local_stats(self, sl: torch.Tensor, lz: torch.Tensor, batch: StepBatch, grads: list[torch.Tensor],
                     want_layers: bool) -> tuple[stepstats.StepSums, stepstats.StepMaxes]:
        """This rank's share of the step's statistics (plus the carried norms of the last
        layer-stats step), to be reduced in one collective."""
        dev = self.info.device
        grad_sq = torch.stack(torch._foreach_norm(grads)).float().pow(2)
        # max |grad| is a layer statistic only: skip its pass on other steps (audit/layerstats.py
        # says why one min/max pass per tensor, not abs().max() nor the foreach inf-norm, on CPU)
        if want_layers:
            c0 = time.thread_time()
            grad_max = max_abs(grads, dev)
            self.costs.audit_step_cpu_s += time.thread_time() - c0
        else:
            grad_max = grad_sq[:0]
        # A stop request (SIGINT/SIGTERM on any rank) rides in the max-reduced part as the signal
        # number: every rank learns the same request at the same step. A fill, not a host copy.
        stop = torch.full((1,), float(STOP.signum or 0), device=dev)
        n_tok = float(self.cfg.train.seq_len)
        if batch.weights is not None:
            wt = torch.cat(batch.weights)
            keep = wt > 0
            big = torch.full_like(sl, float("inf"))
            n, logz = wt.sum(), (lz * wt).sum()
            hi, neg_lo = torch.where(keep, sl, -big).max(), -torch.where(keep, sl, big).min()
        else:
            n, logz = torch.full((), float(len(sl)), device=dev), lz.sum()  # a fill, not a copy
            hi, neg_lo = sl.max(), -sl.min()
        prev = self.pending.norms
        sums = stepstats.StepSums(grad_sq, (sl * n_tok).sum(), (sl * sl).sum(), logz, n,
                                  prev.param_sq if prev else None, prev.update_sq if prev else None)
        return sums, stepstats.StepMaxes(grad_max, hi, neg_lo, stop)

    def _clip(self, grads: list[torch.Tensor], grad_norm: torch.Tensor) -> torch.Tensor:
        """Clip in place to `optim.clip_grad`; returns 1.0 when the step was clipped."""
        clip = self.cfg.optim.clip_grad
        if clip <= 0:
            return torch.zeros((), device=self.info.device)
        coef = (clip / (grad_norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef)
        return (coef < 1.0).float()

    def _set_lr(self, step: int) -> float:
        o, f = self.cfg.optim, self.cfg.faults
        lr = lr_at(step, o.lr, o.min_lr, o.warmup_steps, self.cfg.train.max_steps)
        if step in f.lr_spike_steps:
            lr *= f.lr_spike_factor
            if self.sink is not None and self.info.is_main:
                self.sink.log_event("fault_injected", step=step, severity="warning",
                                    detail={"kind": "lr_spike", "factor": f.lr_spike_factor, "lr": lr})
        for group in self.opt.param_groups:
            group["lr"] = lr
        return lr

    def _decide(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Whether the update applies (None: always) and the guard's flag, both on the device.
        A guard that only logs is None here: its flags come at flush (`LogGuard`)."""
        dev = self.info.device
        apply = torch.zeros((), dtype=torch.bool, device=dev) if step in self.skip_steps else None
        flag = torch.zeros((), dtype=torch.bool, device=dev)
        if self.guard is not None:
            decision, flag = self.guard.observe(loss, grad_norm)
            apply = decision if apply is None else apply & decision
        return apply, flag

    def _record(self, step: int, batch: StepBatch, lr: float, values: torch.Tensor, losses: torch.Tensor) -> None:
        t, dev = self.cfg.train, self.info.device
        peak_mem = None
        if dev.type == "cuda":  # allocator statistics: host-side counters, no device sync
            peak_mem = torch.cuda.max_memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        self.pending.steps.append(stepstats.StepRecord(step, lr, t.global_batch_size * t.seq_len,
                                                       batch_hash(batch.ids), values, peak_mem))
        if self.cfg.audit.sample_stats and self.sink is not None:
            c0 = time.thread_time()
            mine = np.concatenate(batch.sample_ids) if batch.sample_ids else np.zeros(0, dtype=np.int64)
            self.pending.samples.append(stepstats.SampleRecord(step, mine, losses, self.info.rank * len(mine)))
            self.costs.audit_step_cpu_s += time.thread_time() - c0

    # ---- flush --------------------------------------------------------------------------------
    def flush(self, times: dict[int, float]) -> list[dict]:
        """Move pending statistics to the host (one transfer per kind) and hand them to the sink."""
        pend = self.pending
        rows = stepstats.step_rows(pend.steps, times, self.fpt, self.peak, self.info.world_size)
        pend.steps.clear()
        if self.sink is None:
            pend.samples.clear()
            pend.layers.clear()
            return rows
        if rows and self.info.is_main:
            self.sink.log_steps({k: [r[k] for r in rows] for k in rows[0] if k != "guard_flag"})
            self._log_guard_events(rows)
        if pend.samples:
            self.sink.log_samples(stepstats.sample_columns(pend.samples, self.info.rank, self.cfg.train.seq_len))
            pend.samples.clear()
        if pend.layers and self.info.rank == layer_stats_writer(self.info.world_size):
            self.sink.log_layer_stats(stepstats.layer_columns(pend.layers, self.param_names))
        pend.layers.clear()
        self.sink.flush()
        return rows

    # ---- checkpoint ---------------------------------------------------------------------------
    def save(self, step: int) -> None:
        cfg, info = self.cfg, self.info

        def fault_hook() -> None:
            F.maybe_kill(cfg.faults, step, info.rank, "checkpoint")

        row = ckpt.save_checkpoint(
            self.ckpt_dir / step_dirname(step), self.model, self.opt,
            rank_state={"step": step, "sampler": self.sampler.state_dict(), "rollbacks": self.rollbacks,
                        "guard": self.guard.state_dict() if self.guard is not None else None},
            rank=info.rank, world_size=info.world_size,
            meta={"step": step, "run_id": self.run_id, "config_hash": config_hash(cfg)},
            before_rename=fault_hook if info.rank == cfg.faults.kill_rank else None,
        )
        if self.sink is not None and info.is_main:
            self.sink.log_checkpoint(row)
        if info.is_main:
            ckpt.prune(self.ckpt_dir, cfg.ckpt.keep_last)
        self.saved_step = step

    # ---- guard --------------------------------------------------------------------------------
    def _log_guard_events(self, rows: list[dict]) -> None:
        g = self.cfg.guard
        if self.log_guard is not None:
            for r, flag in zip(rows, self.log_guard.flags(rows)):
                r["guard_flag"] = bool(r["guard_flag"] or flag)
        for r in rows:
            if r["guard_flag"]:
                self.sink.log_event("spike", step=r["step"], severity="warning", detail={
                    "detector": "robust_z", "signal": g.signal, "action": g.action,
                    "loss": r["loss"], "grad_norm": r["grad_norm"]})
                if r["skipped"] and g.action != "log":
                    self.sink.log_event("skip", step=r["step"], severity="warning",
                                        detail={"reason": "spike guard", "action": g.action})

    def guard_act(self, rows: list[dict]) -> int | None:
        """Act on the first flagged step of a flush. Returns the step to continue after (a
        rollback), None to go on. Every rank reaches the same decision from the same rows."""
        if self.guard is None or self.guard.action in ("log", "skip"):
            return None
        flagged = [r["step"] for r in rows if r["guard_flag"]]
        if not flagged:
            return None
        k = flagged[0]
        if self.guard.action == "abort":
            raise GuardAbort(f"loss spike at step {k} (guard.action=abort)")
        return self.rollback(k)

    def rollback(self, k: int) -> int:
        """K2's remedy: reload the newest checkpoint before step k and move the data that
        followed it to the end of the data order. Continues as a new run id (parent = this run)."""
        cands = [(s, p) for s, p in ckpt.list_checkpoints(self.ckpt_dir) if s < k]
        if self.resumed_from and self.start_step < k:
            cands.append((self.start_step, Path(self.resumed_from)))
        if not cands:
            raise GuardAbort(f"loss spike at step {k}: no checkpoint before it to roll back to")
        if self.rollbacks >= self.cfg.guard.max_rollbacks:
            raise GuardAbort(f"loss spike at step {k}: guard.max_rollbacks={self.cfg.guard.max_rollbacks} reached")
        c, path = max(cands)
        window = [data_position(s, self.sampler.deferred, self.cfg.train.max_steps) for s in range(c + 1, k + 1)]
        old_id = self.run_id
        new_id = broadcast_object(new_run_id(self.cfg.run.name), self.info)
        if self.sink is not None:
            self.sink.log_event("rollback", step=k, severity="warning", detail={
                "to_step": c, "checkpoint": str(path), "deferred": window, "child_run_id": new_id})
            self.sink.close("completed")
            self.costs.add_sink(self.sink)
            self.sink = None
        self.pending = stepstats.Pending()
        self.restore(path, window)
        self.rollbacks += 1
        self.run_id, self.parent_run_id = new_id, old_id
        self.ckpt_dir = self.ckpt_base / new_id / "checkpoints"
        if self.info.is_main:
            print(f"spike guard: loss spike at step {k}; rolled back to step {c} ({path}); "
                  f"data positions {window[0]}..{window[-1]} deferred; continuing as run_id={new_id}", flush=True)
        if self.cfg.audit.enabled:
            self.start_audit(resume_path=str(path))
            if self.info.is_main:
                self.sink.log_event("rollback", step=c, severity="warning", detail={
                    "parent_run_id": old_id, "spike_step": k, "checkpoint": str(path), "deferred": window,
                    "deferred_all": list(self.sampler.deferred)})
        return c

    # ---- loop ---------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        """Steps from `start_step` to the end (or an agreed stop); returns this launch's rows."""
        cfg = self.cfg
        t, a = cfg.train, cfg.audit
        last = t.stop_at_step or t.max_steps
        flush_every = a.flush_every if self.sink is not None else max(1, t.log_every)
        if self.guard is not None and self.guard.action in ("rollback", "abort"):
            flush_every = min(flush_every, max(1, cfg.ckpt.interval or flush_every))
        times: dict[int, float] = {}
        self.history = []
        step = self.start_step
        self.progress.steps(step, last)
        t_prev = time.perf_counter()
        while step < last:
            step += 1
            want_layers = bool(self.sink is not None and a.layer_stats_every and step % a.layer_stats_every == 0)
            agreed = self.stop_flag  # the previous step's: read one step late, so the host
            c0 = time.thread_time()
            self.train_step(step, want_layers)  # never waits on this step's collective
            cpu = time.thread_time() - c0
            if agreed is not None and (sig := int(agreed.item())):
                self.interrupted, last = sig, step
            now = time.perf_counter()
            times[step] = now - t_prev
            self.costs.step(step, times[step], cpu)
            t_prev = now
            if step % flush_every == 0 or step == last:
                back = self._flush_and_act(step, last, times)
                if back is not None:
                    step = back
                    t_prev = time.perf_counter()
                    continue
            if cfg.ckpt.interval and step % cfg.ckpt.interval == 0:
                self.save(step)
                t_prev = time.perf_counter()
        if (cfg.ckpt.final or self.interrupted) and self.saved_step != step and step > self.start_step:
            self.progress(f"writing the checkpoint of step {step}")
            self.save(step)  # the last step's state: eval, export and `train.resume` start here
        return self.history

    def _flush_and_act(self, step: int, last: int, times: dict[int, float]) -> int | None:
        """A flush in the loop: the rows go to the sink and the step line, then the guard acts
        on them. Returns the step to continue after a rollback, else None."""
        if step == last:
            self.pending.reduce_carried(self.info.distributed)
        t_flush, c_flush = time.perf_counter(), time.thread_time()
        rows = self.flush(times)
        self.costs.flush_wall_s += time.perf_counter() - t_flush
        self.costs.flush_cpu_s += time.thread_time() - c_flush
        self.costs.flushes += 1
        if self.costs.per_step and self.sink is not None and self.costs.writer_mark_a is None \
                and step > WARMUP_STEPS:  # a benchmark asked: one wait, after the warm-up
            self.sink.flush(wait=True)
            self.costs.writer_mark_a = (step, self.sink.writer_cpu_s)
        times.clear()
        F.maybe_kill(self.cfg.faults, step, self.info.rank, "flush")
        self.history.extend(rows)
        if self.info.is_main and rows:
            r = rows[-1]
            self.progress.step_line(
                f"step {r['step']:>6}/{self.cfg.train.max_steps}  loss {r['loss']:.4f}  grad_norm "
                f"{r['grad_norm']:.3f}  lr {r['lr']:.2e}  tok/s {r['tokens_per_s'] or 0:,.0f}", len(rows))
        return self.guard_act(rows)


__all__ = ["Trainer", "STOP", "StopRequest"]
