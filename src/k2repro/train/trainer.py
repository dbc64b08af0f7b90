"""The training loop: build, then fit.

The loop computes; the audit sink records. Statistics stay on the device as tensors and move
to the host once per flush (`audit.flush_every` steps). Every per-step reduction that the audit
needs is folded into the one collective the step already does for gradient clipping: each rank
contributes one vector (per-parameter squared gradient norms and max |grad|, loss sums, the
previous layer-stats step's parameter/update norms) and a single all_gather gives every rank
the same global numbers, so guard decisions agree across ranks without a host sync.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from k2repro.config.load import config_hash, flatten, load_config, load_params_file, to_dict
from k2repro.config.schema import RunConfig
from k2repro.core.ids import new_run_id
from k2repro.core.layout import step_dirname
from k2repro.data.loader import StepSampler, batch_hash, data_position, rank_slice
from k2repro.data.packed import PackedDataset
from k2repro.distributed.determinism import set_determinism
from k2repro.distributed.fsdp import apply_fsdp, local
from k2repro.distributed.init import DistInfo, barrier, broadcast_object, init_distributed, teardown
from k2repro.errors import BadInputError, CheckpointError, GuardAbort, K2ReproError
from k2repro.model.flops import flops_per_token
from k2repro.model.hardware import peak_flops
from k2repro.model.llama import ModelArgs, Transformer, token_losses
from k2repro.train import checkpoint as ckpt
from k2repro.train import faults as F
from k2repro.train.guard import SpikeGuard
from k2repro.train.optim import build_optimizer, lr_at
from k2repro.train.progress import TrainProgress

logger = logging.getLogger(__name__)

PURPOSE_INIT = 3
STEP_FIELDS = ("loss", "grad_norm", "clipped", "loss_min", "loss_max", "loss_std", "logz_mean", "applied",
               "guard_flag")


def _present(value: str | None) -> str | None:
    """Facts use the marker "absent" (outside a git checkout, no GPU); columns use NULL."""
    return None if value in (None, "", "absent") else value


def init_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, PURPOSE_INIT]).generate_state(1)[0]))
    return g


def build_model(cfg: RunConfig, device: torch.device | str = "cpu") -> Transformer:
    """The model with its seeded initial weights: identical on every rank and world size."""
    with torch.device("meta" if str(device) == "meta" else "cpu"):
        model = Transformer(ModelArgs.from_config(cfg.model))
    if str(device) != "meta":
        model.init_weights(init_generator(cfg.train.seed))
        model.to(device)
    return model


@dataclass
class Pending:
    """Device-side statistics waiting for the next flush."""

    steps: list = field(default_factory=list)  # (step, lr, tokens, dt, ids_hash, skipped_host, vec)
    samples: list = field(default_factory=list)  # (step, ids, loss tensor, n_tokens)
    layers: list = field(default_factory=list)  # (step, tensor (P, 4): grad^2, param^2, update^2, max |grad|)
    norms: tuple | None = None  # (step, grad_sq, grad_max, param_sq, update_sq) awaiting reduction


class Trainer:
    """Owns the model, optimizer, data order, checkpoints and the audit sink of one launch."""

    def __init__(self, cfg: RunConfig, info: DistInfo, run_id: str, progress: TrainProgress | None = None) -> None:
        self.cfg, self.info, self.run_id = cfg, info, run_id
        self.progress = progress or TrainProgress(False)
        t = cfg.train
        self.progress(f"loading data ({cfg.data.packed_dir})")
        self.det = set_determinism(t.deterministic)
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.data = PackedDataset(cfg.data.packed_dir, "train")
        if cfg.data.verify and info.is_main:
            self.data.verify()  # names a changed artefact: exit 2 before any step
        if self.data.seq_len < t.seq_len:
            raise BadInputError(
                f"config key 'train.seq_len': {t.seq_len} exceeds the packed window "
                f"{self.data.seq_len} of {cfg.data.packed_dir} (re-run `k2repro data pack`)")
        from k2repro.config.load import packed_window_note

        self.window_note = packed_window_note(t.seq_len, self.data.seq_len, cfg.data.packed_dir)
        if self.window_note and info.is_main:
            print(f"k2repro train: warning: {self.window_note['message']}", file=sys.stderr, flush=True)
        if self.data.vocab_size > cfg.model.vocab_size:
            raise BadInputError(
                f"config key 'model.vocab_size': {cfg.model.vocab_size} is smaller than the "
                f"tokenizer's {self.data.vocab_size} ({cfg.data.packed_dir})")
        if len(self.data) < t.global_batch_size:
            raise BadInputError(f"data: {cfg.data.packed_dir} has {len(self.data)} samples, fewer than "
                                f"train.global_batch_size={t.global_batch_size}")
        self.progress(f"building model ({cfg.model.name}, {info.world_size} rank(s) on {info.device.type})")
        self.model = build_model(cfg, info.device)
        self.param_names = [n for n, _ in self.model.named_parameters()]
        if info.distributed:
            apply_fsdp(self.model, t.precision)
        self.params = [p for _, p in self.model.named_parameters()]
        self.opt = build_optimizer(self.model, cfg.optim)
        self.sampler = StepSampler(t.seed, len(self.data), t.global_batch_size, t.max_steps)
        self.sampler.deferred = sorted(set(t.defer_positions))
        self.micro_per_rank = t.global_batch_size // (t.micro_batch_size * info.world_size)
        self.start_step = 0
        self.parent_run_id: str | None = None
        self.ckpt_base = Path(cfg.ckpt.dir or cfg.audit.store)
        self.ckpt_dir = self.ckpt_base / run_id / "checkpoints"
        self.fpt = flops_per_token(cfg.model, t.seq_len)
        name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else None
        self.peak = peak_flops(name, t.precision)
        if t.compile:  # compile each block (FSDP units stay intact); recorded in hparams
            for block in self.model.layers:
                block.compile()
        self.sink = None
        self.pending = Pending()
        self.skip_steps = set(t.skip_steps)
        # A guard that acts (skip/rollback/abort) decides on the device every step. One that only
        # logs needs no per-step work: its flags come from the same rule on the host, once per
        # flush, over the flushed values (`_log_flags`), so logging spikes costs nothing in the step.
        self.guard = SpikeGuard(cfg.guard, info.device) if cfg.guard.action != "log" else None
        self.log_history: list[float] = []
        self.rollbacks = 0
        self.resumed_from: str | None = None
        self.stop_flag: torch.Tensor | None = None  # the agreed stop request of the last step
        self.interrupted = 0  # the signal number a stop was agreed on (0: ran to the end)
        self.saved_step: int | None = None
        self.flush_s = 0.0  # wall time of the loop in flush(): what the audit costs on this thread
        self.writer_cpu_s = 0.0  # of sinks already closed (a rollback closes one)

    # ---- resume -------------------------------------------------------------------------------
    def resolve_resume(self, target: str) -> Path:
        p = Path(target)
        if (p / ckpt.MANIFEST).exists() or (p.is_dir() and p.name.startswith("step_")):
            return p
        hits = [d for d in self.ckpt_base.glob(f"**/{target}/checkpoints") if d.is_dir()]
        found = [c for d in hits for c in ckpt.list_checkpoints(d)]
        if not found:
            raise BadInputError(f"config key 'train.resume': no checkpoint of run '{target}' under {self.ckpt_base}")
        return max(found)[1]

    def resume(self, target: str) -> None:
        path = self.resolve_resume(target)
        self.progress(f"resuming from {path}")
        manifest, state = ckpt.load_checkpoint(path, self.model, self.opt, self.info.rank, self.info.world_size)
        self.start_step = int(manifest["step"])
        last = self.cfg.train.stop_at_step or self.cfg.train.max_steps
        if self.start_step >= last:  # e.g. the final checkpoint of a finished run: nothing to do
            raise BadInputError(
                f"config key 'train.resume': {path} is at step {self.start_step}, and the run stops at step "
                f"{last}: nothing to train (raise train.max_steps to go on)")
        self.parent_run_id = manifest.get("run_id")
        self.sampler.load_state_dict(state.get("sampler", {}))
        self.sampler.deferred = sorted(set(self.sampler.deferred) | set(self.cfg.train.defer_positions))
        self.rollbacks = int(state.get("rollbacks", 0))
        if self.guard is not None and state.get("guard") is not None:
            self.guard.load_state_dict(state["guard"])
        if int(manifest["world_size"]) == self.info.world_size:
            ckpt.set_rng_state(state["rng"])
        self.resumed_from = str(path)

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
            self.parent_run_id = os.environ.get("K2REPRO_PARENT_RUN_ID") or self.parent_run_id
        run = {
            "name": cfg.run.name, "parent_run_id": self.parent_run_id,
            "resumed_from_step": self.start_step if (self.parent_run_id and (cfg.train.resume or resume_path))
            else None,
            "source": os.environ.get("K2REPRO_SOURCE", "train"), "config_hash": config_hash(cfg),
            "git_commit": _present(env.get("git.commit")),
            "git_dirty": None if _present(env.get("git.dirty")) is None else env.get("git.dirty") in ("True", "true"),
            "world_size": info.world_size, "started_at": datetime.now(timezone.utc),
            "config_json": json.dumps(resolved, sort_keys=True, default=str),
            "argv": json.dumps(sys.argv),
        }
        manifest = [
            {"artifact": a["artifact"], "path": str(Path(cfg.data.packed_dir) / a["path"])
             if not os.path.isabs(a["path"]) and (Path(cfg.data.packed_dir) / a["path"]).exists() else a["path"],
             "sha256": a["sha256"], "n_docs": a.get("n_docs"), "n_tokens": a.get("n_tokens")}
            for a in self.data.artifacts()
        ]
        self.sink.start(run, flatten(resolved), env, manifest,
                        git_diff=git_diff_text() if info.is_main else None)
        if self.parent_run_id and info.is_main:
            self.sink.log_event("resume", step=self.start_step, detail={
                "parent_run_id": self.parent_run_id, "checkpoint": self.resumed_from})
        if self.window_note and info.is_main:
            self.sink.log_event("data_window_cut", severity="warning", detail=self.window_note)

    # ---- one step -----------------------------------------------------------------------------
    def _local_batches(self, step: int) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        t, f = self.cfg.train, self.cfg.faults
        ids = self.sampler.ids(step)
        # Faults belong to the data (its position in the stream), not to the step number, so
        # a rollback that defers the data also moves the fault, as it would a real bad chunk.
        pos = data_position(step, self.sampler.deferred)
        mine = rank_slice(ids, self.info.rank, self.info.world_size)
        per = len(ids) // self.info.world_size
        positions = np.arange(self.info.rank * per, (self.info.rank + 1) * per)
        tokens = self.data.get(mine, t.seq_len)
        if pos in f.bad_batch_steps:
            bad = F.bad_positions(t.seed, pos, len(ids), f.bad_batch_fraction)
            tokens = F.inject_bad_batch(tokens, positions, bad, t.seed, pos, self.data.vocab_size,
                                        f.bad_batch_kind)
            if self.sink is not None and self.info.is_main:
                self.sink.log_event("fault_injected", step=step, severity="warning", detail={
                    "kind": "bad_batch", "bad_batch_kind": f.bad_batch_kind,
                    "sample_ids": [int(ids[i]) for i in bad], "positions": [int(i) for i in bad],
                    "data_position": int(pos)})
        mb = t.micro_batch_size
        chunks = [tokens[i:i + mb] for i in range(0, len(tokens), mb)]
        id_chunks = [mine[i:i + mb] for i in range(0, len(mine), mb)]
        return ids, chunks, id_chunks

    def train_step(self, step: int, want_layers: bool) -> None:
        cfg, info = self.cfg, self.info
        t, f = cfg.train, cfg.faults
        dev = info.device
        ids, chunks, id_chunks = self._local_batches(step)
        masked = set(t.mask_sample_ids) if step in t.mask_steps else set()
        n_masked = sum(1 for i in ids if int(i) in masked)  # host data: same on every rank
        denom = float((t.global_batch_size - n_masked) * t.seq_len) / info.world_size
        sample_losses, sample_logz, weights = [], [], []
        self.model.train()
        for i, chunk in enumerate(chunks):
            x = torch.from_numpy(chunk)
            if dev.type == "cuda":  # pinned, so the copy is asynchronous
                x = x.pin_memory().to(dev, non_blocking=True)
            last = i == len(chunks) - 1
            if info.distributed:
                self.model.set_requires_gradient_sync(last)
            logits = self.model(x[:, :-1])
            loss_tok, lse = token_losses(logits, x[:, 1:], with_logz=self.sink is not None)
            if f.nan_step and step == f.nan_step and info.rank == 0 and i == 0:
                loss_tok = loss_tok * F.nan_tensor(loss_tok[:1, :1])
            if masked:  # a counterfactual: these samples contribute no loss and no gradient
                w = torch.tensor([0.0 if int(sid) in masked else 1.0 for sid in id_chunks[i]], device=dev)
                loss_tok = loss_tok * w[:, None]
                weights.append(w)
            (loss_tok.sum() / denom).backward()
            sample_losses.append(loss_tok.detach().mean(dim=1))
            if lse is not None:  # log Z is an audit statistic: skipped when nothing records it
                sample_logz.append(lse.mean(dim=1))
        F.maybe_kill(f, step, info.rank, "step")
        sl = torch.cat(sample_losses).float()
        lz = torch.cat(sample_logz).float() if sample_logz else torch.zeros_like(sl)
        grads = [local(p.grad) if p.grad is not None else torch.zeros(1, device=dev) for p in self.params]
        grad_sq = torch.stack(torch._foreach_norm(grads)).float().pow(2)
        # max |grad| is a layer statistic only: skip its pass on other steps
        # (abs().max() per tensor: the foreach inf-norm is several times slower on CPU)
        grad_max = (torch.stack([g.abs().max() for g in grads]).float() if want_layers else grad_sq[:0])
        # A stop request (SIGINT/SIGTERM on any rank) rides in the max-reduced part of the step's
        # one collective as the signal number: every rank learns the same request at the same
        # step, with no collective of its own. A fill, not a host copy.
        stop = torch.full((1,), float(STOP.signum or 0), device=dev)
        n_tok = float(t.seq_len)
        if masked:
            wt = torch.cat(weights)
            keep = wt > 0
            head_sum = torch.stack([(sl * n_tok).sum(), (sl * sl).sum(), (lz * wt).sum(), wt.sum()])
            big = torch.full_like(sl, float("inf"))
            head_max = torch.stack([torch.where(keep, sl, -big).max(), -torch.where(keep, sl, big).min()])
        else:
            head_sum = torch.stack([(sl * n_tok).sum(), (sl * sl).sum(), lz.sum(),
                                    torch.full((), float(len(sl)), device=dev)])  # a fill, not a copy
            head_max = torch.stack([sl.max(), -sl.min()])
        prev = self.pending.norms
        sum_parts = [grad_sq, head_sum]
        if prev is not None:
            sum_parts += [prev[3], prev[4]]
        vec_sum = torch.cat(sum_parts)
        vec_max = torch.cat([grad_max, head_max, stop])
        if info.distributed:
            both = torch.cat([vec_sum, vec_max])
            out = [torch.empty_like(both) for _ in range(info.world_size)]
            dist.all_gather(out, both)
            stacked = torch.stack(out)
            n_sum = vec_sum.numel()
            vec_sum = stacked[:, :n_sum].sum(0)
            vec_max = stacked[:, n_sum:].max(0).values
        P = len(self.params)
        g_sq, head = vec_sum[:P], vec_sum[P:P + 4]
        n_gmax = grad_max.numel()
        g_max, hmax = vec_max[:n_gmax], vec_max[n_gmax:n_gmax + 2]
        self.stop_flag = vec_max[-1]
        if prev is not None:
            self._emit_layers(prev[0], prev[1], prev[2], vec_sum[P + 4:2 * P + 4], vec_sum[2 * P + 4:])
            self.pending.norms = None
        grad_norm = g_sq.sum().sqrt()
        clipped = torch.zeros((), device=dev)
        if cfg.optim.clip_grad > 0:
            coef = (cfg.optim.clip_grad / (grad_norm + 1e-6)).clamp(max=1.0)
            clipped = (coef < 1.0).float()
            torch._foreach_mul_(grads, coef)
        lr = lr_at(step, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, t.max_steps)
        if step in f.lr_spike_steps:
            lr *= f.lr_spike_factor
            if self.sink is not None and info.is_main:
                self.sink.log_event("fault_injected", step=step, severity="warning",
                                    detail={"kind": "lr_spike", "factor": f.lr_spike_factor, "lr": lr})
        for group in self.opt.param_groups:
            group["lr"] = lr
        n_samples = head[3]
        loss = head[0] / (n_samples * n_tok)
        mean = head[0] / (n_samples * n_tok)
        loss_std = (head[1] / n_samples - mean * mean).clamp(min=0).sqrt()
        logz_mean = head[2] / n_samples
        apply = None
        if step in self.skip_steps:
            apply = torch.zeros((), dtype=torch.bool, device=dev)
        flag = torch.zeros((), dtype=torch.bool, device=dev)
        if self.guard is not None:
            decision, flag = self.guard.observe(loss, grad_norm)
            if self.guard.action != "log":
                apply = decision if apply is None else apply & decision
        norms = self.opt.step(apply=apply, norms_for=self.params if want_layers else None)
        self.opt.zero_grad(set_to_none=True)
        if want_layers:
            self.pending.norms = (step, g_sq, g_max, norms[0], norms[1])
        applied = torch.ones((), device=dev) if apply is None else apply.float()
        vec = torch.stack([loss, grad_norm, clipped, hmax[1].neg(), hmax[0], loss_std, logz_mean, applied,
                           flag.float()])
        peak_mem = None
        if dev.type == "cuda":  # allocator statistics: host-side counters, no device sync
            peak_mem = torch.cuda.max_memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        self.pending.steps.append((step, lr, t.global_batch_size * t.seq_len, batch_hash(ids), vec, peak_mem))
        if cfg.audit.sample_stats:
            mine = np.concatenate(id_chunks) if id_chunks else np.zeros(0, dtype=np.int64)
            self.pending.samples.append((step, mine, sl, info.rank * len(mine)))

    def _emit_layers(self, step: int, g_sq: torch.Tensor, g_max: torch.Tensor, p_sq: torch.Tensor,
                     u_sq: torch.Tensor) -> None:
        # squares as reduced; roots and ratios are taken on the host at flush (one op per step here)
        self.pending.layers.append((step, torch.stack([g_sq, p_sq, u_sq, g_max], dim=1)))

    def reduce_leftover_norms(self) -> None:
        """The last layer-stats step has no next step to carry its norms: reduce them now."""
        prev = self.pending.norms
        if prev is None:
            return
        vec = torch.cat([prev[3], prev[4]])
        if self.info.distributed:
            dist.all_reduce(vec)
        P = len(self.params)
        self._emit_layers(prev[0], prev[1], prev[2], vec[:P], vec[P:])
        self.pending.norms = None

    # ---- flush --------------------------------------------------------------------------------
    def flush(self, times: dict[int, float]) -> list[dict]:
        """Move pending statistics to the host (one transfer per kind) and hand them to the sink."""
        rows: list[dict] = []
        pend = self.pending
        if pend.steps:
            host = torch.stack([s[4] for s in pend.steps]).double().cpu().numpy()
            for (step, lr, tokens, bh, _, peak_mem), vals in zip(pend.steps, host):
                dt = times.get(step, float("nan"))
                r = dict(zip(STEP_FIELDS, (float(v) for v in vals)))
                r.update(step=step, lr=lr, tokens=tokens, batch_hash=bh, step_time_s=dt,
                         tokens_per_s=tokens / dt if dt and dt == dt else None)
                r["skipped"] = r.pop("applied") < 0.5
                r["clipped"] = r["clipped"] > 0.5
                r["guard_flag"] = r["guard_flag"] > 0.5
                tps = r["tokens_per_s"]
                r["mfu"] = (self.fpt * tps / (self.peak * self.info.world_size)) if (self.peak and tps) else None
                r["peak_mem_bytes"] = peak_mem
                rows.append(r)
            pend.steps.clear()
        if self.sink is None:
            pend.samples.clear()
            pend.layers.clear()
            return rows
        if rows and self.info.is_main:
            cols = {k: [r[k] for r in rows] for k in rows[0] if k != "guard_flag"}
            self.sink.log_steps(cols)
            self._log_guard_events(rows)
        if pend.samples:
            losses = torch.cat([s[2] for s in pend.samples]).double().cpu().numpy()
            steps = np.concatenate([np.full(len(s[1]), s[0]) for s in pend.samples])
            ids = np.concatenate([s[1] for s in pend.samples])
            pos = np.concatenate([np.arange(len(s[1])) + s[3] for s in pend.samples])
            self.sink.log_samples({  # numpy columns: the writer hands them to Arrow as they are
                "step": steps, "rank": np.full(len(ids), self.info.rank), "sample_id": ids,
                "batch_pos": pos, "loss": losses, "n_tokens": np.full(len(ids), self.cfg.train.seq_len)})
            pend.samples.clear()
        if pend.layers and self.info.is_main:
            sq = torch.stack([m for _, m in pend.layers]).double().cpu().numpy().reshape(-1, 4)
            n = len(self.param_names)
            gn, pn, un = np.sqrt(sq[:, 0]), np.sqrt(sq[:, 1]), np.sqrt(sq[:, 2])
            self.sink.log_layer_stats({
                "step": np.repeat(np.array([s for s, _ in pend.layers], dtype=np.int64), n),
                "param": self.param_names * len(pend.layers), "grad_norm": gn, "param_norm": pn,
                "update_norm": un, "update_ratio": un / np.maximum(pn, 1e-30), "grad_max_abs": sq[:, 3].copy()})
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
    def _log_flags(self, rows: list[dict]) -> None:
        """guard.action=log: the guard's rule on the host, over the flushed values. One
        vectorised pass scores the whole flush (a per-row loop of medians cost ~4 ms a row,
        which the next step paid in full)."""
        import math

        from k2repro.core.spike import RobustZ, robust_z_flag_rows

        g = self.cfg.guard
        rule = RobustZ(short_window=g.short_window, long_window=g.long_window, threshold=g.threshold,
                       min_history=g.min_history)
        values = [r["loss"] if g.signal == "loss" else r["grad_norm"] for r in rows]
        hist = self.log_history + values
        start = len(self.log_history)
        # A kept history is never shorter than history_needed >= min_history once truncated,
        # so row indices below min_history only occur while it still starts at step 1.
        flags = robust_z_flag_rows(hist, start, rule)
        self.log_history = hist[-rule.history_needed:]
        for r, flag in zip(rows, flags):
            nonfinite = not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]))
            r["guard_flag"] = bool(r["guard_flag"] or nonfinite or flag)

    def _log_guard_events(self, rows: list[dict]) -> None:
        g = self.cfg.guard
        if g.action == "log":
            self._log_flags(rows)
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
            self.writer_cpu_s += self.sink.writer_cpu_s
            self.sink = None
        self.pending = Pending()
        manifest, state = ckpt.load_checkpoint(path, self.model, self.opt, self.info.rank, self.info.world_size)
        self.sampler.load_state_dict(state.get("sampler", {}))
        self.sampler.deferred = sorted(set(self.sampler.deferred) | set(window))
        if self.guard is not None and state.get("guard") is not None:
            self.guard.load_state_dict(state["guard"])
        if int(manifest["world_size"]) == self.info.world_size:
            ckpt.set_rng_state(state["rng"])
        self.rollbacks += 1
        self.run_id, self.parent_run_id, self.start_step = new_id, old_id, c
        self.resumed_from = str(path)
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
        cfg, info = self.cfg, self.info
        t, a = cfg.train, cfg.audit
        last = t.stop_at_step or t.max_steps
        flush_every = a.flush_every if self.sink is not None else max(1, t.log_every)
        if self.guard is not None and self.guard.action in ("rollback", "abort"):
            flush_every = min(flush_every, max(1, cfg.ckpt.interval or flush_every))
        times: dict[int, float] = {}
        history: list[dict] = []
        step = self.start_step
        self.progress.steps(step, last)
        t_prev = time.perf_counter()
        while step < last:
            step += 1
            want_layers = bool(self.sink is not None and a.layer_stats_every and step % a.layer_stats_every == 0)
            agreed = self.stop_flag  # the previous step's: read one step late, so the host
            self.train_step(step, want_layers)  # never waits on this step's collective
            if agreed is not None and (sig := int(agreed.item())):
                self.interrupted, last = sig, step
            now = time.perf_counter()
            times[step] = now - t_prev
            t_prev = now
            if step % flush_every == 0 or step == last:
                if step == last:
                    self.reduce_leftover_norms()
                t_flush = time.perf_counter()
                rows = self.flush(times)
                self.flush_s += time.perf_counter() - t_flush
                times.clear()
                F.maybe_kill(cfg.faults, step, info.rank, "flush")
                history.extend(rows)
                if info.is_main and rows:
                    r = rows[-1]
                    self.progress.step_line(
                        f"step {r['step']:>6}/{t.max_steps}  loss {r['loss']:.4f}  grad_norm {r['grad_norm']:.3f}"
                        f"  lr {r['lr']:.2e}  tok/s {r['tokens_per_s'] or 0:,.0f}", len(rows))
                back = self.guard_act(rows)
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
        return history


class Terminated(Exception):
    """SIGTERM from the launcher (torchrun stops the other ranks when one fails)."""


class StopRequest:
    """The signal (SIGINT/SIGTERM) asking this rank to stop cleanly; 0 while none came."""

    signum: int = 0


STOP = StopRequest()


def _on_signal(signum: int, frame) -> None:  # noqa: ANN001
    """Ctrl-C or a preemption: note it; the loop stops at a step all ranks agree on, flushes
    and checkpoints. `k2repro train` creates K2REPRO_STOP_FILE before it forwards a signal, so
    a SIGTERM without it is torchrun stopping the survivors of a failed rank: stop at once."""
    stop_file = os.environ.get("K2REPRO_STOP_FILE")
    if signum == signal.SIGTERM and stop_file and not os.path.exists(stop_file):
        raise Terminated("terminated by SIGTERM (the launcher stops every rank when one fails)")
    if not STOP.signum:
        STOP.signum = int(signum)


def _exit_file(code: int) -> None:
    path = os.environ.get("K2REPRO_EXIT_FILE")
    if path:
        try:
            with open(f"{path}.{os.environ.get('RANK', '0')}", "w") as fh:
                fh.write(str(code))
        except OSError:
            pass


def run_training(cfg: RunConfig, run_id: str | None = None) -> tuple[int, str, list[dict]]:
    """Train in this process (one rank of a torchrun launch, or world size 1).
    Returns (exit code, run id, step rows seen on this rank)."""
    info = init_distributed(cfg.parallel.backend)
    if threading.current_thread() is threading.main_thread():
        STOP.signum = 0
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    trainer = None
    announced = False  # run_id= printed (stdout: what scripts read)
    rid = run_id or os.environ.get("K2REPRO_RUN_ID") or new_run_id(cfg.run.name)
    rid = broadcast_object(rid, info)
    try:
        trainer = Trainer(cfg, info, rid, progress=TrainProgress(info.is_main))
        if cfg.train.resume:
            trainer.resume(cfg.train.resume)
        trainer.start_audit()
        if info.is_main:  # once the run is recorded: an error before it names no run
            print(f"run_id={rid}", flush=True)
            announced = True
        history = trainer.fit()
        trainer.progress.close()
        barrier(info)
        if trainer.sink is not None:
            trainer.sink.close("interrupted" if trainer.interrupted else "completed")
            trainer.writer_cpu_s += trainer.sink.writer_cpu_s
        if trainer.interrupted:
            name = signal.Signals(trainer.interrupted).name
            if info.is_main:
                print(f"k2repro train: interrupted by {name} at step {trainer.saved_step}"
                      f"/{cfg.train.max_steps}; checkpoint saved; continue with: k2repro train "
                      f"train.resume={trainer.run_id} (and the same overrides)", file=sys.stderr, flush=True)
            return 128 + trainer.interrupted, trainer.run_id, history
        timings = os.environ.get("K2REPRO_TIMINGS_FILE")  # benchmarks: rank 0's step wall times
        if timings:
            if info.is_main:
                Path(timings).write_text(json.dumps([[r["step"], r["step_time_s"]] for r in history]))
            # and every rank's own audit work (bench/audit_overhead.py): loop-thread flush wall
            # time and the writer thread's CPU time, over the whole run
            Path(f"{timings}.r{info.rank}.json").write_text(json.dumps({
                "steps": len(history), "flush_s": trainer.flush_s, "writer_cpu_s": trainer.writer_cpu_s}))
        return 0, rid, history
    except GuardAbort as exc:
        if trainer is not None and trainer.sink is not None:
            trainer.sink.close("failed", error=f"GuardAbort: {exc}")
        print(f"k2repro train: spike guard aborted: {exc}", file=sys.stderr)
        return exc.exit_code, rid, []
    except K2ReproError as exc:
        if trainer is not None and trainer.sink is not None:
            trainer.sink.close("failed", error=f"{type(exc).__name__}: {exc}")
        if info.is_main:
            print(f"k2repro train: error: {exc}", file=sys.stderr)
        return exc.exit_code, rid, []
    except Exception as exc:
        from k2repro.audit.redact import scrub_text

        if isinstance(exc, OSError) or isinstance(exc.__cause__, OSError):
            # the machine, not the code (a full disk, also under the audit writer; a folder that
            # cannot be made): one line on the rank that met it, credentials scrubbed
            msg = scrub_text(f"{type(exc).__name__}: {exc}")
            _end_failed(trainer, msg)
            _announce_failed(trainer, rid, announced)
            where = f" (rank {info.rank})" if info.world_size > 1 else ""
            print(f"k2repro train: error{where}: {msg}", file=sys.stderr, flush=True)
            return 1, rid, []
        # a bug: its traceback is worth having, but scrubbed like everything k2repro writes
        tb = scrub_text(traceback.format_exc())
        _end_failed(trainer, tb)
        _announce_failed(trainer, rid, announced)
        print(tb, file=sys.stderr, end="", flush=True)
        return 1, rid, []
    finally:
        if trainer is not None:
            trainer.progress.close()
        teardown()


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
    config_name = os.environ.get("K2REPRO_CONFIG_NAME", "config")
    if argv and argv[0] == "--config-name":
        config_name, argv = argv[1], argv[2:]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    params = os.environ.get("K2REPRO_PARAMS_FILE")
    try:
        cfg = (load_params_file(params, argv, world) if params else load_config(argv, config_name, world_size=world))
    except K2ReproError as exc:
        print(f"k2repro train: error: {exc}", file=sys.stderr)
        _exit_file(exc.exit_code)
        return exc.exit_code
    code, _, _ = run_training(cfg)
    _exit_file(code)
    return code


__all__ = ["Trainer", "build_model", "run_training", "main", "CheckpointError"]
