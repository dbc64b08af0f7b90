"""Spike detectors over whole signals: pure, vectorised functions over one signal (a 1-D
float array in step order). The robust-z rule itself (`RobustZ`, its reference and row-wise
forms) lives in `k2repro.core.spike`, shared with the online spike guard; this module runs it
over a whole log at once (SciPy rank filters and pandas where the windows allow) and adds the
side-by-side detectors and their command-line specs.

Four detectors run side by side (docs/forensics.md):
- `robust_z`: residual from a short trailing (trend-corrected) median, scaled by a robust
  spread of the residuals over a longer trailing window. The default; it works early in
  training because the short median follows a fast-falling loss, where a plain 128-step
  median lags so much that a real spike can sit below it.
- `ewm_ratio`: value / exponentially weighted mean of the previous values.
- `mean_ratio`: value / trailing mean, flagged only after `patience` consecutive steps over
  the ratio (llm-foundry's rule: 2x the 100-step mean for 4 steps).
- `nonfinite`: NaN or +-inf.

Windows are measured in steps: `RobustZ.short_window` and `long_window` are step spans, each
widened to at least `short_min_points` / `long_min_points` logged points where the log is
sparser than that (an import that logs every 1,000 steps still gets enough points for a
median). On a log with a point at every step a window of N steps is N points, so the online
guard (which sees every step) and forensics apply the very same rule. Every window is
trailing and excludes the current point, so a spike never hides itself. The prediction is
the detector's reference, not an episode's baseline: episodes (episodes.py) take their
baseline from clean points before onset, so an extrapolation through a spike's decay never
becomes a (negative) baseline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from k2repro.core.spike import (
    DIRECTIONS,
    MAD_TO_SIGMA,
    RobustZ,
    as_float,
    direction_flags,
    finite_or_nan,
)
from k2repro.forensics.rolling import trailing_quantiles


@dataclass(frozen=True)
class EwmRatio:
    """x_t / EWM(x_1..x_{t-1}) >= ratio (halflife in points)."""

    halflife: float = 32.0
    ratio: float = 1.25
    min_history: int = 32
    direction: str = "up"

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"ewm_ratio: direction must be one of {DIRECTIONS}")


@dataclass(frozen=True)
class MeanRatio:
    """x_t / mean(x[t-window : t]) >= ratio for `patience` consecutive points; every point of
    the run of length >= patience is flagged (llm-foundry-style)."""

    window: int = 100
    ratio: float = 2.0
    patience: int = 4
    min_history: int = 32


@dataclass(frozen=True)
class NonFinite:
    """NaN or +-inf."""


DetectorParams = RobustZ | EwmRatio | MeanRatio | NonFinite

KINDS: dict[str, type] = {
    "robust_z": RobustZ,
    "ewm_ratio": EwmRatio,
    "mean_ratio": MeanRatio,
    "nonfinite": NonFinite,
}


@dataclass(frozen=True)
class Detection:
    """What a detector says about every point: a score (NaN where undefined) and a flag."""

    kind: str
    scores: np.ndarray
    flags: np.ndarray
    scale: np.ndarray | None = None  # robust_z only: the noise scale at each point
    pred: np.ndarray | None = None  # robust_z only: the trailing prediction (the baseline)


def robust_z_parts(x: Any, p: RobustZ = RobustZ(), steps: Any = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, scale, pred) for every point; NaN where undefined. O(n log w).

    `x` is 1-D, or 2-D with one series per column (per-layer statistics at shared steps).
    `steps` (the step of each point, increasing): windows become step spans (see `RobustZ`);
    without it, or where every step is logged, windows count points.
    """
    a = np.asarray(x, dtype=np.float64)
    if a.ndim not in (1, 2):
        raise ValueError("robust_z takes a 1-D signal or a 2-D array of column signals")
    a = finite_or_nan(a)
    if steps is not None:
        st = np.asarray(steps, dtype=np.int64)
        if st.shape[0] != a.shape[0]:
            raise ValueError("robust_z: steps and values differ in length")
        if st.size > 1 and not np.all(np.diff(st) == 1):
            return _robust_z_steps(a, st, p)
    idx = np.arange(a.shape[0], dtype=np.int64)
    if p.trend:
        h = p.short_window // 2
        (m,) = trailing_quantiles(a, np.maximum(idx - h, 0), (0.5,), max(1, h // 2))
        prev = np.full_like(m, np.nan)
        prev[h:] = m[:-h] if h else m
        pred = m + (m - prev) * ((h + 1) / (2 * h))
    else:
        (pred,) = trailing_quantiles(a, np.maximum(idx - p.short_window, 0), (0.5,),
                                     max(1, p.short_window // 2))
    return _residual_scores(a, pred, np.maximum(idx - p.long_window, 0), p)


def _residual_scores(a: np.ndarray, pred: np.ndarray, long_start: np.ndarray, p: RobustZ
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, scale, pred) from the prediction: the residuals' trailing center and spread over
    the long windows, then the one place the scale floors and min_history apply, whatever
    the windows were."""
    r = a - pred
    center, q25, q75 = trailing_quantiles(r, long_start, (0.5, 0.25, 0.75), p.min_residuals)
    spread = (q75 - q25) / 2.0
    scale = np.maximum(np.maximum(MAD_TO_SIGMA * spread, p.rel_floor * np.abs(pred)), p.abs_floor)
    z = (r - center) / scale
    z[: min(p.min_history, z.shape[0])] = np.nan
    return z, scale, pred


def _window_starts(steps: np.ndarray, span: int, min_points: int) -> np.ndarray:
    """For each point t, the first index of its trailing window [start, t): the points whose
    step lies within `span` steps before t's, widened to at least `min_points` points."""
    idx = np.arange(steps.size, dtype=np.int64)
    start = np.searchsorted(steps, steps - span, side="left").astype(np.int64)
    return np.clip(np.minimum(start, idx - min_points), 0, None)


def _robust_z_steps(a: np.ndarray, steps: np.ndarray, p: RobustZ
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`robust_z_parts` with windows as step spans (irregular logs)."""
    n = steps.size
    if p.trend:
        h = p.short_window // 2
        b1 = _window_starts(steps, h, max(2, p.short_min_points // 2))
        (m1,) = trailing_quantiles(a, b1, (0.5,), 1)
        # the mean step of each window: where the median sits on the step axis
        cs = np.concatenate(([0.0], np.cumsum(steps, dtype=np.float64)))
        cnt = np.arange(n) - b1
        with np.errstate(invalid="ignore", divide="ignore"):
            c1 = (cs[np.arange(n)] - cs[b1]) / cnt
        m0, c0 = m1[b1], c1[b1]
        ok = (b1 > 0) & (cnt > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            # at most one window's change: across a gap in the log the trend of the last
            # points says nothing about the level thousands of steps later
            f = np.where(ok & (c1 > c0), np.minimum((steps - c1) / (c1 - c0), 1.0), np.nan)
        slope = (m1 - m0) * (f if a.ndim == 1 else f[:, None])
        pred = m1 + np.where(np.isnan(slope), 0.0, slope)
    else:
        (pred,) = trailing_quantiles(a, _window_starts(steps, p.short_window, p.short_min_points),
                                     (0.5,), max(1, p.short_min_points // 2))
    return _residual_scores(a, pred, _window_starts(steps, p.long_window, p.long_min_points), p)


def robust_z(x: Any, p: RobustZ = RobustZ(), steps: Any = None,
             parts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Detection:
    """Robust z-scores and flags of a whole signal (see `RobustZ`; `steps` makes the windows
    step spans; `parts`: its `robust_z_parts`, already computed)."""
    z, scale, pred = parts if parts is not None else robust_z_parts(x, p, steps)
    return Detection("robust_z", z, direction_flags(z, p.threshold, p.direction), scale, pred)


def ewm_ratio(x: Any, p: EwmRatio = EwmRatio()) -> Detection:
    """Ratio of each point to the EWM of the points before it."""
    import pandas as pd

    a = finite_or_nan(as_float(x))
    base = pd.Series(a).ewm(halflife=p.halflife, ignore_na=True).mean().shift(1).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = a / base
    ratio[: min(p.min_history, a.size)] = np.nan
    if p.direction == "down":
        flags = direction_flags(1.0 / ratio, p.ratio, "up")
    elif p.direction == "both":
        flags = direction_flags(ratio, p.ratio, "up") | direction_flags(1.0 / ratio, p.ratio, "up")
    else:
        flags = direction_flags(ratio, p.ratio, "up")
    return Detection("ewm_ratio", ratio, flags)


def mean_ratio(x: Any, p: MeanRatio = MeanRatio()) -> Detection:
    """Ratio to the trailing mean, flagged after `patience` consecutive points over it."""
    import pandas as pd

    a = finite_or_nan(as_float(x))
    base = pd.Series(a).rolling(p.window, min_periods=1).mean().shift(1).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = a / base
    ratio[: min(p.min_history, a.size)] = np.nan
    over = direction_flags(ratio, p.ratio, "up")
    return Detection("mean_ratio", ratio, _runs_at_least(over, p.patience))


def _runs_at_least(mask: np.ndarray, k: int) -> np.ndarray:
    """Points that belong to a run of >= k consecutive True values."""
    if k <= 1 or not mask.any():
        return mask.copy()
    m = np.concatenate(([False], mask, [False])).astype(np.int8)
    d = np.diff(m)
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    out = np.zeros(mask.size, dtype=bool)
    for s, e in zip(starts, ends, strict=True):
        if e - s >= k:
            out[s:e] = True
    return out


def nonfinite(x: Any, p: NonFinite = NonFinite()) -> Detection:
    """NaN or infinite values (a missing value in an import is NaN too: callers that know
    which values are missing pass them out before)."""
    a = as_float(x)
    flags = ~np.isfinite(a)
    return Detection("nonfinite", flags.astype(np.float64), flags)


_FUNCS = {"robust_z": robust_z, "ewm_ratio": ewm_ratio, "mean_ratio": mean_ratio, "nonfinite": nonfinite}


@dataclass(frozen=True)
class DetectorSpec:
    """One detector on one signal: `kind` of KINDS, its params, and a display name."""

    kind: str
    params: Any = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown detector '{self.kind}' (one of {', '.join(KINDS)})")
        if self.params is None:
            object.__setattr__(self, "params", KINDS[self.kind]())
        if not self.name:
            object.__setattr__(self, "name", self.kind)

    def run(self, x: Any, steps: Any = None) -> Detection:
        """Run on signal `x`; `steps` makes robust_z's windows step spans (the ratio
        detectors are side-by-side references and keep their point windows)."""
        if self.kind == "robust_z":
            return robust_z(x, self.params, steps)
        return _FUNCS[self.kind](x, self.params)


def default_detectors() -> list[DetectorSpec]:
    """The side-by-side set the report shows."""
    return [DetectorSpec(k) for k in KINDS]


def parse_spec(text: str) -> DetectorSpec:
    """`kind` or `kind:key=value,key=value` (e.g. `robust_z:threshold=5,long_window=256`).

    Raises ValueError naming the bad key or value.
    """
    kind, _, rest = text.partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise ValueError(f"unknown detector '{kind}' (one of {', '.join(KINDS)})")
    cls = KINDS[kind]
    kw: dict[str, Any] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, val = item.partition("=")
            key = key.strip()
            if not eq:
                raise ValueError(f"detector '{kind}': expected key=value, got '{item}'")
            kw[key] = val.strip()
    return DetectorSpec(kind, coerce_params(cls(), kw), kind)


def coerce_params(base: Any, overrides: Mapping[str, Any]) -> Any:
    """`base` with `overrides` applied, converting strings to each field's type."""
    types = {f.name: type(getattr(base, f.name)) for f in fields(base)}
    kw: dict[str, Any] = {}
    for key, val in overrides.items():
        if key not in types:
            raise ValueError(f"{type(base).__name__}: unknown parameter '{key}' "
                             f"(one of {', '.join(types)})")
        t = types[key]
        try:
            if t is bool and isinstance(val, str):
                if val.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(val)
                kw[key] = val.lower() in ("true", "1", "yes")
            else:
                kw[key] = t(val)
        except (TypeError, ValueError):
            raise ValueError(f"{type(base).__name__}: parameter '{key}' must be "
                             f"{t.__name__}, got '{val}'") from None
    return replace(base, **kw)


def params_dict(p: Any) -> dict[str, Any]:
    """Plain dict of a params dataclass (for the JSON report)."""
    return {f.name: getattr(p, f.name) for f in fields(p)}


__all__ = [
    "Detection", "DetectorSpec", "EwmRatio", "KINDS", "MeanRatio", "NonFinite", "coerce_params",
    "default_detectors", "ewm_ratio", "mean_ratio", "nonfinite", "params_dict", "parse_spec",
    "robust_z", "robust_z_parts",
]
