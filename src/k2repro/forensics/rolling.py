"""Trailing-window quantiles for the detectors, fast where the log allows it.

Every detector window is trailing and excludes the current point: the window of point t is
[start[t], t). pandas' rolling machinery handles any such windows (variable widths, NaNs,
a minimum count) but costs about 0.3 s per quantile over a million points, and robust_z
needs three of them (median, 25th and 75th percentile of the residuals) per signal.

Where the windows are all of one width w and hold no NaN (a log with a point at every step,
or at every N steps, once the first w points have passed), the k-th smallest value of every
window is SciPy's 1-D rank filter, a C sliding order statistic that does all windows in one
pass; quantiles with linear interpolation (pandas' definition) are two ranks each. The
head of the log, where windows are shorter or reach NaNs, goes through pandas, so the result
is the same as pandas' everywhere (up to rounding of the interpolation).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# below this many points pandas alone is as fast (and one code path is easier to trust)
_FAST_MIN_POINTS = 4096


def _pandas_quantiles(a: np.ndarray, start: np.ndarray, qs: tuple[float, ...],
                      min_count: int) -> list[np.ndarray]:
    """pandas rolling quantiles over the windows [start[t], t); `a` 1-D or 2-D (columns)."""
    import pandas as pd
    from pandas.api.indexers import BaseIndexer

    class _Bounds(BaseIndexer):
        def get_window_bounds(self, num_values: int = 0, min_periods: int | None = None,
                              center: bool | None = None, closed: str | None = None,
                              step: int | None = None) -> tuple[np.ndarray, np.ndarray]:
            return self.start, self.end

    frame = pd.Series(a) if a.ndim == 1 else pd.DataFrame(a)
    roll = frame.rolling(_Bounds(start=start, end=np.arange(start.size, dtype=np.int64)),
                         min_periods=min_count)
    return [np.array((roll.median() if q == 0.5 else roll.quantile(q)).to_numpy(), dtype=np.float64)
            for q in qs]


def _slow_points(a: np.ndarray, start: np.ndarray) -> tuple[int, np.ndarray]:
    """(w, slow): the width of the last window, and the points whose window is not [t-w, t)
    or holds a NaN, which a sliding filter of width w cannot serve (it has no notion of a
    missing value)."""
    n = a.size
    w = int(n - start[-1]) - 1 if n else 0
    idx = np.arange(n, dtype=np.int64)
    slow = idx - start != w
    slow[:w] = True
    isnan = np.isnan(a)
    if isnan.any() and w < n:
        # NaNs in point t's window [t-w, t): cn[t] - cn[t-w], cn[t] = NaNs in a[:t]
        cn = np.concatenate(([0], np.cumsum(isnan, dtype=np.int64)))
        slow[w:] |= cn[w:n] - cn[: n - w] > 0
    return w, np.flatnonzero(slow)


def _aligned(filtered: np.ndarray, w: int, fill: float) -> np.ndarray:
    """A centred SciPy filter of width w read as trailing windows: its window at i is
    a[i - w//2 : i - w//2 + w] and point t's is a[t-w : t], so point t reads it at t - lag
    (the points before lag are slow points, computed apart)."""
    lag = w - w // 2
    out = np.empty(filtered.size)
    out[:lag] = fill
    out[lag:] = filtered[: filtered.size - lag]
    return out


def _window_by_window(a: np.ndarray, start: np.ndarray, points: np.ndarray,
                      qs: tuple[float, ...], min_count: int) -> list[np.ndarray]:
    """The quantiles of the windows of `points`, one window at a time (few points)."""
    out = [np.full(points.size, np.nan) for _ in qs]
    for i, t in enumerate(points):
        win = a[start[t]:t]
        win = win[~np.isnan(win)]
        if win.size >= max(min_count, 1):
            for o, v in zip(out, np.quantile(win, qs), strict=True):
                o[i] = v
    return out


def trailing_quantiles(x: Any, start: np.ndarray, qs: tuple[float, ...],
                       min_count: int) -> list[np.ndarray]:
    """For each q in `qs`, the q-quantile (linear interpolation, NaNs ignored, NaN where a
    window holds fewer than `min_count` values) of every window [start[t], t)."""
    a = np.asarray(x, dtype=np.float64)
    start = np.asarray(start, dtype=np.int64)
    if a.ndim != 1 or a.size < _FAST_MIN_POINTS:
        return _pandas_quantiles(a, start, qs, min_count)
    w, slow = _slow_points(a, start)
    if w < 2 or slow.size > a.size // 20:
        return _pandas_quantiles(a, start, qs, min_count)
    from scipy import ndimage

    filled = np.where(np.isnan(a), 0.0, a)  # those windows are recomputed below
    ranks: dict[int, np.ndarray] = {}

    def rank(k: int) -> np.ndarray:
        if k not in ranks:
            ranks[k] = _aligned(ndimage.rank_filter(filled, k, size=w, mode="nearest"), w, np.nan)
        return ranks[k]

    out = []
    for q in qs:
        pos = q * (w - 1)
        lo = int(np.floor(pos))
        frac = pos - lo
        v = rank(lo)
        out.append(v if frac == 0.0 else v + (rank(lo + 1) - v) * frac)
    if min_count > w:
        for o in out:
            o[:] = np.nan
    for o, v in zip(out, _window_by_window(a, start, slow, qs, min_count), strict=True):
        o[slow] = v
    return out


def trailing_min(x: Any, start: np.ndarray) -> np.ndarray:
    """The minimum of every window [start[t], t), NaNs ignored (+inf where a window holds no
    value): a cheap lower bound of any quantile of the window (SciPy's O(n) minimum filter
    where windows are of one width, one window at a time elsewhere)."""
    a = np.where(np.isnan(np.asarray(x, dtype=np.float64)), np.inf, x)  # +inf: never the min
    start = np.asarray(start, dtype=np.int64)
    w, slow = _slow_points(a, start)
    if w >= 1 and slow.size < a.size:
        from scipy import ndimage

        out = _aligned(ndimage.minimum_filter1d(a, size=w, mode="nearest"), w, np.inf)
    else:
        out, slow = np.full(a.size, np.inf), np.arange(a.size)
    for t in slow:
        out[t] = a[start[t]:t].min() if t > start[t] else np.inf
    return out


__all__ = ["trailing_min", "trailing_quantiles"]
