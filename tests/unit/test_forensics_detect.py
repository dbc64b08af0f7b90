"""Detectors: the robust-z rule finds spikes early in training (where a plain long median
cannot), stays quiet on clean curves, and its one-point reference (what the online guard
ports) equals the vectorised pass."""

from __future__ import annotations

import numpy as np
import pytest

from k2repro.core.spike import (
    RobustZ,
    robust_z_flag,
    robust_z_flag_rows,
    robust_z_last,
    robust_z_rows,
)
from k2repro.forensics.detect import (
    EwmRatio,
    MeanRatio,
    coerce_params,
    ewm_ratio,
    mean_ratio,
    nonfinite,
    parse_spec,
    robust_z,
    robust_z_parts,
)
from k2repro.forensics.episodes import build_episodes
from k2repro.forensics.synthetic import InjectedSpike, SyntheticRun, generate

ONSETS = (40, 150, 420, 900)


def curve(seed: int, spikes: bool, n: int = 1200, tau: float = 60.0) -> np.ndarray:
    """Fast-falling early loss (10 -> 3 with tau=60 steps) plus noise; spikes of 0.6 nats
    (20 noise units) at ONSETS that decay over a few steps."""
    sp = tuple(InjectedSpike("bump", s, size=0.6, decay=3.0) for s in ONSETS) if spikes else ()
    spec = SyntheticRun(n_steps=n, seed=seed, tau=tau, spikes=sp, with_layers=False, with_samples=False)
    return generate(spec)["steps"]["loss"]


def episodes_of(x: np.ndarray, rule: RobustZ = RobustZ()):
    d = robust_z(x, rule)
    steps = np.arange(1, x.size + 1)
    return build_episodes(steps, x, d.flags, z=d.scores, scale=d.scale, pred=d.pred)


@pytest.mark.parametrize("seed", range(6))
def test_every_injected_spike_found_with_onset_within_two_steps(seed: int) -> None:
    eps = episodes_of(curve(seed, spikes=True))
    onsets = [e.onset_step for e in eps]
    for s in ONSETS:
        assert any(abs(o - s) <= 2 for o in onsets), (s, onsets)
    assert len(eps) == len(ONSETS), onsets


@pytest.mark.parametrize("seed", range(6))
def test_clean_curve_has_no_spike(seed: int) -> None:
    x = curve(seed, spikes=False)
    assert not robust_z(x).flags.any()
    assert episodes_of(x) == []


def test_a_plain_long_median_misses_the_early_spike_that_the_default_finds() -> None:
    """Why the short, trend-corrected median: at step 40 the loss falls ~0.06/step, so a
    128-step trailing median sits far above it and the spike hides below the median."""
    x = curve(0, spikes=True)
    plain = RobustZ(short_window=128, trend=False)
    assert not robust_z(x, plain).flags[38:44].any()
    assert robust_z(x).flags[38:44].any()


@pytest.mark.parametrize("trend", [True, False])
def test_one_point_reference_equals_the_vectorised_rule(trend: bool) -> None:
    rng = np.random.default_rng(3)
    n = 420
    x = 3 + 7 * np.exp(-np.arange(n) / 50) + rng.normal(0, 0.03, n)
    x[200:203] += 1.0
    x[77] = np.nan
    x[300] = np.inf
    rule = RobustZ(trend=trend)
    d = robust_z(x, rule)
    ref = np.array([robust_z_last(x[: i + 1], rule) for i in range(n)])
    assert np.array_equal(np.isnan(ref), np.isnan(d.scores))
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(ref[ok], d.scores[ok], rtol=1e-12, atol=1e-12)
    assert [robust_z_flag(x[: i + 1], rule) for i in (150, 200)] == [False, True]
    # history beyond history_needed does not matter
    assert robust_z_last(x[:260], rule) == robust_z_last(x[260 - rule.history_needed - 1: 260], rule)


def test_flag_rows_fed_in_flushes_equal_the_per_point_guard() -> None:
    """guard.action=log scores each flush in one call over a history cut to history_needed
    points: the flags must be those of the one-point rule applied at every step."""
    rng = np.random.default_rng(11)
    n = 400
    x = 3 + 7 * np.exp(-np.arange(n) / 50) + rng.normal(0, 0.03, n)
    x[[90, 200, 201, 333]] += [0.8, 1.0, 0.9, 0.7]
    rule = RobustZ()
    ref = np.array([robust_z_flag(x[: i + 1], rule) for i in range(n)])
    hist: list[float] = []
    got: list[bool] = []
    for lo in range(0, n, 10):
        chunk = list(x[lo:lo + 10])
        full = hist + chunk
        got += list(robust_z_flag_rows(full, len(hist), rule))
        hist = full[-rule.history_needed:]
    assert ref.sum() >= 3
    assert np.array_equal(ref, np.array(got))


@pytest.mark.parametrize("trend", [True, False])
def test_row_range_z_equals_the_whole_pass_for_many_series(trend: bool) -> None:
    """What per-layer precursors use: z of a few rows of 2-D data, without a whole-run pass."""
    rng = np.random.default_rng(5)
    a = 3 + np.exp(-np.arange(400) / 50)[:, None] + rng.normal(0, 0.03, (400, 7))
    a[50, 2], a[10, 3] = np.nan, np.inf
    a[200:203, 1] += 1.0
    rule = RobustZ(trend=trend)
    z, _, _ = robust_z_parts(a, rule)
    for lo, hi in [(0, 400), (30, 40), (150, 260), (390, 400)]:
        zr = robust_z_rows(a, lo, hi, rule)
        assert np.array_equal(np.isnan(zr), np.isnan(z[lo:hi]))
        ok = ~np.isnan(zr)
        np.testing.assert_allclose(zr[ok], z[lo:hi][ok], rtol=1e-9, atol=1e-9)


def test_min_history_and_direction() -> None:
    x = np.ones(60) + np.random.default_rng(0).normal(0, 0.01, 60)
    x[20] = 5.0  # before min_history: not scored
    x[50] = -3.0  # a drop: only "down"/"both" see it
    assert not robust_z(x).flags.any()
    assert np.isnan(robust_z(x).scores[:32]).all()
    assert robust_z(x, RobustZ(direction="down")).flags[50]
    assert robust_z(x, RobustZ(direction="both")).flags[50]


def test_ratio_detectors_and_nonfinite() -> None:
    x = np.full(200, 2.0)
    x[100] = 3.0  # 1.5x for one step
    x[150:153] = 5.0  # 2.5x for three steps
    e = ewm_ratio(x, EwmRatio(ratio=1.25))
    assert e.flags[100] and e.flags[150]
    m = mean_ratio(x, MeanRatio(ratio=2.0, patience=4))
    assert not m.flags.any()  # three steps < patience
    x[150:156] = 5.0
    m = mean_ratio(x, MeanRatio(ratio=2.0, patience=4))
    assert m.flags[150:154].all() and not m.flags[100]
    y = np.array([1.0, np.nan, 2.0, np.inf, -np.inf])
    assert nonfinite(y).flags.tolist() == [False, True, False, True, True]


def test_spec_parsing_names_the_bad_key() -> None:
    s = parse_spec("robust_z:threshold=5,long_window=256,trend=false")
    assert (s.params.threshold, s.params.long_window, s.params.trend) == (5.0, 256, False)
    with pytest.raises(ValueError, match="unknown parameter 'windw'"):
        parse_spec("robust_z:windw=3")
    with pytest.raises(ValueError, match="unknown detector"):
        parse_spec("zscore")
    with pytest.raises(ValueError, match="must be int"):
        coerce_params(RobustZ(), {"long_window": "many"})
    with pytest.raises(ValueError, match="direction"):
        RobustZ(direction="sideways")


def test_the_spike_rule_lives_in_core_without_pandas_or_torch() -> None:
    """Issue 19: the guard and forensics share one definition of the robust-z rule in
    k2repro.core.spike, which loads numpy only (core is below train and forensics)."""
    import subprocess
    import sys

    code = ("import sys, k2repro.core.spike as s\n"
            "print(sorted(m for m in ('pandas', 'torch', 'scipy', 'k2repro.forensics', 'k2repro.train') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    import k2repro.core.spike as spike
    import k2repro.forensics.detect as detect
    import k2repro.train.guard as guard

    assert guard.MAD_TO_SIGMA is spike.MAD_TO_SIGMA and guard.RobustZ is spike.RobustZ
    assert detect.RobustZ is spike.RobustZ and not hasattr(detect, "robust_z_flag_rows")
