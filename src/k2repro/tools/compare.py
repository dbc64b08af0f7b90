"""Step-aligned comparison of recorded signals, shared by `replay` and `diff`.

Values in the store are float64 copies of the numbers training produced, so "bit-exact" is a
comparison of the float64 bit patterns (NaN at the same place with the same payload counts as
equal, and -0.0 differs from 0.0). A tolerance `T > 0` is relative: `a` and `b` match when
`|a - b| <= T * max(|a|, |b|)`, or both are NaN. Data comes before numerics: a step whose
`batch_hash` differs trained on other samples, so its numbers are not the first cause.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

STEP_SIGNALS = ("loss", "grad_norm")
LAYER_SIGNALS = ("grad_norm", "param_norm", "update_norm", "update_ratio", "grad_max_abs")


def as_float(values: Any) -> np.ndarray:
    """A float64 array with NULL/NA as NaN (pandas nullable columns included)."""
    import pandas as pd

    s = pd.Series(values)
    return pd.to_numeric(s, errors="coerce").astype("float64").to_numpy(na_value=np.nan)


def bit_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise: the same float64 bit pattern."""
    return np.asarray(a, dtype=np.float64).view(np.int64) == np.asarray(b, dtype=np.float64).view(np.int64)


def within(a: np.ndarray, b: np.ndarray, tol: float) -> np.ndarray:
    """Element-wise match under the relative tolerance `tol` (0: bitwise)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    same = bit_equal(a, b)
    if tol <= 0:
        return same
    with np.errstate(invalid="ignore", over="ignore"):
        close = np.abs(a - b) <= tol * np.maximum(np.abs(a), np.abs(b))
    return same | close | (np.isnan(a) & np.isnan(b))


def abs_rel(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Largest absolute and relative difference over the finite pairs (0.0 when none)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.any():
        return 0.0, 0.0
    d = np.abs(a[ok] - b[ok])
    scale = np.maximum(np.abs(a[ok]), np.abs(b[ok]))
    rel = np.divide(d, scale, out=np.zeros_like(d), where=scale > 0)
    return float(d.max()), float(rel.max())


def first_step(steps: np.ndarray, mask: np.ndarray) -> int | None:
    """The smallest step where `mask` (a mismatch) is true."""
    hit = np.asarray(steps)[np.asarray(mask, dtype=bool)]
    return int(hit.min()) if hit.size else None


def last_per_step(df: pd.DataFrame, keys: tuple[str, ...] = ("step",)) -> pd.DataFrame:
    """One row per key: should a run have recorded a step twice, its later row counts."""
    return df.drop_duplicates(subset=list(keys), keep="last")


@dataclass
class SignalResult:
    compared: int = 0
    bitwise_equal: int = 0
    first_divergence_step: int | None = None
    first_bitwise_divergence_step: int | None = None
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Comparison:
    """The result of comparing steps [from_step, to_step] of two runs."""

    tolerance: float
    steps_compared: int = 0
    missing_steps: list[int] = field(default_factory=list)
    signals: dict[str, SignalResult] = field(default_factory=dict)
    first_divergence_step: int | None = None
    first_divergence_signal: str | None = None
    first_bitwise_divergence_step: int | None = None
    first_bitwise_divergence_signal: str | None = None
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0

    @property
    def bit_exact(self) -> bool:
        return self.first_bitwise_divergence_step is None and not self.missing_steps

    @property
    def within_tolerance(self) -> bool:
        return self.first_divergence_step is None and not self.missing_steps

    def to_dict(self) -> dict:
        return {
            "bit_exact": self.bit_exact, "within_tolerance": self.within_tolerance,
            "tolerance": self.tolerance, "steps_compared": self.steps_compared,
            "missing_steps": self.missing_steps,
            "first_divergence_step": self.first_divergence_step,
            "first_divergence_signal": self.first_divergence_signal,
            "first_bitwise_divergence_step": self.first_bitwise_divergence_step,
            "first_bitwise_divergence_signal": self.first_bitwise_divergence_signal,
            "max_abs_diff": self.max_abs_diff, "max_rel_diff": self.max_rel_diff,
            "signals": {k: v.to_dict() for k, v in self.signals.items()},
        }


def _earliest(cands: list[tuple[int, int, str]]) -> tuple[int | None, str | None]:
    """(step, signal order, name) candidates -> the first step, and at that step the signal
    that comes first (data before numerics)."""
    if not cands:
        return None, None
    step, _, name = min(cands)
    return step, name


def compare_steps(a_steps: pd.DataFrame, b_steps: pd.DataFrame, a_layers: pd.DataFrame | None,
                  b_layers: pd.DataFrame | None, from_step: int, to_step: int,
                  tolerance: float = 0.0) -> Comparison:
    """Compare run B against run A (the reference) on every step of [from_step, to_step]:
    `batch_hash`, then `loss` and `grad_norm`, then every layer statistic that both recorded.
    Steps that A recorded and B did not are listed as missing (a mismatch)."""
    res = Comparison(tolerance=tolerance)
    a = last_per_step(a_steps[(a_steps["step"] >= from_step) & (a_steps["step"] <= to_step)])
    b = last_per_step(b_steps[(b_steps["step"] >= from_step) & (b_steps["step"] <= to_step)])
    m = a.merge(b, on="step", suffixes=("_a", "_b")).sort_values("step")
    res.missing_steps = sorted(set(int(s) for s in a["step"]) - set(int(s) for s in m["step"]))
    res.steps_compared = len(m)
    steps = m["step"].to_numpy()
    tol_c: list[tuple[int, int, str]] = []
    bit_c: list[tuple[int, int, str]] = []

    # data first: a different batch_hash means other samples
    ha, hb = m["batch_hash_a"], m["batch_hash_b"]
    both = ha.notna() & hb.notna()
    sig = SignalResult(compared=int(both.sum()))
    diff = (both & (ha != hb)).to_numpy()
    sig.bitwise_equal = sig.compared - int(diff.sum())
    sig.first_divergence_step = sig.first_bitwise_divergence_step = first_step(steps, diff)
    res.signals["batch_hash"] = sig
    if sig.first_divergence_step is not None:
        tol_c.append((sig.first_divergence_step, 0, "batch_hash"))
        bit_c.append((sig.first_divergence_step, 0, "batch_hash"))

    order = 1
    for name in STEP_SIGNALS:
        va, vb = as_float(m[f"{name}_a"]), as_float(m[f"{name}_b"])
        _numeric(res, name, steps, va, vb, tolerance, order, tol_c, bit_c)
        order += 1

    if a_layers is not None and b_layers is not None and len(a_layers) and len(b_layers):
        keep = ["step", "param", *LAYER_SIGNALS]
        la = last_per_step(a_layers[keep], ("step", "param"))
        lb = last_per_step(b_layers[keep], ("step", "param"))
        la = la[(la["step"] >= from_step) & (la["step"] <= to_step)]
        lb = lb[(lb["step"] >= from_step) & (lb["step"] <= to_step)]
        lm = la.merge(lb, on=["step", "param"], suffixes=("_a", "_b")).sort_values(["step", "param"])
        lsteps = lm["step"].to_numpy()
        params = lm["param"].to_numpy()
        for name in LAYER_SIGNALS:
            va, vb = as_float(lm[f"{name}_a"]), as_float(lm[f"{name}_b"])
            _numeric(res, f"layer_stats.{name}", lsteps, va, vb, tolerance, order, tol_c, bit_c,
                     params=params)
            order += 1

    res.first_divergence_step, res.first_divergence_signal = _earliest(tol_c)
    res.first_bitwise_divergence_step, res.first_bitwise_divergence_signal = _earliest(bit_c)
    if res.missing_steps:
        first_missing = res.missing_steps[0]
        for attr in ("first_divergence", "first_bitwise_divergence"):
            cur = getattr(res, f"{attr}_step")
            if cur is None or first_missing < cur:
                setattr(res, f"{attr}_step", first_missing)
                setattr(res, f"{attr}_signal", "missing")
    return res


def _numeric(res: Comparison, name: str, steps: np.ndarray, va: np.ndarray, vb: np.ndarray,
             tol: float, order: int, tol_c: list, bit_c: list, params: np.ndarray | None = None) -> None:
    present = ~(np.isnan(va) & np.isnan(vb))  # neither recorded it (or both NaN): nothing to tell
    va, vb, st = va[present], vb[present], steps[present]
    pr = params[present] if params is not None else None
    sig = SignalResult(compared=int(len(va)))
    same = bit_equal(va, vb)
    ok = within(va, vb, tol)
    sig.bitwise_equal = int(same.sum())
    sig.max_abs_diff, sig.max_rel_diff = abs_rel(va, vb)
    sig.first_bitwise_divergence_step = first_step(st, ~same)
    sig.first_divergence_step = first_step(st, ~ok)
    res.signals[name] = sig
    res.max_abs_diff = max(res.max_abs_diff, sig.max_abs_diff)
    res.max_rel_diff = max(res.max_rel_diff, sig.max_rel_diff)

    def label(step: int | None, mask: np.ndarray) -> str:
        if pr is None or step is None:
            return name
        idx = np.flatnonzero(mask & (st == step))
        return f"{name}[{pr[idx[0]]}]"

    if sig.first_divergence_step is not None:
        tol_c.append((sig.first_divergence_step, order, label(sig.first_divergence_step, ~ok)))
    if sig.first_bitwise_divergence_step is not None:
        bit_c.append((sig.first_bitwise_divergence_step, order, label(sig.first_bitwise_divergence_step, ~same)))
