"""Episodes: flagged points of one signal merged into spikes with onset, peak, end, an honest
baseline, magnitude, excess and recovery, then a class and a severity with its reason
(classify.py decides those; docs/forensics.md has the rules and defaults).

Everything is measured in steps, never in logged points, so that a W&B export sampled down
to 10,000 points, a log every 4 steps and a dense burst around an incident all read the same.
Episodes are found one after the other: once an episode is closed its points are masked out
of the detector's history, so the spike never becomes the reference that the next points
are compared with (that reference produced phantom spikes on normal loss right after real
ones), and every baseline is taken from clean points before the onset that belong to no
earlier episode, never extrapolated through the spike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from k2repro.core.spike import MAD_TO_SIGMA, RobustZ
from k2repro.forensics.classify import episode_class, judge
from k2repro.forensics.detect import robust_z_parts

CLASSES = ("transient", "slow", "persistent", "divergence")
SEVERITIES = ("benign", "malignant")


@dataclass(frozen=True)
class EpisodeParams:
    """Horizons and tolerances of episode building and classification (steps unless noted).

    - flags: the robust-z rule (a jump off the trend), the level rule (the value over the
      long window's median by `threshold` times the noise scale: a ramp over tens of steps,
      which the trend-corrected prediction follows, still ends far above the level before
      it), non-finite values, and corroborated extra flags.
    - onset: the first flagged point, moved back over at most `onset_backtrack` points just
      before it whose robust z is >= onset_z (a spike that rises over two steps starts where
      it starts), then over at most `ramp_backtrack` points still more than `ramp_z` noise
      units above the baseline (a ramp starts where it left the noise).
    - baseline: the clean level before onset: the detector's trend-corrected prediction at
      onset, limited to [min, median] of the last `baseline_window` logged points before the
      onset that belong to no earlier episode. It is never extrapolated, so it stays within
      the values the signal actually had (positive for a loss).
    - noise: the robust residual scale at onset; the noise band is baseline +- band, with
      band = max(recover_sigma * noise, band_frac * |baseline|). An episode whose peak stays
      inside the band is noise and is not opened. The relative floor is there because a
      smooth curve (an eval loss at checkpoint intervals, a late-training loss averaged over
      a large batch) puts a 0.2% blip at 6 sigma: real, and irrelevant to training.
    - recovered: at the first point after the first flag at or below baseline + tol,
      tol = max(band, recover_frac * (running peak - baseline)), that stays there for
      `sustain_steps` steps (every point logged in that stretch), searched up to
      `slow_horizon` steps after onset (and at least the next logged point). An episode not
      back by then is persistent and ends there; the detector's history is then cut: what
      follows is judged against the new level, not the old one (a lasting level shift is one
      episode, not one every horizon, and a later spike on the new level is still seen).
    - merge_gap: a flag within merge_gap steps after recovery extends the episode.
    - duration: steps from onset to the last point above the band (+1). On a sparse log the
      recovery is only known to lie before the next logged point: `recovery_steps` is that
      upper bound and `resolution_steps` the gap, and the class uses the duration the data
      shows, never the gap.
    - class: divergence (a non-finite value, or not recovered and still rising to >=
      runaway_factor x baseline at its end); transient (recovered, duration <=
      transient_horizon); slow (recovered, duration <= slow_horizon); else persistent.
    - severity (the evidence, in this order, with its reason): divergence -> malignant; a
      restart or rollback from a checkpoint before onset -> malignant (analyze adds the
      lineage); not recovered within slow_horizon -> malignant; else benign.
    """

    onset_z: float = 3.0
    onset_backtrack: int = 3
    ramp_backtrack: int = 64
    ramp_z: float = 2.0
    recover_sigma: float = 3.0
    band_frac: float = 0.01
    recover_frac: float = 0.0
    sustain_steps: int = 10
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
    signal: str = "loss"
    excess: float = float("nan")
    band: float = float("nan")
    duration_steps: int = 1
    resolution_steps: int | None = None
    reason: str = ""
    notes: list[str] = field(default_factory=list)


def _pre_onset(x: np.ndarray, masked: np.ndarray, onset: int, k: int, cut: int = 0) -> np.ndarray:
    """The last k finite values before onset (from `cut` on) that belong to no earlier episode."""
    lo = onset
    out: list[np.ndarray] = []
    have = 0
    while lo > cut and have < k:
        a = max(cut, lo - 4 * k)
        seg = x[a:lo]
        seg = seg[np.isfinite(seg) & ~masked[a:lo]]
        out.insert(0, seg)
        have += seg.size
        lo = a
    vals = np.concatenate(out) if out else np.zeros(0)
    return vals[-k:]


def _noise_of(vals: np.ndarray) -> float:
    if vals.size >= 4:
        d = np.diff(vals)
        return float(MAD_TO_SIGMA * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0)) or 1e-12
    return 1e-12


def _tol(band: float, frac: float, runmax: np.ndarray, baseline: float) -> np.ndarray:
    """The recovery tolerance at each point: the band, or a fraction of the running excess."""
    if frac <= 0:
        return np.full(runmax.shape, band)
    with np.errstate(invalid="ignore"):
        return np.fmax(band, frac * (runmax - baseline))


def _level_ref(x: np.ndarray, steps: np.ndarray, rule: RobustZ, judged: np.ndarray,
               scale: np.ndarray) -> np.ndarray:
    """The median of the long trailing window of `x` (step span, at least long_min_points
    points, current point excluded; NaN before min_history): the level the level rule compares
    `judged` with, computed only where the rule could fire. The window's minimum bounds the
    median from below, so where (judged - minimum) / scale stays under the threshold the rule
    cannot fire and the level is left NaN: the median of every window (two rank filters over
    a million points) is needed at a few points around spikes."""
    from k2repro.forensics.detect import _window_starts
    from k2repro.forensics.rolling import trailing_min

    start = _window_starts(steps, rule.long_window, rule.long_min_points)
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = (judged - trailing_min(x, start)) / scale
    cand = np.flatnonzero(np.nan_to_num(bound, nan=-np.inf) >= rule.threshold)
    m = np.full(x.size, np.nan)
    for t in cand[cand >= rule.min_history]:
        win = x[start[t]:t]
        win = win[~np.isnan(win)]
        if win.size >= rule.min_residuals:
            m[t] = np.median(win)
    return m


class _Finder:
    """The sequential search over one signal (state shared by its helpers)."""

    def __init__(self, steps: np.ndarray, x: np.ndarray, rule: RobustZ, p: EpisodeParams,
                 extra: np.ndarray | None, corroborate_z: float, signal: str,
                 parts: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> None:
        self.steps, self.x, self.rule, self.p, self.signal = steps, x, rule, p, signal
        self.extra = extra
        self.corroborate_z = corroborate_z
        self.xm = x.copy()
        self.masked = np.zeros(x.size, dtype=bool)
        self.cut = 0  # points before this index are history no longer used (a level shift)
        self.z, self.scale, self.pred = (parts if parts is not None
                                         else robust_z_parts(self.xm, rule, steps))
        self.z, self.scale, self.pred = (np.array(self.z, dtype=np.float64),
                                         np.array(self.scale, dtype=np.float64),
                                         np.array(self.pred, dtype=np.float64))
        self.level = _level_ref(self.xm, steps, rule, self.x, self.scale)
        self.flags = self._flags(0, x.size)

    def _flags(self, lo: int, hi: int) -> np.ndarray:
        z = self.z[lo:hi]
        with np.errstate(invalid="ignore", divide="ignore"):
            f = np.nan_to_num(z, nan=-np.inf) >= self.rule.threshold
            # the level rule: a ramp over tens of steps that the trend-corrected prediction
            # follows still ends far above the long window's median
            zl = (self.x[lo:hi] - self.level[lo:hi]) / self.scale[lo:hi]
            f |= np.nan_to_num(zl, nan=-np.inf) >= self.rule.threshold
            f |= ~np.isfinite(self.x[lo:hi])
            if self.extra is not None:
                f |= self.extra[lo:hi] & (np.nan_to_num(z, nan=-np.inf) >= self.corroborate_z)
        return f

    def _recompute_after(self, end: int) -> None:
        """Scores of the points whose windows reach the newly masked episode."""
        r, steps, n = self.rule, self.steps, self.x.size
        lo = end + 1
        if lo >= n:
            return
        span = 2 * (r.long_window + r.short_window)
        pts = 2 * (r.long_min_points + r.short_min_points) + r.min_history
        a = int(min(np.searchsorted(steps, steps[lo] - span, side="left"), max(0, lo - pts)))
        a = max(0, a)
        hi = int(max(np.searchsorted(steps, steps[end] + span, side="right"),
                     end + 1 + pts))
        hi = min(n, hi)
        z, scale, pred = robust_z_parts(self.xm[a:hi], r, steps[a:hi])
        if a > 0:  # min_history counts from the start of the log, not of the slice
            z[: max(0, r.min_history - a)] = np.nan
        self.z[lo:hi], self.scale[lo:hi], self.pred[lo:hi] = z[lo - a:], scale[lo - a:], pred[lo - a:]
        self.level[lo:hi] = _level_ref(self.xm[a:hi], steps[a:hi], r, self.x[a:hi], self.scale[a:hi])[lo - a:]
        self.flags[lo:hi] = self._flags(lo, hi)

    def run(self, interventions: Sequence[dict]) -> list[Episode]:
        out: list[Episode] = []
        i, n = 0, self.x.size
        while i < n:
            nxt = np.flatnonzero(self.flags[i:])
            if not nxt.size:
                break
            first = i + int(nxt[0])
            ep = self._open(first, interventions)
            if ep is None:
                i = first + 1
                continue
            out.append(ep)
            self.masked[ep.onset: ep.end + 1] = True
            self.xm[ep.onset: ep.end + 1] = np.nan
            if not ep.recovered:
                self.cut = ep.end + 1
                self.xm[: ep.end + 1] = np.nan
            self._recompute_after(ep.end)
            i = ep.end + 1
        return out

    def _baseline(self, onset: int) -> tuple[float, float]:
        pre = _pre_onset(self.x, self.masked, onset, self.p.baseline_window, self.cut)
        if not pre.size:
            return float("nan"), 1e-12
        med, lo = float(np.median(pre)), float(np.min(pre))
        pb = float(self.pred[onset]) if np.isfinite(self.pred[onset]) else med
        baseline = min(max(pb, lo), med)
        noise = float(self.scale[onset]) if np.isfinite(self.scale[onset]) else _noise_of(pre)
        return baseline, noise

    def _slope(self, onset: int) -> float:
        """The pre-onset trend per step (<= 0: a falling curve; a rise before onset may be the
        ramp itself, so it never counts), from the medians of the two halves of the clean
        points before onset."""
        k = self.p.baseline_window
        idx = np.flatnonzero(~self.masked[self.cut:onset] & np.isfinite(self.x[self.cut:onset])) + self.cut
        idx = idx[-k:]
        if idx.size < 4:
            return 0.0
        h = idx.size // 2
        a, b = idx[:h], idx[h:]
        ds = float(np.mean(self.steps[b]) - np.mean(self.steps[a]))
        if ds <= 0:
            return 0.0
        return min(0.0, (float(np.median(self.x[b])) - float(np.median(self.x[a]))) / ds)

    def _runaway(self, onset: int, end: int, baseline: float) -> bool:
        """Not recovered, and the last value is >= runaway_factor x baseline and the
        episode's maximum (still rising)."""
        seg = self.x[onset: end + 1]
        fin = seg[np.isfinite(seg)]
        last = self.x[end]
        return bool(np.isfinite(last) and baseline > 0 and fin.size
                    and last >= self.p.runaway_factor * baseline
                    and last >= fin.max() - 1e-12 * abs(last))

    def _band(self, baseline: float, noise: float) -> float:
        if not np.isfinite(baseline):
            return self.p.recover_sigma * noise
        return max(self.p.recover_sigma * noise, self.p.band_frac * abs(baseline))

    def _recovery(self, first: int, onset: int, stop: int, baseline: float, band: float) -> int | None:
        """First index in (first, stop) back within the band for sustain_steps steps."""
        p, x, steps = self.p, self.x, self.steps
        lo = max(first + 1, onset + 1)
        if lo >= stop:
            return None
        seg = x[onset:stop]
        runmax = np.fmax.accumulate(np.where(np.isfinite(seg), seg, -np.inf))
        tol = _tol(band, p.recover_frac, runmax, baseline)
        ok = np.isfinite(seg) & (seg <= baseline + tol)
        bad = np.concatenate(([0], np.cumsum(~ok)))
        idx = np.arange(lo - onset, seg.size)
        last = np.searchsorted(steps[onset:stop], steps[onset + idx] + p.sustain_steps, side="right")
        good = ok[idx] & ((bad[last] - bad[idx]) == 0)
        hit = np.flatnonzero(good)
        return int(onset + idx[hit[0]]) if hit.size else None

    def _open(self, first: int, interventions: Sequence[dict]) -> Episode | None:
        """The episode whose first flagged point is `first`, or None when it stays inside the
        noise band of the clean level (not a spike)."""
        x, steps, n = self.x, self.steps, self.x.size
        onset, baseline, noise, band = self._onset(first)
        if np.isfinite(x[first]) and not (np.isfinite(baseline) and x[first] > baseline + band):
            return None  # inside the noise band of the clean level: not a spike
        stop = int(np.searchsorted(steps, steps[onset] + self.p.slow_horizon, side="right"))
        stop = min(max(stop, first + 2, onset + 1), n)
        rec, end, search_from = self._recover(first, onset, stop, baseline, band)
        end = max(end, onset)
        if rec is None:
            end = self._unrecovered_end(onset, end, search_from, baseline, band)
        return self._measure(onset, end, rec, stop, baseline, noise, band, interventions)

    def _onset(self, first: int) -> tuple[int, float, float, float]:
        """(onset, baseline, noise, band): the first flagged point moved back over the points
        just before it with a high z, then, for a ramp, to where the signal left the noise."""
        p, x, steps, z = self.p, self.x, self.steps, self.z
        onset = first
        k = 0
        while (k < p.onset_backtrack and onset - 1 >= self.cut and not self.masked[onset - 1]
               and np.isfinite(z[onset - 1]) and z[onset - 1] >= p.onset_z):
            onset -= 1
            k += 1
        baseline, noise = self._baseline(onset)
        band = self._band(baseline, noise)
        # a ramp: walk the onset back to where the signal left the noise (the baseline is
        # then taken again from before the new onset, which can only lower it); each earlier
        # point is compared with the baseline carried back along the falling pre-onset trend
        for _ in range(3):
            slope = self._slope(onset)
            j = onset
            while (j - 1 >= self.cut and onset - (j - 1) <= p.ramp_backtrack and not self.masked[j - 1]
                   and np.isfinite(x[j - 1]) and np.isfinite(baseline)
                   and x[j - 1] > baseline + slope * (steps[j - 1] - steps[onset]) + p.ramp_z * noise):
                j -= 1
            if j == onset:
                break
            onset = j
            baseline, noise = self._baseline(onset)
            band = self._band(baseline, noise)
        return onset, baseline, noise, band

    def _recover(self, first: int, onset: int, stop: int, baseline: float, band: float
                 ) -> tuple[int | None, int, int]:
        """(recovery index or None, last index of the episode, where the recovery search
        began): a flag within merge_gap steps after a recovery extends the episode."""
        steps = self.steps
        search_from = first
        while True:
            rec = (self._recovery(search_from, onset, stop, baseline, band)
                   if np.isfinite(baseline) else None)
            end = rec - 1 if rec is not None else stop - 1
            later = np.flatnonzero(self.flags[end + 2: stop]) + end + 2 if rec is not None else np.zeros(0, int)
            if rec is not None and later.size and steps[later[0]] <= steps[rec] + self.p.merge_gap:
                search_from = int(later[0])
                continue
            return rec, end, search_from

    def _unrecovered_end(self, onset: int, end: int, search_from: int, baseline: float, band: float) -> int:
        """The last index of an episode not back within slow_horizon: a run-away lasts until it
        comes back, if ever; a later non-finite stretch is its own episode."""
        x, steps, n = self.x, self.steps, self.x.size
        if self._runaway(onset, end, baseline):
            # a run that runs away is one episode up to where it comes back, if ever
            rec2 = self._recovery(search_from, onset, n, baseline, band)
            return rec2 - 1 if rec2 is not None else n - 1
        # a non-finite value well after the last finite flag is its own (divergence)
        # episode, not the tail of a plateau that began earlier
        nf = np.flatnonzero(~np.isfinite(x[onset + 1: end + 1])) + onset + 1
        if nf.size:
            fl = np.flatnonzero(self.flags[onset: nf[0]]) + onset
            fl = fl[np.isfinite(x[fl])]
            last = int(fl[-1]) if fl.size else onset
            if steps[nf[0]] - steps[last] > self.p.merge_gap:
                end = int(nf[0]) - 1
        if not np.isfinite(x[end]):  # a non-finite stretch is one episode, however long
            while end + 1 < n and not np.isfinite(x[end + 1]):
                end += 1
        return end

    def _measure(self, onset: int, end: int, rec: int | None, stop: int, baseline: float, noise: float,
                 band: float, interventions: Sequence[dict]) -> Episode | None:
        """The episode onset..end: peak, excess, duration, class and severity (None when its
        peak stays inside the noise band)."""
        p, x, steps, n = self.p, self.x, self.steps, self.x.size
        seg = x[onset: end + 1]
        nonfin_idx = np.flatnonzero(~np.isfinite(seg))
        nonfin = bool(nonfin_idx.size)
        peak = onset + int(nonfin_idx[0]) if nonfin else onset + int(np.argmax(seg))
        peak_value = float(x[peak])
        if not nonfin and not (peak_value > baseline + band):
            return None
        recovered = rec is not None
        excess = peak_value - baseline if np.isfinite(peak_value) else float("inf")
        magnitude = (peak_value / baseline if np.isfinite(peak_value) and baseline > 0
                     else float("inf"))
        runmax = np.fmax.accumulate(np.where(np.isfinite(seg), seg, -np.inf))
        above = ~np.isfinite(seg) | (seg > baseline + _tol(band, p.recover_frac, runmax, baseline))
        last_el = onset + int(np.flatnonzero(above)[-1]) if above.any() else onset
        duration = int(steps[last_el] - steps[onset]) + 1
        censored = (not recovered) and stop >= n and (steps[-1] - steps[onset] < p.slow_horizon)
        runaway = not recovered and self._runaway(onset, end, baseline)
        ep_flags = np.flatnonzero(self.flags[onset: end + 1]) + onset
        zz = self.z[onset: end + 1]
        ep = Episode(
            onset=onset, peak=peak, end=end, onset_step=int(steps[onset]),
            peak_step=int(steps[peak]), end_step=int(steps[end]), baseline=float(baseline),
            peak_value=peak_value, noise=float(noise), magnitude=float(magnitude),
            recovered=recovered, recovery_steps=int(steps[rec] - steps[onset]) if recovered else None,
            censored=bool(censored), nonfinite=nonfin,
            cls=episode_class(nonfin, recovered, runaway, duration, p),
            max_z=float(np.nanmax(zz)) if np.isfinite(zz).any() else float("nan"),
            flagged_steps=[int(s) for s in steps[ep_flags]],
            interventions=[e for e in interventions if steps[onset] <= int(e.get("step", -1)) <= steps[end]],
            signal=self.signal, excess=float(excess), band=float(band), duration_steps=duration,
            resolution_steps=int(steps[rec] - steps[last_el]) if recovered else None,
        )
        judge(ep, p, last_step=int(steps[-1]))
        return ep


def find_episodes(
    steps: np.ndarray,
    x: np.ndarray,
    rule: RobustZ = RobustZ(),
    params: EpisodeParams = EpisodeParams(),
    extra_flags: np.ndarray | None = None,
    corroborate_z: float = 2.0,
    interventions: Sequence[dict] = (),
    signal: str = "loss",
    parts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> list[Episode]:
    """Detect and build the episodes of signal `x` (indexed like the increasing `steps`).

    Points are flagged by the robust-z rule (step-aware windows), by non-finite values, and
    by `extra_flags` where the signal's own z is at least `corroborate_z`. `parts` are
    precomputed `robust_z_parts(x, rule, steps)`. `interventions` are events (dicts with
    `step`, `kind`) of kind rollback/abort, which make an episode malignant.
    """
    steps = np.asarray(steps, dtype=np.int64)
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return []
    f = _Finder(steps, x, rule, params, None if extra_flags is None else np.asarray(extra_flags, bool),
                corroborate_z, signal, parts)
    return f.run(interventions)


def build_episodes(
    steps: np.ndarray,
    x: np.ndarray,
    flags: np.ndarray,
    z: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    pred: np.ndarray | None = None,
    params: EpisodeParams = EpisodeParams(),
    interventions: Sequence[dict] = (),
    rule: RobustZ = RobustZ(),
) -> list[Episode]:
    """Episodes from precomputed flags and robust-z parts (`find_episodes` with the detector
    already run: `flags` beyond the robust-z rule count as corroborated extra flags)."""
    x = np.asarray(x, dtype=np.float64)
    extra = np.asarray(flags, bool)
    parts = None
    if z is not None and scale is not None and pred is not None:
        parts = (np.asarray(z, dtype=np.float64), np.asarray(scale, dtype=np.float64),
                 np.asarray(pred, dtype=np.float64))
        with np.errstate(invalid="ignore"):
            # the rule's own flags are recomputed after each episode (masked history)
            extra = extra & ~(np.nan_to_num(parts[0], nan=-np.inf) >= rule.threshold)
    return find_episodes(steps, x, rule, params, extra_flags=extra,
                         corroborate_z=-np.inf, interventions=interventions, parts=parts)
