"""The built-in spike guards of peer trainers, replayed on a logged run.

A user asks "what would my trainer's own guard have done here?". Each function below takes
a run's logged points (step numbers and values, step order) and returns the steps at which
the peer's rule would have fired. `peer_episodes` merges consecutive firings into episodes,
so they can be put beside k2repro's episodes and scored the same way; `peer_summary` says
which of k2repro's episodes each peer's firings fall in (the report's peers table).

The peers run their rule on every training step. An imported log has a point every N
steps, a W&B sample, gaps. Where a peer defines a window in steps, so do we: the window is
the logged points whose step falls inside it, and their mean/std/max estimate what the peer
computed from every step. The readings, from each peer's source:

- OLMo-core (`olmo_core.optim.SkipStepOptimizer.get_step_factor`): keeps the last
  `rolling_interval_length=128` losses (and grad norms) before the current one; once it holds
  at least `max(20, 128 // 2) = 64` values (current included), it skips the step when
  `|x - mean| / std > sigma_factor=6` (torch's std: ddof=1) for the loss *or* the grad norm.
  Two-sided, and every value (skipped or not) enters the window. A NaN makes z NaN and the
  comparison `z <= 6` false: the step is skipped, and the NaN stays in the window (mean and
  std NaN), so every step whose window holds it is skipped too. Here: window = points with
  step in [s - 128, s); active from the 64th step of the run on (first step + 63).
- llm-foundry (`llmfoundry.callbacks.KillLossSpike`, defaults): a deque of the previous
  `window_size=100` losses; once full, a loss `>= outlier_multiplier=2` x their mean is an
  outlier; consecutive outliers are counted (a non-outlier resets the count) and the rule
  fires when the count exceeds `patience=4`, i.e. on the 5th consecutive outlier step and on
  every outlier step after it. A second rule ("high losses") fires once the batch counter
  is >= 2 x window and at least half of the window's losses exceed `loss_cap=10`. Here:
  window = points with step in [s - 100, s), active from first step + 100; "consecutive" is
  in steps: a run of outlier points, each the next logged point, fires at the first point
  at which it spans >= patience + 1 steps (a lone outlier point with no outlier neighbour
  never fires, whatever the logging interval, since the guard needs 5 outlier steps).
- Megatron-LM (`RerunStateMachine.is_unexpectedly_large`, used with `threshold=10` for
  "Spiky loss" when `--check-for-spiky-loss` is on; off by default): records the max of
  |value| over the first `num_samples=100` calls (NaN and inf are ignored there: checked
  separately), and from then on flags `|value| >= 10 x that max`. The max is never updated
  after the first 100 calls. Since the first 100 steps include the initial loss (about
  ln(vocab), 10.4 for a 32k vocabulary), the rule catches only blow-ups to ~100 nats: it is
  meant for hardware faults, not for loss spikes. Here: the reference is the max of the
  points with step < first step + 100. Megatron applies the check to each rank's local loss
  of each micro-batch; a log holds the step's mean, so a spike confined to one micro-batch
  is diluted here (the replay can only miss more, never fire more). Its separate non-finite check
  (`--check-for-nan-in-loss-and-grad`, on by default) fires on NaN/inf; `nonfinite=True`
  includes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from k2repro.forensics.source import finite_any

if TYPE_CHECKING:
    from k2repro.forensics.episodes import Episode

PEERS = ("olmo_core", "llm_foundry", "megatron")


def _arrays(steps: Any, x: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(steps, dtype=np.int64)
    v = np.asarray(x, dtype=np.float64)
    if s.ndim != 1 or v.shape != s.shape:
        raise ValueError("peer rules take 1-D steps and values of the same length")
    if s.size > 1 and np.any(np.diff(s) <= 0):
        raise ValueError("peer rules need strictly increasing steps")
    return s, v


def _window_bounds(s: np.ndarray, window: int) -> np.ndarray:
    """For each point, the index of the first point with step >= step - window (the window
    is [lo, i): the points before i within `window` steps)."""
    if s.size and int(s[-1]) - int(s[0]) == s.size - 1:  # every step logged: plain arithmetic
        return np.maximum(np.arange(s.size) - window, 0)
    return np.searchsorted(s, s - window, side="left")


def olmo_core_fires(steps: Any, x: Any, window: int = 128, sigma: float = 6.0,
                    min_values: int | None = None, min_points: int = 3) -> np.ndarray:
    """Steps where OLMo-core's skip-step rule fires on one signal (see the module doc).

    `min_values` (default max(20, window // 2)) is in steps: the rule is active from step
    first + min_values - 1. `min_points`: a window with fewer logged points cannot give a
    standard deviation worth the name (sparse logs); such points are not judged.
    """
    s, v = _arrays(steps, x)
    if s.size == 0:
        return s
    need = max(20, window // 2) if min_values is None else min_values
    lo = _window_bounds(s, window)
    # prefix sums for mean/std over [lo, i); NaN/inf poison the window as in torch
    bad = ~np.isfinite(v)
    vf = np.where(bad, 0.0, v)
    c1 = np.concatenate(([0.0], np.cumsum(vf)))
    c2 = np.concatenate(([0.0], np.cumsum(vf * vf)))
    cb = np.concatenate(([0], np.cumsum(bad)))
    idx = np.arange(s.size)
    n = idx - lo
    active = (s - s[0] + 1 >= need) & (n >= max(2, min_points))
    out = np.zeros(s.size, dtype=bool)
    ii = idx[active]
    if ii.size:
        ll, nn = lo[ii], n[ii].astype(np.float64)
        sm = c1[ii] - c1[ll]
        mean = sm / nn
        # centred second moment from sums; guarded against tiny negative rounding
        var = np.maximum((c2[ii] - c2[ll]) - sm * mean, 0.0) / (nn - 1.0)
        poisoned = (cb[ii] - cb[ll]) > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.abs(v[ii] - mean) / np.sqrt(var)
        ok = np.isfinite(v[ii]) & ~poisoned & ~np.isnan(z) & (z <= sigma)
        out[ii] = ~ok
    return s[out]


def llm_foundry_fires(steps: Any, x: Any, window: int = 100, multiplier: float = 2.0,
                      patience: int = 4, loss_cap: float | None = 10.0,
                      min_points: int = 1) -> np.ndarray:
    """Steps where llm-foundry's KillLossSpike would have fired (see the module doc)."""
    s, v = _arrays(steps, x)
    if s.size == 0:
        return s
    lo = _window_bounds(s, window)
    fin = np.isfinite(v)
    vf = np.where(fin, v, 0.0)
    c1 = np.concatenate(([0.0], np.cumsum(vf)))
    cf = np.concatenate(([0], np.cumsum(fin)))
    idx = np.arange(s.size)
    n_fin = cf[idx] - cf[lo]
    active = (s - s[0] >= window) & (n_fin >= min_points)
    n_bad = (idx - lo) - n_fin
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = (c1[idx] - c1[lo]) / n_fin
        # a non-finite loss in the deque makes np.mean non-finite and every comparison
        # false, for as long as it stays there; a NaN loss is no outlier and resets the count
        outlier = active & fin & (n_bad == 0) & (v >= multiplier * mean)
    fired = np.zeros(s.size, dtype=bool)
    # runs of consecutive outlier points (any other point resets the count): each point
    # fires once its run spans patience + 1 steps
    oi = np.flatnonzero(outlier)
    if oi.size:
        opens = np.ones(oi.size, dtype=bool)
        opens[1:] = oi[1:] != oi[:-1] + 1
        run_start = oi[np.maximum.accumulate(np.where(opens, np.arange(oi.size), 0))]
        fired[oi[s[oi] - s[run_start] + 1 >= patience + 1]] = True
    if loss_cap is not None:
        high = fin & (v > loss_cap)
        ch = np.concatenate(([0], np.cumsum(high)))
        n_all = idx - lo
        frac_ok = n_all > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(frac_ok, (ch[idx] - ch[lo]) / np.maximum(n_all, 1), 0.0)
        fired |= (s - s[0] >= 2 * window) & frac_ok & (share >= 0.5) & ~fired
    return s[fired]


def megatron_fires(steps: Any, x: Any, factor: float = 10.0, first_steps: int = 100,
                   nonfinite: bool = True) -> np.ndarray:
    """Steps where Megatron-LM's spiky-loss check (and, with `nonfinite`, its NaN/inf check)
    would have fired (see the module doc)."""
    s, v = _arrays(steps, x)
    if s.size == 0:
        return s
    ref_mask = (s < s[0] + first_steps) & np.isfinite(v)
    fired = np.zeros(s.size, dtype=bool)
    if ref_mask.any():
        ref = float(np.max(np.abs(v[ref_mask])))
        after = s >= s[0] + first_steps
        with np.errstate(invalid="ignore"):
            fired |= after & np.isfinite(v) & (np.abs(v) >= factor * ref)
    if nonfinite:
        fired |= ~np.isfinite(v)
    return s[fired]


@dataclass(frozen=True)
class PeerEpisode:
    """Consecutive firings of one peer rule: where it would have acted."""

    peer: str
    signal: str
    onset_step: int
    end_step: int
    peak_step: int
    peak_value: float
    n_fired: int

    def to_dict(self) -> dict[str, Any]:
        pv = self.peak_value if np.isfinite(self.peak_value) else None
        return {"peer": self.peer, "signal": self.signal, "onset_step": self.onset_step,
                "end_step": self.end_step, "peak_step": self.peak_step, "peak_value": pv,
                "n_fired": self.n_fired}


def peer_episodes(steps: Any, x: Any, fired_steps: Any, peer: str = "", signal: str = "loss",
                  merge_gap: int = 8) -> list[PeerEpisode]:
    """Merge fired steps into episodes: firings at consecutive logged points, or within
    `merge_gap` steps of each other, are one episode (a guard that fires on five steps in a
    row acted once, on one incident). `steps`/`x` are the run's logged points, to find the
    peak; the peak is the first non-finite value, else the largest."""
    s, v = _arrays(steps, x)
    f = np.unique(np.asarray(fired_steps, dtype=np.int64))
    if f.size == 0:
        return []
    pos = np.searchsorted(s, f)
    logged = (pos < s.size) & (s[np.minimum(pos, s.size - 1)] == f)
    out: list[PeerEpisode] = []
    start = 0
    for k in range(1, f.size + 1):
        split = k == f.size
        if not split:
            adjacent = bool(logged[k] and logged[k - 1] and pos[k] == pos[k - 1] + 1)
            split = not adjacent and f[k] - f[k - 1] > merge_gap
        if not split:
            continue
        a, b = int(f[start]), int(f[k - 1])
        i0, i1 = int(np.searchsorted(s, a)), int(np.searchsorted(s, b, side="right"))
        seg = v[i0:i1]
        if seg.size == 0:
            pk, pv = a, float("nan")
        else:
            nf = np.flatnonzero(~np.isfinite(seg))
            j = int(nf[0]) if nf.size else int(np.argmax(seg))
            pk, pv = int(s[i0 + j]), float(seg[j])
        out.append(PeerEpisode(peer, signal, a, b, pk, pv, k - start))
        start = k
    return out


def run_peers(signals: dict[str, tuple[Any, Any]], merge_gap: int = 8,
              peers: Sequence[str] = PEERS) -> dict[str, list[PeerEpisode]]:
    """Every peer's episodes on one run. `signals` maps a signal name (`loss`, `grad_norm`)
    to its logged points `(steps, values)`: only the points that were logged (a logged NaN
    is a point; a step where the signal was not logged is not). OLMo-core watches the loss
    and the grad norm; llm-foundry and Megatron-LM the loss."""
    out: dict[str, list[PeerEpisode]] = {}
    for peer in peers:
        if peer not in RULES:
            raise ValueError(f"unknown peer rule {peer!r} (one of {', '.join(PEERS)})")
        eps: list[PeerEpisode] = []
        for sig in WATCHED[peer]:
            if sig not in signals:
                continue
            ss, vv = _arrays(*signals[sig])
            if ss.size == 0:
                continue
            eps += peer_episodes(ss, vv, RULES[peer](ss, vv), peer, sig, merge_gap)
        out[peer] = sorted(eps, key=lambda e: (e.onset_step, e.signal))
    return out


#: which signals each peer's guard watches
WATCHED: dict[str, tuple[str, ...]] = {"olmo_core": ("loss", "grad_norm"), "llm_foundry": ("loss",),
                                       "megatron": ("loss",)}
RULES = {"olmo_core": olmo_core_fires, "llm_foundry": llm_foundry_fires, "megatron": megatron_fires}


#: each rule in one line, for the report
PEER_RULES = {
    "olmo_core": "loss or grad norm over 6 sigma of the trailing 128 steps (skip the step)",
    "llm_foundry": "loss over 2x the trailing 100-step mean for 5 steps in a row (stop the run)",
    "megatron": "loss over 10x the largest of the first 100 steps, or non-finite (stop the run)",
}


def peer_firings(st: dict[str, np.ndarray]) -> dict[str, list[PeerEpisode]]:
    """Each peer's episodes on a run's logged step signals `st` (they do not depend on
    k2repro's, so they can be computed while k2repro's detectors run)."""
    steps = st["step"]
    return run_peers({k: (steps, st[k]) for k in ("loss", "grad_norm") if k in st and finite_any(st[k])})


def peer_summary(eps: list[Episode], firings: dict[str, list[PeerEpisode]]) -> dict[str, dict]:
    """Where the built-in guards of OLMo-core, llm-foundry and Megatron-LM would have fired
    on the same logged points (`firings`: peer_firings of the run), and which of k2repro's
    episodes each one's firings fall in; each such episode gets a note saying so."""
    out: dict[str, dict] = {}
    for peer, peps in firings.items():
        fired = sorted({pe.onset_step for pe in peps})
        hit = [i for i, e in enumerate(eps) if any(_within(pe.onset_step, e) for pe in peps)]
        for i in hit:
            eps[i].notes.append(f"{peer}'s guard would have fired here")
        out[peer] = {"rule": PEER_RULES.get(peer, ""), "n_episodes": len(peps),
                     "n_fired": int(sum(pe.n_fired for pe in peps)), "fired_steps": fired[:50],
                     "episodes": [pe.to_dict() for pe in peps[:50]],
                     "k2repro_episodes_matched": len(hit),
                     "outside_k2repro_episodes": sum(1 for pe in peps
                                                     if not any(_within(pe.onset_step, e) for e in eps))}
    return out


def _within(step: int, e: Episode, slack: int = 2) -> bool:
    """A peer firing at `step` falls in episode `e` (give or take `slack` steps)."""
    return e.onset_step - slack <= step <= max(e.end_step, e.onset_step) + slack


__all__ = ["PEERS", "PEER_RULES", "RULES", "WATCHED", "PeerEpisode", "llm_foundry_fires", "megatron_fires",
           "olmo_core_fires", "peer_episodes", "peer_firings", "peer_summary", "run_peers"]
