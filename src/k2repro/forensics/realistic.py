"""Realistic, labelled training logs: the ground truth of the forensics benchmark
(`bench/forensics_truth.py`). This module builds one log from a curve, spikes and a sampling
mode; `realistic_categories.py` has the benchmark's categories of such logs.

`synthetic.py` builds a complete k2repro run (samples, layers) with injected faults; this
module builds what an *import* looks like instead: a tracker's export of loss and grad norm,
with the habits of real pretraining logs that the forensics must survive:

- a loss that starts near ln(vocab), falls as a power law of the cumulative learning rate
  (so it falls slowly during warmup), with slow drift (data-mixture changes) and plateaus
  (stretches where it stalls), and noise that shrinks over training;
- single-step data spikes, short transients, multi-hundred-step spikes that recover
  (benign) or settle at a higher level / run away (malignant), grad-norm bursts the loss does
  not show, isolated NaN points (an overflowed step that was skipped), restarts that branch:
  the run is stopped after a spike and a second tracker run re-covers the steps from a
  checkpoint before it, where the spike does not recur (so the original spike is malignant,
  PaLM's and K2's experience);
- logging every N steps, W&B-style down-sampling to a fixed number of points (with the
  `__MIN`/`__MAX` envelope of each bucket), sparse logging with dense bursts around
  incidents, gaps.

Every log carries its labels: the true spikes (onset, peak, end, class, severity, signal,
and whether the logged points can show it at all) and the noise-free level at every step,
so a baseline can be checked. Everything is deterministic from the seed.

Label rules (in steps, as docs/forensics.md's classes): a spike's onset is the first step
whose excess over the noise-free level reaches 3 noise sigmas (`start_step` is where the
excess begins: a ramp over 30 steps is not visible in its first steps); its end is the first step
after its peak where the excess is back within one noise sigma; transient = recovered
within 50 steps of onset, slow = within 1,000, persistent = not (or not before its run
ends), divergence = runs away or turns non-finite. Severity: benign when it recovered by
itself; malignant when it did not, or when the run was restarted from before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

LN_VOCAB = math.log(32000.0)
TRANSIENT_STEPS = 50
SLOW_STEPS = 1000
#: a labelled spike is visible when a logged point inside it is at least this many noise
#: sigmas above the clean level (well above the 6-sigma rules, so "invisible" is not a
#: judgement call)
VISIBLE_SIGMA = 8.0

#: the labelled onset of a spike that ramps up: the first step whose excess reaches this
ONSET_SIGMA = 3.0
#: a run-away loss turns NaN once its excess passes this (nats)
DIVERGE_NAN = 20.0

SPIKE_KINDS = ("data", "short", "slow", "persistent", "divergence", "nan", "grad_burst")


@dataclass(frozen=True)
class TrueSpike:
    """One labelled spike. Steps are training steps; `run` is the tracker run it is on."""

    run: str
    kind: str
    onset_step: int
    peak_step: int
    end_step: int
    cls: str
    severity: str
    signal: str = "loss"
    excess: float = 0.0          # peak - clean level (nats for the loss; x-fold - 1 for grad)
    visible: bool = True
    reason: str = ""
    start_step: int = 0          # where the excess begins (onset_step: where it reaches 3 sigma)

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "kind": self.kind, "onset_step": self.onset_step,
                "peak_step": self.peak_step, "end_step": self.end_step, "class": self.cls,
                "severity": self.severity, "signal": self.signal,
                "excess": round(float(self.excess), 6), "visible": self.visible,
                "reason": self.reason, "start_step": self.start_step}


@dataclass
class TrackerRun:
    """One tracker run of a log: its logged points. `loss`/`grad_norm` are NaN where a NaN
    was logged; `loss_min`/`loss_max` are the W&B bucket envelope (None when not sampled)."""

    label: str
    steps: np.ndarray
    loss: np.ndarray
    grad_norm: np.ndarray
    loss_min: np.ndarray | None = None
    loss_max: np.ndarray | None = None
    resumed_from: str | None = None       # label of the run it restarted from
    resumed_from_step: int | None = None
    # noise-free level and noise sigma at every logged point (for checking baselines)
    clean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sigma: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # noise-free level with every spike's excess (a spike on top of an earlier level shift
    # has the shifted level as its baseline)
    level: np.ndarray = field(default_factory=lambda: np.zeros(0))


@dataclass
class LabelledLog:
    name: str
    category: str
    seed: int
    sampling: str
    runs: list[TrackerRun]
    spikes: list[TrueSpike]
    note: str = ""

    def run(self, label: str) -> TrackerRun:
        return next(r for r in self.runs if r.label == label)

    def labels(self) -> dict[str, Any]:
        return {"name": self.name, "category": self.category, "seed": self.seed,
                "sampling": self.sampling, "note": self.note,
                "runs": [{"label": r.label, "points": int(r.steps.size),
                          "first_step": int(r.steps[0]), "last_step": int(r.steps[-1]),
                          "resumed_from": r.resumed_from, "resumed_from_step": r.resumed_from_step}
                         for r in self.runs],
                "spikes": [s.to_dict() for s in self.spikes]}


# ----------------------------------------------------------------------------- the curve

@dataclass(frozen=True)
class Curve:
    """A spike-free training curve, dense over steps 1..n_steps."""

    n_steps: int = 20_000
    floor: float = 2.2
    tau: float = 40.0            # steps of cumulative lr at which the loss has fallen a lot
    alpha: float = 0.55
    warmup: int = 500
    sigma_final: float = 0.02    # per-step noise at the end of training
    sigma_boost: float = 3.0     # noise at step 0 is (1 + boost) x sigma_final
    drift_amp: float = 0.01      # slow sinusoidal drift (data mixture)
    drift_period: float = 8000.0
    drift_phase: float = 0.0
    plateaus: tuple[tuple[int, int], ...] = ()   # (start, length): the loss stalls
    grad_floor: float = 0.25
    grad_amp: float = 2.0

    def dense(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(steps, clean loss, sigma, clean grad norm) for steps 1..n_steps."""
        s = np.arange(1, self.n_steps + 1, dtype=np.int64)
        lr = np.minimum(1.0, s / max(self.warmup, 1))
        for a, ln in self.plateaus:
            lr[(s >= a) & (s < a + ln)] = 0.0
        u = np.cumsum(lr)
        clean = self.floor + (LN_VOCAB - self.floor) * (1.0 + u / self.tau) ** (-self.alpha)
        clean = clean + self.drift_amp * np.sin(2 * np.pi * s / self.drift_period + self.drift_phase)
        sigma = self.sigma_final * (1.0 + self.sigma_boost / np.sqrt(1.0 + s / 200.0))
        grad = self.grad_floor + self.grad_amp * (1.0 + u / self.tau) ** (-0.7)
        return s, clean, sigma, grad


def random_curve(rng: np.random.Generator, n_steps: int) -> Curve:
    n_pl = int(rng.integers(0, 3))
    plateaus = []
    for _ in range(n_pl):
        a = int(rng.integers(n_steps // 5, max(n_steps // 5 + 1, n_steps - n_steps // 5)))
        plateaus.append((a, int(rng.integers(max(50, n_steps // 100), max(51, n_steps // 15)))))
    sf = float(rng.uniform(0.01, 0.04))
    return Curve(
        n_steps=n_steps, floor=float(rng.uniform(1.8, 2.8)), tau=float(rng.uniform(20, 80)),
        alpha=float(rng.uniform(0.4, 0.7)), warmup=int(rng.integers(100, max(101, min(2000, n_steps // 10)))),
        sigma_final=sf, sigma_boost=float(rng.uniform(1.0, 4.0)),
        drift_amp=float(rng.uniform(0.5, 2.0) * sf), drift_period=float(rng.uniform(0.2, 0.6) * n_steps),
        drift_phase=float(rng.uniform(0, 2 * np.pi)), plateaus=tuple(sorted(plateaus)),
        grad_floor=float(rng.uniform(0.15, 0.4)), grad_amp=float(rng.uniform(1.0, 4.0)),
    )


# ----------------------------------------------------------------------------- spikes

@dataclass(frozen=True)
class SpikeSpec:
    kind: str
    step: int
    size: float = 0.5        # loss excess at the peak (nats); grad factor for grad_burst
    rise: int = 1            # steps from onset to peak
    decay: float = 100.0     # e-folding steps after the peak
    length: int = 1          # grad_burst: steps


def _apply(spec: SpikeSpec, n: int, sigma: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(loss excess, grad factor, nan mask) over the dense steps 1..n for one spike."""
    ex = np.zeros(n)
    gf = np.ones(n)
    nan = np.zeros(n, dtype=bool)
    k = spec.step - 1
    if spec.kind == "data":
        ex[k] = spec.size
        gf[k] = 4.0
    elif spec.kind in ("short", "slow"):
        r = max(spec.rise, 1)
        up = np.arange(r) + 1
        ex[k: k + r] = spec.size * up[: n - k] / r
        after = np.arange(n - (k + r))
        ex[k + r:] = spec.size * np.exp(-after / spec.decay)
        gf[k: k + r] = 3.0
    elif spec.kind == "persistent":
        r = max(spec.rise, 1)
        up = np.arange(r) + 1
        ex[k: k + r] = spec.size * up[: n - k] / r
        after = np.arange(n - (k + r))
        # settles at 80% of the jump: a higher plateau that never comes back
        ex[k + r:] = spec.size * (0.8 + 0.2 * np.exp(-after / 50.0))
        gf[k: k + r] = 3.0
    elif spec.kind == "divergence":
        after = np.arange(n - k)
        ex[k:] = spec.size * (np.exp(after / spec.decay) - 1.0) + spec.size
        gf[k:] = 1.0 + np.minimum(ex[k:], 50.0)
        cut = int(np.flatnonzero(ex > DIVERGE_NAN)[0]) if (ex > DIVERGE_NAN).any() else n
        nan[cut:] = True
    elif spec.kind == "nan":
        nan[k] = True
    elif spec.kind == "grad_burst":
        gf[k: k + max(spec.length, 1)] = spec.size
    else:
        raise ValueError(f"unknown spike kind {spec.kind!r} (one of {SPIKE_KINDS})")
    return ex, gf, nan


def _apply_all(spikes: tuple[SpikeSpec, ...], n: int, sigma: np.ndarray
               ) -> tuple[list[tuple[SpikeSpec, np.ndarray]], np.ndarray, np.ndarray, np.ndarray]:
    """(each spike with its loss excess, the summed excess, the grad factor, the nan mask)."""
    ex = np.zeros(n)
    gf = np.ones(n)
    nan = np.zeros(n, dtype=bool)
    parts = []
    for sp in spikes:
        e, g, m = _apply(sp, n, sigma)
        parts.append((sp, e))
        ex += e
        gf *= g
        nan |= m
    return parts, ex, gf, nan


def _label(run: str, spec: SpikeSpec, ex: np.ndarray, sigma: np.ndarray, stop: int,
           restarted: bool = False) -> TrueSpike:
    """The label of one spike from its dense excess, on a run whose last step is `stop`."""
    k = spec.step - 1
    if spec.kind == "grad_burst":
        end = spec.step + max(spec.length, 1) - 1
        return TrueSpike(run, spec.kind, spec.step, spec.step, end, "transient", "benign",
                         "grad_norm", spec.size - 1.0, reason="grad-norm burst, loss unmoved",
                         start_step=spec.step)
    if spec.kind == "nan":
        return TrueSpike(run, spec.kind, spec.step, spec.step, spec.step, "transient", "benign",
                         excess=float("inf"), reason="one non-finite step, the run went on",
                         start_step=spec.step)
    seg = ex[k:stop]
    peak = k + int(np.argmax(seg))
    if spec.kind == "divergence":
        over = np.flatnonzero(ex[k:stop] > DIVERGE_NAN)
        pk = k + int(over[0]) + 1 if over.size else stop
        return TrueSpike(run, spec.kind, spec.step, pk, stop, "divergence", "malignant",
                         excess=float(ex[pk - 1]), reason="runs away, then non-finite",
                         start_step=spec.step)
    back = np.flatnonzero(ex[peak:stop] <= sigma[peak:stop])
    if back.size:
        end = peak + int(back[0]) + 1
        dur = end - spec.step
        cls = "transient" if dur <= TRANSIENT_STEPS else "slow" if dur <= SLOW_STEPS else "persistent"
    else:
        end, cls = stop, "persistent"
    recovered = cls in ("transient", "slow")
    sev = "benign" if recovered and not restarted else "malignant"
    why = ("restarted from before the onset; the restart did not spike" if restarted
           else "recovered by itself" if recovered else "did not recover")
    # the onset is where the excess first reaches ONSET_SIGMA noise sigmas: a ramp over 30
    # steps starts, for any detector, where it leaves the noise, not at its first 0.1 sigma
    up = np.flatnonzero(ex[k: peak + 1] >= ONSET_SIGMA * sigma[k: peak + 1])
    onset = k + int(up[0]) + 1 if up.size else peak + 1
    return TrueSpike(run, spec.kind, onset, peak + 1, end, cls, sev,
                     excess=float(ex[peak]), reason=why, start_step=spec.step)


# ----------------------------------------------------------------------------- sampling

def sample_points(n: int, mode: str, rng: np.random.Generator,
                  incidents: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray | None]:
    """Logged steps (1-based) of a dense run of n steps, and for W&B buckets the bucket id
    of every dense step (to build the envelope).

    modes: `every:N` (steps 1, N, 2N, ...), `wandb:K` (K buckets of consecutive steps, the
    first step of each logged, as W&B's sampled history), `sparse:G` (a point every G steps
    plus every step from 20 before to 400 after each incident), `gaps:N` (every N steps with
    two to four missing stretches of 3-8% of the run).
    """
    s = np.arange(1, n + 1, dtype=np.int64)
    kind, _, arg = mode.partition(":")
    val = int(arg) if arg else 1
    if kind == "every":
        keep = (s % val == 0) | (s == 1)
        return s[keep], None
    if kind == "wandb":
        if n <= val:
            return s, None
        bucket = (np.arange(n) * val) // n
        first = np.flatnonzero(np.diff(np.concatenate(([-1], bucket))) != 0)
        return s[first], bucket
    if kind == "sparse":
        keep = (s % val == 0) | (s == 1)
        for inc in incidents:
            keep |= (s >= inc - 20) & (s <= inc + 400)
        return s[keep], None
    if kind == "gaps":
        keep = (s % val == 0) | (s == 1)
        for _ in range(int(rng.integers(2, 5))):
            a = int(rng.integers(n // 10, n - n // 10))
            keep &= ~((s >= a) & (s < a + int(rng.uniform(0.03, 0.08) * n)))
        return s[keep], None
    raise ValueError(f"unknown sampling mode {mode!r}")


# ----------------------------------------------------------------------------- one log

def build_log(name: str, category: str, seed: int, n_steps: int, sampling: str,
              spikes: tuple[SpikeSpec, ...] = (), restart: tuple[int, int, int] | None = None,
              curve: Curve | None = None, note: str = "", bursts: tuple[int, ...] = ()
              ) -> LabelledLog:
    """One labelled log. `restart=(spike_step, back, stop_after)`: the first run is stopped
    `stop_after` steps after the spike at `spike_step`; a second run resumes from step
    `spike_step - back` (a checkpoint before it) to the end, without that spike. `bursts`:
    more steps around which sparse sampling logs densely (besides the spikes)."""
    rng = np.random.default_rng(seed)
    cv = curve or random_curve(rng, n_steps)
    s, clean, sigma, grad = cv.dense()
    n = s.size
    parts, ex, gf, nan = _apply_all(spikes, n, sigma)
    noise = rng.normal(0.0, 1.0, n) * sigma
    gnoise = np.exp(rng.normal(0.0, 0.08, n))
    loss = clean + ex + noise
    gn = grad * gf * gnoise
    loss[nan] = np.nan
    gn[nan] = np.nan
    incidents = tuple(sp.step for sp in spikes) + tuple(bursts)
    runs: list[TrackerRun] = []
    labels: list[TrueSpike] = []
    main = "run-a"
    if restart is None:
        stop = n
        runs.append(_sampled(main, s, loss, gn, clean, sigma, sampling, rng, incidents, 0, n, clean + ex))
        labels += [_label(main, sp, e, sigma, stop) for sp, e in parts]
    else:
        spike_step, back, stop_after = restart
        stop = min(n, spike_step + stop_after)
        runs.append(_sampled(main, s, loss, gn, clean, sigma, sampling, rng, incidents, 0, stop, clean + ex))
        labels += [_label(main, sp, e, sigma, stop, restarted=(sp.step == spike_step))
                   for sp, e in parts if sp.step <= stop]
        # the restart: same curve, fresh noise, no spike at spike_step (the data was skipped
        # or the state differs); later spikes in `spikes` stay (they happen on the branch)
        c = spike_step - back
        parts2, ex2, gf2, nan2 = _apply_all(tuple(sp for sp in spikes if sp.step > stop), n, sigma)
        loss2 = clean + ex2 + rng.normal(0.0, 1.0, n) * sigma
        gn2 = grad * gf2 * np.exp(rng.normal(0.0, 0.08, n))
        loss2[nan2] = np.nan
        gn2[nan2] = np.nan
        b = _sampled("run-b", s, loss2, gn2, clean, sigma, sampling, rng, incidents, c, n, clean + ex2)
        b.resumed_from, b.resumed_from_step = main, c
        runs.append(b)
        labels += [_label("run-b", sp, e, sigma, n) for sp, e in parts2]
    log = LabelledLog(name, category, seed, sampling, runs, labels, note)
    log.spikes = [_visible(log, t) for t in labels]
    return log


def _sampled(label: str, s: np.ndarray, loss: np.ndarray, gn: np.ndarray, clean: np.ndarray,
             sigma: np.ndarray, mode: str, rng: np.random.Generator, incidents: tuple[int, ...],
             lo: int, hi: int, level: np.ndarray | None = None) -> TrackerRun:
    """The logged points of dense steps lo+1..hi (0-based slice lo:hi)."""
    kept, bucket = sample_points(hi - lo, mode, rng, tuple(i - lo for i in incidents))
    idx = kept - 1 + lo
    lv = clean if level is None else level
    run = TrackerRun(label, s[idx], loss[idx], gn[idx], clean=clean[idx], sigma=sigma[idx], level=lv[idx])
    if bucket is not None:
        seg = loss[lo:hi]
        fin = np.where(np.isfinite(seg), seg, np.nan)
        nb = int(bucket.max()) + 1
        mn = np.full(nb, np.inf)
        mx = np.full(nb, -np.inf)
        np.fmin.at(mn, bucket, fin)
        np.fmax.at(mx, bucket, fin)
        run.loss_min = np.where(np.isfinite(mn), mn, np.nan)
        run.loss_max = np.where(np.isfinite(mx), mx, np.nan)
    return run


def _visible(log: LabelledLog, t: TrueSpike) -> TrueSpike:
    """Whether the logged points can show the spike at all (see VISIBLE_SIGMA)."""
    r = log.run(t.run)
    inside = (r.steps >= t.onset_step) & (r.steps <= max(t.end_step, t.onset_step))
    if not inside.any():
        return replace(t, visible=False)
    if t.kind == "nan":
        return replace(t, visible=bool(np.isnan(r.loss[inside]).any()))
    if t.signal == "grad_norm":
        return replace(t, visible=bool(inside.any()))
    v = r.loss[inside]
    over = ~np.isfinite(v) | (v - r.clean[inside] >= VISIBLE_SIGMA * r.sigma[inside])
    return replace(t, visible=bool(over.any()))


__all__ = ["Curve", "LabelledLog", "SPIKE_KINDS", "SpikeSpec", "TrackerRun", "TrueSpike", "build_log",
           "random_curve", "sample_points"]
