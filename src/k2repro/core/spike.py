"""The robust-z spike rule: one definition shared by the training guard (`train/guard.py`,
`train/trainer.py`) and the offline forensics (`forensics/detect.py`), so a spike the guard
acts on during training is the spike forensics reports afterwards.

It sits in `core` because two layers that must not import each other (train and forensics)
both need it. Here: the rule's parameters (`RobustZ`), its direct reference for the last
point of a history (`robust_z_last`, what the torch guard is tested against), and its
row-wise vectorised form (`robust_z_rows`, the guard's host-side decisions and the
per-layer precursors). numpy only: forensics' whole-series pass over a million points
(`forensics.detect.robust_z_parts`, pandas and SciPy rank filters) builds on these
definitions and stays in forensics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# 1.4826 * MAD estimates the standard deviation of normal noise.
MAD_TO_SIGMA = 1.4826

DIRECTIONS = ("up", "down", "both")


@dataclass(frozen=True)
class RobustZ:
    """The robust z-score rule (also the spike guard's rule; `guard.*` keys use these names).

    pred_t  = median(x[t-h : t]) + (median(x[t-h : t]) - median(x[t-2h : t-h])) * (h+1)/(2h),
              h = short_window // 2 (with `trend=False`: median(x[t-short_window : t]))
    (indices are points of a log with a point at every step; with `steps` given, each window
    holds the points of its step span, widened to at least its minimum number of points, and
    the trend is extrapolated over the distance in steps between the halves' mean steps,
    at most the distance between the halves: a gap in the log is not extrapolated over)
    r_t     = x_t - pred_t
    over the residuals of the trailing long window R = r[t-long_window : t] (NaNs ignored):
    center  = median(R); mad = (q75(R) - q25(R)) / 2   (equals the MAD for symmetric noise)
    scale   = max(1.4826 * mad, rel_floor * |pred_t|, abs_floor)
    z_t     = (r_t - center) / scale
    z_t is defined once t >= min_history points precede it and R holds >= min_residuals
    values; flagged when z_t >= threshold (direction "up"), <= -threshold ("down"), or
    |z_t| >= threshold ("both").

    The trend term turns the median into a local linear extrapolation: without it, a
    loss falling by 0.05 per step sits 0.4 below a 16-step median, and the variation of that
    lag across the long window inflates the scale until early spikes go unseen.
    Half the interquartile range is used instead of a MAD around a rolling median because it
    needs one level of windows, not two, so it is defined from min_history on.
    """

    short_window: int = 16
    long_window: int = 128
    short_min_points: int = 8
    long_min_points: int = 64
    threshold: float = 6.0
    min_history: int = 32
    min_residuals: int = 8
    trend: bool = True
    direction: str = "up"
    rel_floor: float = 1e-4
    abs_floor: float = 1e-12

    def __post_init__(self) -> None:
        if self.short_window < 2 or self.long_window < 2:
            raise ValueError("robust_z: short_window and long_window must be >= 2")
        if self.trend and self.short_window < 4:
            raise ValueError("robust_z: trend=True needs short_window >= 4")
        if self.min_residuals < 2:
            raise ValueError("robust_z: min_residuals must be >= 2")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"robust_z: direction must be one of {DIRECTIONS}")
        if self.short_min_points < 2 or self.long_min_points < 2:
            raise ValueError("robust_z: short_min_points and long_min_points must be >= 2")

    @property
    def history_needed(self) -> int:
        """Points before t that z_t depends on (what an online guard must keep)."""
        return self.long_window + self.short_window


def as_float(x: Any) -> np.ndarray:
    """`x` as a 1-D float64 array (a detector's signal); ValueError for any other shape."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError("detectors take a 1-D signal")
    return a


def finite_or_nan(x: np.ndarray) -> np.ndarray:
    """+-inf as NaN: the rule ignores every non-finite value in its windows alike."""
    return np.where(np.isfinite(x), x, np.nan)


def _trailing_windows(a: np.ndarray, w: int, start: int, stop: int) -> np.ndarray:
    """For rows start..stop-1 of `a` (n x k), the w rows before each: a strided view of shape
    (stop-start, k, w), NaN where a window reaches above row 0."""
    from numpy.lib.stride_tricks import sliding_window_view

    lo = start - w
    ap = a[lo:stop] if lo >= 0 else np.vstack([np.full((-lo, a.shape[1]), np.nan), a[:stop]])
    return sliding_window_view(ap, w, axis=0)[: stop - start]


def _window_quantiles(win: np.ndarray, qs: tuple[float, ...], min_count: int) -> list[np.ndarray]:
    """Linear-interpolation quantiles over the last axis ignoring NaNs (as pandas' rolling
    quantile); NaN where fewer than min_count values."""
    srt = np.sort(win, axis=-1)  # NaNs sort last
    cnt = np.sum(~np.isnan(win), axis=-1)
    out = []
    for q in qs:
        pos = q * np.maximum(cnt - 1, 0)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, np.maximum(cnt - 1, 0))
        vlo = np.take_along_axis(srt, lo[..., None], -1)[..., 0]
        vhi = np.take_along_axis(srt, hi[..., None], -1)[..., 0]
        v = vlo + (vhi - vlo) * (pos - lo)
        v[cnt < max(min_count, 1)] = np.nan
        out.append(v)
    return out


def robust_z_rows(x: Any, start: int, stop: int, p: RobustZ = RobustZ()) -> np.ndarray:
    """z of rows start..stop-1 of `x` (n x k: one series per column), equal to
    robust_z_parts(x)[0][start:stop] up to rounding, at a cost proportional to the rows asked
    for, not to n: the per-layer precursors need a few dozen rows of 100 series."""
    x = np.asarray(x, dtype=np.float64)
    # rows before `base` reach no window of rows start.. (and min_history lies before start):
    # slice them off, so a call on a million-point signal costs what its rows need
    base = max(0, start - max(p.long_window + 2 * p.short_window, p.min_history))
    if base > 0:
        return robust_z_rows(x[base:stop], start - base, stop - base, p)
    a = finite_or_nan(x)
    if a.ndim == 1:
        a = a[:, None]
    n = a.shape[0]
    start, stop = max(0, start), min(n, stop)
    if stop <= start:
        return np.zeros((0, a.shape[1]))
    # residuals for the rows the long window reaches
    r_lo = max(0, start - p.long_window)
    if p.trend:
        h = p.short_window // 2
        m_lo = max(0, r_lo - h)
        (m,) = _window_quantiles(_trailing_windows(a, h, m_lo, stop), (0.5,), max(1, h // 2))
        idx = np.arange(r_lo, stop)
        cur = m[idx - m_lo]
        prev_i = idx - h - m_lo
        ok = (idx - h) >= 0
        prev = np.full_like(cur, np.nan)
        prev[ok] = m[prev_i[ok]]
        pred = cur + (cur - prev) * ((h + 1) / (2 * h))
    else:
        (pred,) = _window_quantiles(_trailing_windows(a, p.short_window, r_lo, stop), (0.5,),
                                    max(1, p.short_window // 2))
    r = np.full((stop, a.shape[1]), np.nan)
    r[r_lo:stop] = a[r_lo:stop] - pred
    q25, q50, q75 = _window_quantiles(_trailing_windows(r, p.long_window, start, stop),
                                      (0.25, 0.5, 0.75), p.min_residuals)
    pred_t = pred[start - r_lo:]
    scale = np.maximum(np.maximum(MAD_TO_SIGMA * (q75 - q25) / 2.0, p.rel_floor * np.abs(pred_t)),
                       p.abs_floor)
    z = (r[start:stop] - q50) / scale
    z[: max(0, min(p.min_history, stop) - start)] = np.nan
    return z


def direction_flags(z: np.ndarray, threshold: float, direction: str) -> np.ndarray:
    """Flags of scores `z` against `threshold` in `direction` (DIRECTIONS); NaN never flags."""
    with np.errstate(invalid="ignore"):
        if direction == "up":
            return z >= threshold
        if direction == "down":
            return z <= -threshold
        return np.abs(z) >= threshold


def robust_z_last(history: Any, p: RobustZ = RobustZ()) -> float:
    """z of the last point of `history` (the points before it are its past), computed
    directly, without rolling machinery: the reference an online guard ports and is tested
    against. Only the last `p.history_needed + 1` points matter.
    """
    a = finite_or_nan(as_float(history))
    n = a.size
    if n - 1 < p.min_history:
        return float("nan")
    a = a[-(p.history_needed + 1):]
    n = a.size

    def pred_at(i: int) -> float:
        if p.trend:
            h = p.short_window // 2
            m1 = _nanmedian_min(a[max(0, i - h): i], max(1, h // 2))
            j = i - h
            m0 = _nanmedian_min(a[max(0, j - h): j], max(1, h // 2)) if j >= 1 else np.nan
            return m1 + (m1 - m0) * ((h + 1) / (2 * h))
        return _nanmedian_min(a[max(0, i - p.short_window): i], max(1, p.short_window // 2))

    t = n - 1
    preds = np.array([pred_at(i) for i in range(max(0, t - p.long_window), t + 1)])
    r_all = a[max(0, t - p.long_window): t + 1] - preds
    window, r_t, pred_t = r_all[:-1], r_all[-1], preds[-1]
    window = window[~np.isnan(window)]
    if window.size < p.min_residuals or np.isnan(r_t):
        return float("nan")
    center = float(np.median(window))
    q25, q75 = np.quantile(window, [0.25, 0.75])
    scale = max(MAD_TO_SIGMA * (q75 - q25) / 2.0, p.rel_floor * abs(pred_t), p.abs_floor)
    return float((r_t - center) / scale)


def robust_z_flag(history: Any, p: RobustZ = RobustZ()) -> bool:
    """The guard's decision for the last point of `history`."""
    z = robust_z_last(history, p)
    return bool(direction_flags(np.array([z]), p.threshold, p.direction)[0])


def robust_z_flag_rows(x: Any, start: int, p: RobustZ = RobustZ()) -> np.ndarray:
    """The guard's decisions for rows start.. of `x` (1-D) in one vectorised pass: equal to
    `robust_z_flag(x[:i + 1])` for each row i, at the cost of one call, not one per row."""
    z = robust_z_rows(np.asarray(x, dtype=np.float64), start, len(x), p)[:, 0]
    return direction_flags(z, p.threshold, p.direction)


def _nanmedian_min(w: np.ndarray, min_count: int) -> float:
    w = w[~np.isnan(w)]
    return float(np.median(w)) if w.size >= min_count else float("nan")


__all__ = [
    "DIRECTIONS", "MAD_TO_SIGMA", "RobustZ", "as_float", "direction_flags", "finite_or_nan",
    "robust_z_flag", "robust_z_flag_rows", "robust_z_last", "robust_z_rows",
]
