"""Precursors: for one episode, which signal crossed its own threshold first, and by how
many steps it led the loss (OLMo 2 saw grad-norm spikes before loss spikes; Wortsman et al.
log Z; Molybog et al. update/param ratios).

Each signal gets the robust-z rule with its own noise scale, computed only for the points
around the episode (core.spike.robust_z_rows: the same values as a whole-run pass, at a cost
proportional to the points asked for), which keeps a 1M-step log cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from k2repro.core.spike import RobustZ, robust_z_rows


@dataclass(frozen=True)
class PrecursorParams:
    """- threshold: each signal's robust-z crossing level (lower than the episode's 6: a
      precursor is a smaller excursion that comes first).
    - layer_threshold: the same for each tensor's grad norm; as high as the episode rule,
      because among ~100 tensors a 4-sigma point somewhere is likely by chance.
    - lookback: how many steps before onset a crossing may start.
    - max_gap: flagged points closer than this (in steps; at least two logging intervals)
      belong to one crossing, walked back from the onset.
    """

    threshold: float = 4.0
    layer_threshold: float = 6.0
    lookback: int = 32
    max_gap: int = 4


@dataclass
class Crossing:
    signal: str
    step: int
    lead_steps: int
    z: float


def first_crossing(
    name: str,
    steps: np.ndarray,
    values: np.ndarray,
    onset_step: int,
    peak_step: int,
    rule: RobustZ,
    p: PrecursorParams,
) -> Crossing | None:
    """The step where `values` (logged at `steps`) started its excursion into the episode,
    or None if it did not cross `p.threshold` between onset - lookback and the peak."""
    steps = np.asarray(steps, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or not np.isfinite(values).any():
        return None
    lo = int(np.searchsorted(steps, onset_step - p.lookback, side="left"))
    hi = int(np.searchsorted(steps, peak_step, side="right"))
    if hi <= lo:
        return None
    zz = robust_z_rows(values, lo, hi, replace(rule, threshold=p.threshold, direction="up"))[:, 0]
    interval = int(np.median(np.diff(steps[max(0, lo - 8): hi + 1]))) if hi - lo > 1 else 1
    c = crossing_start(zz, lo, steps, onset_step, p.threshold, max(p.max_gap, 2 * max(interval, 1)))
    if c is None:
        return None
    return Crossing(name, int(steps[c]), int(onset_step - steps[c]), float(zz[c - lo]))


def crossing_start(z: np.ndarray, offset: int, steps: np.ndarray, onset_step: int, threshold: float,
                   gap: int) -> int | None:
    """Index (z[i] belongs to offset + i) where the excursion into the episode started: a
    chain of points over `threshold`, each at most `gap` steps after the previous, that
    reaches the onset (its last point at most `gap` steps before it), walked back to its
    first point; else the first point over the threshold after onset. An earlier blip that
    does not connect to the episode is not a precursor."""
    cand = np.flatnonzero(np.nan_to_num(z, nan=-np.inf) >= threshold) + offset
    if not cand.size:
        return None
    before = cand[steps[cand] <= onset_step]
    if not before.size or onset_step - steps[before[-1]] > gap:
        after = cand[steps[cand] > onset_step]
        return int(after[0]) if after.size else None
    i = before.size - 1
    while i > 0 and steps[before[i]] - steps[before[i - 1]] <= gap:
        i -= 1
    return int(before[i])


# On equal lead the loss wins (nothing came before it); then this order.
PRIORITY = ("loss", "update_ratio", "grad_norm", "layer_grad_norm", "logz_mean", "loss_max", "lr")


def lead_signal(crossings: list[Crossing]) -> Crossing | None:
    """The crossing with the largest lead; ties go to the loss, then PRIORITY order."""
    if not crossings:
        return None

    def rank(c: Crossing) -> tuple[int, int]:
        base = c.signal.split(":", 1)[0]
        pri = PRIORITY.index(base) if base in PRIORITY else len(PRIORITY)
        return (-c.lead_steps, pri)

    return sorted(crossings, key=rank)[0]
