"""The comparison that replay and diff share: bitwise means the float64 bits, a tolerance is
relative, data comes before numerics, missing steps are mismatches."""

from __future__ import annotations

import numpy as np
import pandas as pd

from k2repro.tools.compare import bit_equal, compare_steps, within


def _steps(losses: list[float], hashes: list[str] | None = None, start: int = 1) -> pd.DataFrame:
    n = len(losses)
    return pd.DataFrame({"step": range(start, start + n), "loss": losses, "grad_norm": [1.0] * n,
                         "batch_hash": hashes or [f"h{i}" for i in range(start, start + n)]})


def test_bitwise_and_relative_tolerance() -> None:
    a = np.array([1.0, 0.0, np.nan, 1.0, 100.0])
    b = np.array([1.0, -0.0, np.nan, np.nextafter(1.0, 2.0), 100.001])
    assert bit_equal(a, b).tolist() == [True, False, True, False, False]
    assert within(a, b, 0).tolist() == [True, False, True, False, False]
    # 1e-5 relative: one ulp and 1e-5 * 100 both pass; -0.0 == 0.0 numerically
    assert within(a, b, 1e-5).tolist() == [True, True, True, True, True]
    assert within(np.array([1.0]), np.array([1.0 + 2e-5]), 1e-5).tolist() == [False]


def test_identical_steps_are_bit_exact() -> None:
    a = _steps([3.0, 2.5, 2.25])
    res = compare_steps(a, a.copy(), None, None, 1, 3)
    assert res.bit_exact and res.within_tolerance and res.steps_compared == 3
    assert res.first_divergence_step is None and res.max_abs_diff == 0.0


def test_data_is_named_before_numerics_at_the_same_step() -> None:
    a = _steps([3.0, 2.5, 2.25, 2.0])
    b = _steps([3.0, 2.5, 2.3, 2.1], hashes=["h1", "h2", "other", "h4"])
    res = compare_steps(a, b, None, None, 1, 4)
    assert res.first_divergence_step == 3 and res.first_divergence_signal == "batch_hash"
    assert res.signals["loss"].first_divergence_step == 3
    assert not res.bit_exact and res.max_abs_diff > 0


def test_tolerance_separates_rounding_from_divergence() -> None:
    a = _steps([3.0, 2.5, 2.25, 2.0])
    b = a.copy()
    b.loc[1, "loss"] = np.nextafter(2.5, 3.0)  # one ulp at step 2
    b.loc[3, "loss"] = 2.5  # a real divergence at step 4
    exact = compare_steps(a, b, None, None, 1, 4)
    assert exact.first_divergence_step == 2 and exact.first_divergence_signal == "loss"
    loose = compare_steps(a, b, None, None, 1, 4, tolerance=1e-6)
    assert loose.first_divergence_step == 4 and loose.first_bitwise_divergence_step == 2
    assert not loose.bit_exact and not loose.within_tolerance


def test_window_and_missing_steps() -> None:
    a = _steps([3.0, 2.5, 2.25, 2.0, 1.9])
    b = _steps([2.25, 2.0], start=3)  # the replay stopped after step 4
    res = compare_steps(a, b, None, None, 3, 5)
    assert res.steps_compared == 2 and res.missing_steps == [5]
    assert res.first_divergence_step == 5 and res.first_divergence_signal == "missing"
    assert not res.within_tolerance


def test_layer_stats_name_the_parameter() -> None:
    a = _steps([3.0, 2.5])
    params = ["emb.weight", "out.weight"]
    la = pd.DataFrame({"step": [2, 2], "param": params, "grad_norm": [1.0, 2.0], "param_norm": [1.0, 1.0],
                       "update_norm": [0.1, 0.2], "update_ratio": [0.1, 0.2], "grad_max_abs": [0.5, 0.5]})
    lb = la.copy()
    lb.loc[1, "update_norm"] = 0.25
    res = compare_steps(a, a.copy(), la, lb, 1, 2)
    assert res.first_divergence_step == 2
    assert res.first_divergence_signal == "layer_stats.update_norm[out.weight]"
    assert res.signals["layer_stats.grad_norm"].compared == 2
