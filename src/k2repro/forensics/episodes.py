"""Episodes: flagged points merged into spikes with onset, peak, end, magnitude and recovery,
then a class and a severity (docs/forensics.md has the definitions and defaults).

Windows here are in steps (what a person reads off the x axis), not in logged points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

CLASSES = ("transient", "slow", "persistent", "divergence")
SEVERITIES = ("benign", "malignant")


@dataclass(frozen=True)
class EpisodeParams:
    """Horizons and tolerances of episode building and classification.

    - onset_z: the onset is moved back over the points just before the first flag whose
      robust z is >= onset_z (at most onset_backtrack points): a spike that rises over two
      steps starts where it starts, not where it first crossed the threshold.
    - recovered: the first point after onset with x <= baseline + tol, where
      tol = max(recover_sigma * noise, recover_frac * (running peak - baseline)).
    - merge_gap: a flag within merge_gap steps after an episode's end extends it.
    - transient: recovered within transient_horizon steps of onset; slow: within
      slow_horizon; persistent: not within slow_horizon (or not before the log ends:
      `censored`); divergence: a non-finite value, or not recovered and the last value of the
      episode >= runaway_factor * baseline (positive signals) while it is the episode's max.
    - severity: benign when the curve came back by itself (transient, slow) and no rollback
      or abort happened in the episode; malignant otherwise (K2's wording).
    """

    onset_z: float = 3.0
    onset_backtrack: int = 3
    recover_sigma: float = 3.0
    recover_frac: float = 0.1
    merge_gap: int = 8
    transient_horizon: int = 50
    slow_horizon: int = 1000
    runaway_factor: float = 1.5
    baseline_window: int = 16


@dataclass
class Episode:
    """One spike. `onset`, `peak`, `end` are indices into the signal; *_step are steps."""

    onset: int
    peak: int
    end: int
    onset_step: int
    peak_step: int
    end_step: int
    baseline: float
    peak_value: float
    noise: float
    magnitude: float
    recovered: bool
    recovery_steps: int | None
    censored: bool
    nonfinite: bool
    cls: str = "transient"
    severity: str = "benign"
    max_z: float = float("nan")
    flagged_steps: list[int] = field(default_factory=list)
    detectors: list[str] = field(default_factory=list)
    interventions: list[dict] = field(default_factory=list)


def _baseline(x: np.ndarray, onset: int, pred: np.ndarray | None, window: int) -> float:
    if pred is not None and onset < pred.size and np.isfinite(pred[onset]):
        return float(pred[onset])
    prev = x[max(0, onset - window): onset]
    prev = prev[np.isfinite(prev)]
    if prev.size:
        return float(np.median(prev))
    return float(x[onset]) if np.isfinite(x[onset]) else float("nan")


def _noise(x: np.ndarray, onset: int, scale: np.ndarray | None, window: int) -> float:
    if scale is not None and onset < scale.size and np.isfinite(scale[onset]):
        return float(scale[onset])
    prev = x[max(0, onset - 8 * window): onset]
    prev = prev[np.isfinite(prev)]
    if prev.size >= 4:
        d = np.diff(prev)
        return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0)) or 1e-12
    return 1e-12


def _recovery(x: np.ndarray, start: int, stop: int, onset: int, baseline: float,
              noise: float, p: EpisodeParams) -> int | None:
    """First index in (onset, stop) at or after `start` that counts as recovered."""
    lo = max(start, onset + 1)
    if lo >= stop:
        return None
    seg = x[onset:stop]
    runmax = np.fmax.accumulate(np.where(np.isfinite(seg), seg, -np.inf))
    tol = np.maximum(p.recover_sigma * noise, p.recover_frac * (runmax - baseline))
    ok = np.isfinite(seg) & (seg <= baseline + tol)
    ok[: lo - onset] = False
    hit = np.flatnonzero(ok)
    return int(onset + hit[0]) if hit.size else None


def build_episodes(
    steps: np.ndarray,
    x: np.ndarray,
    flags: np.ndarray,
    z: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    pred: np.ndarray | None = None,
    params: EpisodeParams = EpisodeParams(),
    interventions: Sequence[dict] = (),
) -> list[Episode]:
    """Merge flagged points of signal `x` (indexed like `steps`) into classified episodes.

    `z`, `scale`, `pred` are the robust-z parts of `x` (detect.robust_z_parts): they refine
    the onset and give the baseline and noise; without them the episode falls back to
    trailing medians. `interventions` are events (dicts with `step`, `kind`) of kind
    rollback/abort, which make an episode malignant.
    """
    p = params
    steps = np.asarray(steps, dtype=np.int64)
    x = np.asarray(x, dtype=np.float64)
    flagged = np.flatnonzero(np.asarray(flags, dtype=bool))
    n = x.size
    out: list[Episode] = []
    fi = 0
    while fi < flagged.size:
        first = int(flagged[fi])
        onset = first
        if z is not None:
            k = 0
            while (k < p.onset_backtrack and onset - 1 >= 0 and np.isfinite(z[onset - 1])
                   and z[onset - 1] >= p.onset_z and (not out or onset - 1 > out[-1].end)):
                onset -= 1
                k += 1
        baseline = _baseline(x, onset, pred, p.baseline_window)
        noise = _noise(x, onset, scale, p.baseline_window)
        horizon_stop = int(np.searchsorted(steps, steps[onset] + p.slow_horizon, side="right"))
        horizon_stop = min(max(horizon_stop, onset + 1), n)
        search_from = first
        while True:
            rec = _recovery(x, search_from, horizon_stop, onset, baseline, noise, p)
            end = rec if rec is not None else horizon_stop - 1
            # flags inside the episode or within merge_gap steps after it extend it
            later = flagged[flagged > end]
            if later.size and steps[later[0]] <= steps[end] + p.merge_gap and rec is not None:
                search_from = int(later[0])
                continue
            break
        if rec is None:
            # a non-finite value well after the last finite flag is its own (divergence)
            # episode, not the tail of a plateau that began earlier
            nf = np.flatnonzero(~np.isfinite(x[onset + 1: end + 1])) + onset + 1
            if nf.size:
                fin = flagged[(flagged >= onset) & (flagged < nf[0]) & np.isfinite(x[flagged])]
                last = int(fin[-1]) if fin.size else onset
                if steps[nf[0]] - steps[last] > p.merge_gap:
                    end = int(nf[0]) - 1
        seg = x[onset: end + 1]
        nonfin_idx = np.flatnonzero(~np.isfinite(seg))
        nonfin = bool(nonfin_idx.size)
        if nonfin:
            peak = onset + int(nonfin_idx[0])
            peak_value = float(seg[nonfin_idx[0]])
        else:
            peak = onset + int(np.argmax(seg))
            peak_value = float(x[peak])
        recovered = rec is not None
        censored = (not recovered) and horizon_stop >= n and (steps[-1] - steps[onset] < p.slow_horizon)
        if np.isfinite(peak_value) and baseline and np.isfinite(baseline) and baseline != 0:
            magnitude = peak_value / baseline
        else:
            magnitude = float("inf")
        rec_steps = int(steps[rec] - steps[onset]) if recovered else None
        last_val = x[end]
        runaway = (not recovered and np.isfinite(last_val) and baseline > 0
                   and last_val >= p.runaway_factor * baseline
                   and last_val >= np.nanmax(np.where(np.isfinite(seg), seg, np.nan)) - 1e-12 * abs(last_val))
        if nonfin or runaway:
            cls = "divergence"
        elif recovered and rec_steps is not None and rec_steps <= p.transient_horizon:
            cls = "transient"
        elif recovered:
            cls = "slow"
        else:
            cls = "persistent"
        ep_flags = flagged[(flagged >= onset) & (flagged <= end)]
        ivs = [e for e in interventions if steps[onset] <= int(e.get("step", -1)) <= steps[end]]
        severity = "benign" if cls in ("transient", "slow") and not any(
            e.get("kind") in ("rollback", "abort") for e in ivs) else "malignant"
        max_z = float(np.nanmax(z[onset: end + 1])) if z is not None and np.isfinite(
            z[onset: end + 1]).any() else float("nan")
        out.append(Episode(
            onset=onset, peak=peak, end=end, onset_step=int(steps[onset]),
            peak_step=int(steps[peak]), end_step=int(steps[end]), baseline=baseline,
            peak_value=peak_value, noise=noise, magnitude=float(magnitude), recovered=recovered,
            recovery_steps=rec_steps, censored=bool(censored), nonfinite=nonfin, cls=cls,
            severity=severity, max_z=max_z, flagged_steps=[int(s) for s in steps[ep_flags]],
            interventions=list(ivs),
        ))
        fi = int(np.searchsorted(flagged, end, side="right"))
    return out
