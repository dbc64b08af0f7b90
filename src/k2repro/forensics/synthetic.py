"""Synthetic audit logs with spikes of known kind and onset: the ground truth that the
forensics tests and the bench check against, and a demo that needs no training.

The run is a smooth loss curve (fast-falling early, then flat) with noise, per-sample losses
whose token-weighted mean is the step loss, grad norms, an lr schedule, log Z, and per-tensor
layer statistics that respond to each kind of spike the way a real run's do:
- `bad_batch`: a share of the step's samples has loss near ln(vocab); their gradient blows
  up the grad norm of that step (mostly in the embedding and first block); the update then
  raises the loss of the next steps a little (transient).
- `lr_spike`: the lr of one step is multiplied; every tensor's update ratio jumps on that
  step and the loss of every sample rises on the next ones (not data).
- `grad_lead`: the grad norm rises `lead` steps before the loss spikes (OLMo 2's pattern).
- `nan`: the loss is NaN from that step on.
- `plateau`: the loss settles `size` higher from that step on (persistent).
- `slow`: a jump that decays over `decay` steps.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
KINDS = ("bad_batch", "lr_spike", "grad_lead", "nan", "plateau", "slow", "bump")


@dataclass(frozen=True)
class InjectedSpike:
    kind: str
    step: int
    size: float = 1.0       # loss excess (nats) at the peak; lr factor for lr_spike
    decay: float = 4.0      # e-folding steps of the excess
    fraction: float = 0.25  # bad_batch: share of the samples replaced
    lead: int = 2           # grad_lead: steps by which the grad norm leads


@dataclass(frozen=True)
class SyntheticRun:
    run_id: str = "synthetic"
    n_steps: int = 600
    seed: int = 0
    loss_floor: float = 3.0
    loss_amp: float = 7.0
    tau: float = 80.0
    noise: float = 0.03
    batch: int = 16
    world_size: int = 2
    seq_len: int = 128
    vocab: int = 512
    lr: float = 3e-3
    warmup: int = 10
    n_params: int = 6
    layer_every: int = 1
    spikes: tuple[InjectedSpike, ...] = ()
    with_layers: bool = True
    with_samples: bool = True
    loss_only: bool = False
    extra_hparams: dict = field(default_factory=dict)
    extra_events: tuple[dict, ...] = ()  # e.g. {"step": 300, "kind": "rollback"}
    sample_id_mod: int = 0  # > 0: sample ids wrap around a packed dataset of this many samples


def param_names(n: int) -> list[str]:
    """Names like a llama's: embedding, blocks, head."""
    base = ["tok_embeddings.weight"]
    i = 0
    while len(base) < n - 1:
        base.append(f"layers.{i // 2}.{'attention.wqkv' if i % 2 == 0 else 'feed_forward.w13'}.weight")
        i += 1
    base.append("output.weight")
    return base[:n]


def _sample_id(spec: SyntheticRun, step: Any, j: Any) -> Any:
    """The id of the sample at batch position j of `step` (wrapping at sample_id_mod)."""
    v = (step - 1) * spec.batch + j
    return v % spec.sample_id_mod if spec.sample_id_mod else v


@dataclass
class _Effects:
    """What the injected spikes do to the run, per step (index step - 1)."""

    excess: np.ndarray                 # raises every sample's loss
    bad: dict[int, np.ndarray]         # step index -> bad sample positions
    gfac: np.ndarray                   # grad-norm factor
    lr_fac: np.ndarray                 # lr factor
    layer_focus: dict[int, float]      # step index -> grad factor of the first third of tensors
    nan_from: int | None
    events: list[dict]


def _effects(spec: SyntheticRun, rng: np.random.Generator) -> _Effects:
    """Each injected spike's effect on the loss, grad norm and lr, and the fault events a
    trainer would have recorded (bad_batch draws its positions from `rng`)."""
    n, B = spec.n_steps, spec.batch
    fx = _Effects(np.zeros(n), {}, np.ones(n), np.ones(n), {}, None, [])
    for s in spec.spikes:
        k = s.step - 1
        after = np.arange(n) - k
        if s.kind == "bad_batch":
            m = max(1, int(round(s.fraction * B)))
            pos = np.sort(rng.choice(B, size=m, replace=False))
            fx.bad[k] = pos
            fx.gfac[k] *= 8.0
            fx.layer_focus[k] = 8.0
            fol = after >= 1
            fx.excess[fol] += 0.3 * s.size * np.exp(-(after[fol] - 1) / s.decay)
            fx.events.append({"step": s.step, "kind": "fault_injected", "severity": "warning",
                              "detail": {"kind": "bad_batch", "bad_batch_kind": "random",
                                         "sample_ids": [int(_sample_id(spec, s.step, j)) for j in pos],
                                         # as the trainer records it: batch positions, data position
                                         "positions": [int(j) for j in pos], "data_position": s.step}})
        elif s.kind == "lr_spike":
            fx.lr_fac[k] *= s.size if s.size > 1 else 50.0
            fol = after >= 1
            fx.excess[fol] += 1.0 * np.exp(-(after[fol] - 1) / s.decay)
            fx.gfac[k + 1: k + 4] *= 3.0
            fx.events.append({"step": s.step, "kind": "fault_injected", "severity": "warning",
                              "detail": {"kind": "lr_spike", "factor": float(fx.lr_fac[k]), "sample_ids": []}})
        elif s.kind == "grad_lead":
            for j in range(s.lead, 0, -1):
                fx.gfac[k - j] *= 1.0 + 4.0 * (s.lead - j + 1)
            fol = after >= 0
            fx.excess[fol] += s.size * np.exp(-after[fol] / s.decay)
            fx.gfac[k] *= 6.0
        elif s.kind == "nan":
            fx.nan_from = k if fx.nan_from is None else min(fx.nan_from, k)
            fx.events.append({"step": s.step, "kind": "fault_injected", "severity": "warning",
                              "detail": {"kind": "nan", "sample_ids": []}})
        elif s.kind == "plateau":
            fx.excess[after >= 0] += s.size
            fx.gfac[k] *= 3.0
        elif s.kind in ("slow", "bump"):
            fol = after >= 0
            fx.excess[fol] += s.size * np.exp(-after[fol] / s.decay)
        else:
            raise ValueError(f"unknown synthetic spike kind {s.kind!r} (one of {KINDS})")
    return fx


def generate(spec: SyntheticRun) -> dict[str, Any]:
    """The run's tables as dicts of numpy arrays / lists (column -> values)."""
    rng = np.random.default_rng(spec.seed)
    n = spec.n_steps
    t = np.arange(1, n + 1, dtype=np.int64)
    clean = spec.loss_floor + spec.loss_amp * np.exp(-t / spec.tau)
    lr = spec.lr * np.minimum(1.0, t / max(spec.warmup, 1)) * (0.55 + 0.45 * np.cos(np.pi * t / n))
    gnorm = 1.0 + 2.0 * np.exp(-t / (0.5 * spec.tau))
    logz = 1.0 + 0.002 * t
    B = spec.batch
    fx = _effects(spec, rng)
    lr = lr * fx.lr_fac
    # per-sample losses; the step loss is their token-weighted mean
    per = clean[:, None] + fx.excess[:, None] + rng.normal(0.0, spec.noise * np.sqrt(B), (n, B))
    ntok = np.full((n, B), spec.seq_len, dtype=np.int64)
    for k, pos in fx.bad.items():
        per[k, pos] = np.log(spec.vocab) + 4.0 + rng.normal(0.0, 0.1, pos.size)
    loss = per.mean(axis=1)
    g = gnorm * fx.gfac * np.exp(rng.normal(0.0, 0.05, n))
    lz = logz + rng.normal(0.0, 0.01, n)
    if fx.nan_from is not None:
        loss[fx.nan_from:] = np.nan
        per[fx.nan_from:] = np.nan
        g[fx.nan_from:] = np.nan
    steps = {
        "step": t, "loss": loss, "grad_norm": g, "lr": lr, "tokens": np.full(n, B * spec.seq_len),
        "loss_min": per.min(axis=1), "loss_max": per.max(axis=1), "loss_std": per.std(axis=1),
        "logz_mean": lz, "skipped": np.zeros(n, dtype=bool),
        "batch_hash": [f"{spec.seed:04x}{i:012x}" for i in t],
    }
    events = fx.events + [{"severity": "warning", "detail": {}, **e} for e in spec.extra_events]
    events.sort(key=lambda e: e["step"])
    out: dict[str, Any] = {"steps": steps, "events": events}
    if spec.loss_only:
        for c in ("grad_norm", "lr", "loss_min", "loss_max", "loss_std", "logz_mean"):
            steps[c] = np.full(n, np.nan)
        steps["tokens"] = np.zeros(n, dtype=np.int64)
        out["events"] = []
        return out
    if spec.with_samples:
        out["sample_stats"] = {
            "step": np.repeat(t, B), "rank": np.tile(np.arange(B) % spec.world_size, n).astype(np.int32),
            "sample_id": _sample_id(spec, t[:, None], np.arange(B)[None, :]).ravel(), "loss": per.ravel(),
            "n_tokens": ntok.ravel(),
        }
    focus = np.ones(n)
    for k, f in fx.layer_focus.items():
        focus[k] = f
    # what per-tensor statistics are made of (the bench builds 100M rows of them in DuckDB)
    out["drivers"] = {"step": t, "grad_norm": g, "lr": lr, "focus": focus}
    if spec.with_layers:
        out["layer_stats"] = _layer_stats(spec, rng, t, g, lr, focus)
    return out


def _layer_stats(spec: SyntheticRun, rng: np.random.Generator, t: np.ndarray, g: np.ndarray, lr: np.ndarray,
                 focus: np.ndarray) -> dict[str, Any]:
    """Per-tensor statistics every `layer_every` steps: grad norms follow the step's grad
    norm (the first third of the tensors take a bad batch's focus), updates follow the lr."""
    names = param_names(spec.n_params)
    ls_steps = t[(t - 1) % spec.layer_every == 0]
    idx = ls_steps - 1
    P = len(names)
    w = np.linspace(1.0, 0.3, P)
    gn = g[idx, None] * w[None, :] * np.exp(rng.normal(0.0, 0.05, (idx.size, P)))
    gn[:, : max(1, P // 3)] *= focus[idx, None]
    pn = 10.0 * w[None, :] * (1.0 + 0.0005 * ls_steps[:, None])
    un = lr[idx, None] * np.sqrt(w[None, :]) * 30.0 * np.exp(rng.normal(0.0, 0.05, (idx.size, P)))
    return {
        "step": np.repeat(ls_steps, P), "param": names * idx.size,
        "grad_norm": gn.ravel(), "param_norm": pn.ravel(), "update_norm": un.ravel(),
        "update_ratio": (un / pn).ravel(), "grad_max_abs": (0.1 * gn).ravel(),
    }


def write_run(root: str | os.PathLike, spec: SyntheticRun) -> Path:
    """Write the synthetic run into a store at `root` (contract layout); returns its folder."""
    import pyarrow as pa

    data = generate(spec)
    rid = spec.run_id
    tables: dict[str, pa.Table] = {}
    tables["runs"] = pa.table({
        "run_id": [rid], "name": [rid],
        "source": ["import:csv" if spec.loss_only else "train"],
        "parent_run_id": pa.array([None], pa.string()), "resumed_from_step": pa.array([None], pa.int64()),
        "world_size": pa.array([spec.world_size], pa.int32()),
    })
    hp = {"train.seed": spec.seed, "train.max_steps": spec.n_steps,
          "audit.layer_stats_every": spec.layer_every, "model.vocab_size": spec.vocab,
          **spec.extra_hparams}
    if not spec.loss_only:
        tables["hparams"] = pa.table({"run_id": [rid] * len(hp), "key": list(hp),
                                      "value": [str(v) for v in hp.values()],
                                      "value_type": [type(v).__name__ for v in hp.values()]})
    st = data["steps"]
    tables["steps"] = pa.table({"run_id": [rid] * len(st["step"]), **{k: v for k, v in st.items()}})
    if data["events"]:
        ev = data["events"]
        tables["events"] = pa.table({
            "run_id": [rid] * len(ev), "time": pa.array([T0 + timedelta(seconds=e["step"]) for e in ev],
                                                    pa.timestamp("us", tz="UTC")),
            "rank": pa.array([0] * len(ev), pa.int32()), "step": [e["step"] for e in ev],
            "kind": [e["kind"] for e in ev],
            "severity": [e["severity"] for e in ev], "detail": [json.dumps(e["detail"]) for e in ev],
        })
    for name in ("sample_stats", "layer_stats"):
        if name in data:
            d = data[name]
            tables[name] = pa.table({"run_id": [rid] * len(d["step"]), **d})
    return write_tables(root, rid, tables)


def write_tables(root: str | os.PathLike, run_id: str, tables: dict[str, Any]) -> Path:
    """Write whole tables of one run with the audit store's writer (atomic, schema-checked)."""
    from k2repro.audit.writer import write_run_tables

    return write_run_tables(root, run_id, tables)
