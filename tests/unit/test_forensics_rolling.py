"""The fast trailing quantiles (SciPy rank filter) give pandas' answers on every window:
full, head, NaN-holding, variable (step-span) windows, and minimum counts."""

from __future__ import annotations

import numpy as np
import pytest

from k2repro.core.spike import RobustZ
from k2repro.forensics.detect import _window_starts, robust_z_parts
from k2repro.forensics.rolling import _pandas_quantiles, _slow_points, trailing_quantiles

QS = (0.5, 0.25, 0.75)


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(np.isnan(x), np.isnan(y))
        np.testing.assert_allclose(x[~np.isnan(x)], y[~np.isnan(y)], rtol=0, atol=1e-12)


@pytest.mark.parametrize("w", [7, 8, 128])
def test_fixed_windows_with_nans_equal_pandas(w: int) -> None:
    rng = np.random.default_rng(w)
    a = rng.standard_t(3, size=30_000)
    a[[5, 900, 17_000, 29_999]] = np.nan
    a[20_000:20_300] = np.nan  # a gap longer than the window
    start = np.maximum(np.arange(a.size) - w, 0)
    width, slow = _slow_points(a, start)
    assert width == w and slow.size < a.size // 20  # the fast path serves this log
    _same(trailing_quantiles(a, start, QS, 8), _pandas_quantiles(a, start, QS, 8))


def test_step_span_windows_equal_pandas() -> None:
    """A log every 4 steps with a gap: windows widened to a minimum count of points."""
    rng = np.random.default_rng(3)
    steps = np.arange(40_000, dtype=np.int64) * 4
    steps[25_000:] += 10_000
    a = 2.0 + rng.normal(0, 0.05, steps.size)
    start = _window_starts(steps, 128, 64)
    _same(trailing_quantiles(a, start, QS, 8), _pandas_quantiles(a, start, QS, 8))


def test_min_count_above_window_gives_nan() -> None:
    a = np.random.default_rng(1).normal(size=10_000)
    start = np.maximum(np.arange(a.size) - 16, 0)
    out = trailing_quantiles(a, start, (0.5,), 32)[0]
    assert np.isnan(out).all()


def test_robust_z_unchanged_by_the_fast_path() -> None:
    """robust_z over a long log equals the pandas-only computation on the same log."""
    import k2repro.forensics.rolling as rolling

    rng = np.random.default_rng(5)
    n = 50_000
    x = 2 + np.exp(-np.arange(n) / 8_000) + rng.normal(0, 0.02, n)
    x[[7_000, 31_000]] = [4.0, np.nan]
    fast = robust_z_parts(x, RobustZ())
    saved = rolling._FAST_MIN_POINTS
    rolling._FAST_MIN_POINTS = n + 1  # every call through pandas
    try:
        slow = robust_z_parts(x, RobustZ())
    finally:
        rolling._FAST_MIN_POINTS = saved
    for f, s in zip(fast, slow, strict=True):
        assert np.array_equal(np.isnan(f), np.isnan(s))
        np.testing.assert_allclose(f[~np.isnan(f)], s[~np.isnan(s)], rtol=1e-9, atol=1e-12)


def test_trailing_min_equals_a_window_by_window_min() -> None:
    from k2repro.forensics.rolling import trailing_min

    rng = np.random.default_rng(4)
    steps = np.cumsum(rng.integers(1, 9, 6_000))
    for start in (np.maximum(np.arange(20_000) - 128, 0), _window_starts(steps, 128, 64)):
        a = rng.normal(size=start.size)
        a[[3, 500, start.size - 2]] = np.nan
        want = np.array([np.nanmin(a[s:t]) if np.isfinite(a[s:t]).any() else np.inf
                         for t, s in enumerate(start)])
        assert np.array_equal(trailing_min(a, start), want)


def test_the_level_rule_fires_where_the_exact_median_says() -> None:
    """The level is computed only where the window minimum lets the rule fire: the flags
    equal those from the exact long-window median at every point."""
    from k2repro.forensics.episodes import _level_ref

    rng = np.random.default_rng(6)
    n = 30_000
    x = 3.0 + rng.normal(0, 0.05, n)
    for a, b in ((5_000, 5_060), (20_000, 20_400)):  # ramps the trend-corrected median follows
        x[a:b] += np.linspace(0, 1.0, b - a)
    steps = np.arange(1, n + 1)
    rule = RobustZ()
    _, scale, _ = robust_z_parts(x, rule, steps)
    start = _window_starts(steps, rule.long_window, rule.long_min_points)
    (exact,) = _pandas_quantiles(x, start, (0.5,), rule.min_residuals)
    exact[: rule.min_history] = np.nan
    lazy = _level_ref(x, steps, rule, x, scale)
    with np.errstate(invalid="ignore"):
        want = np.nan_to_num((x - exact) / scale, nan=-np.inf) >= rule.threshold
        got = np.nan_to_num((x - lazy) / scale, nan=-np.inf) >= rule.threshold
    assert want.sum() > 20  # the ramps do fire it
    assert np.array_equal(got, want)
    assert np.allclose(lazy[got], exact[got])


def test_the_forked_passes_equal_the_ones_done_here() -> None:
    """workers=2 forks a child for the other signals' whole-series passes: the values are
    those the parent computes itself with workers=1."""
    from k2repro.forensics.parallel import MIN_POINTS, precompute

    rng = np.random.default_rng(8)
    n = MIN_POINTS + 1_000
    steps = np.arange(1, n + 1)
    series = {"loss_max": 3 + rng.normal(0, 0.1, n), "grad_norm": 1 + rng.gamma(2.0, 0.1, n)}
    series["grad_norm"][[5_000, 150_000]] = [9.0, np.nan]
    forked = precompute(series, steps, RobustZ(), workers=2)
    assert forked._pid is not None  # a child is computing
    here = precompute(series, steps, RobustZ(), workers=1)
    assert here._pid is None
    for name in series:
        for a, b in zip(forked.get(name), here.get(name), strict=True):
            assert np.array_equal(a, b, equal_nan=True)
