"""Layer and data attribution of one episode.

Layer: which parameter tensors' statistics jumped most at onset (max over the onset window /
median before it) and which one crossed its own robust-z threshold first.
Data: the onset step's samples ranked by excess loss, and a verdict on whether the top
samples account for the step's excess over the run's typical loss: a bad batch concentrates
the excess in a few samples; an optimizer-side spike (an lr spike) raises every sample.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from k2repro.core.spike import MAD_TO_SIGMA, RobustZ, robust_z_rows
from k2repro.forensics.precursors import PrecursorParams, crossing_start
from k2repro.forensics.source import LayerWindow

JUMP_STATS = ("grad_norm", "update_ratio", "grad_max_abs", "update_norm")


@dataclass(frozen=True)
class LayerParams:
    """- jump_lead: the onset window starts this many steps before onset (an lr spike shows
      in the update of the step before the loss jumps).
    - pre_points: the baseline is the median of this many logged points before the window.
    - top_n: parameters listed; heatmap_params: rows of the heatmap (top by jump).
    """

    jump_lead: int = 2
    pre_points: int = 32
    top_n: int = 5
    heatmap_params: int = 24
    heat_before: int = 48
    heat_after: int = 48


@dataclass
class LayerAttribution:
    top: list[dict] = field(default_factory=list)
    first_to_cross: dict | None = None
    interval: int = 1
    heat_params: list[str] = field(default_factory=list)
    heat_steps: np.ndarray | None = None
    heat: np.ndarray | None = None  # log10(grad_norm / pre-onset median), params x steps
    note: str = ""


def layer_attribution(
    ls: LayerWindow | None,
    onset_step: int,
    peak_step: int,
    rule: RobustZ,
    pre: PrecursorParams,
    p: LayerParams = LayerParams(),
) -> LayerAttribution:
    """`ls`: the layer_stats rows around the episode (source.LayerWindow)."""
    out = LayerAttribution()
    if ls is None or len(ls) == 0:
        out.note = "no layer_stats rows around the episode"
        return out
    steps_all = ls.steps
    out.interval = int(np.median(np.diff(steps_all))) if steps_all.size > 1 else 1
    lo = onset_step - p.jump_lead
    hi = max(peak_step, onset_step + out.interval - 1)
    in_win = (steps_all >= lo) & (steps_all <= hi)
    if not in_win.any():
        after = steps_all[steps_all >= onset_step]
        if after.size == 0:
            out.note = f"no layer_stats row at or after onset (logged every {out.interval} steps)"
            return out
        hi = int(after[0])
        out.note = (f"no layer_stats row in steps {lo}..{max(peak_step, onset_step)}; "
                    f"used the next logged step {hi} (logged every {out.interval} steps)")
        in_win = (steps_all >= lo) & (steps_all <= hi)
    before = np.flatnonzero(steps_all < lo)[-p.pre_points:]
    if before.size == 0:
        out.note = "no layer_stats rows before onset to compare against"
        return out
    order, jumps, out.top = _jumps(ls, in_win, before, p)
    if ls.has("grad_norm"):
        out.first_to_cross = _first_to_cross(ls, onset_step, max(peak_step, hi), rule, pre, out.interval, jumps)
        out.heat_params, out.heat_steps, out.heat = _heatmap(ls, order, before, onset_step, max(peak_step, hi),
                                                             out.interval, p)
    return out


def _jumps(ls: LayerWindow, in_win: np.ndarray, before: np.ndarray, p: LayerParams
           ) -> tuple[np.ndarray, dict[str, float], list[dict]]:
    """(param indices logged in the onset window by jump, largest first and NaN last, ties by
    name; param -> jump; the top_n rows): a param's jump is the largest over JUMP_STATS of
    its max over the onset window / its median before it."""
    stats = [c for c in JUMP_STATS if ls.has(c)]
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN params: NaN, as pandas
        # per stat: max over the onset window / median before it, for every param
        ratio = np.stack([np.nanmax(ls.stats[c][in_win], axis=0) / np.nanmedian(ls.stats[c][before], axis=0)
                          for c in stats], axis=1) if stats else np.full((len(ls.params), 0), np.nan)
        ratio[~np.isfinite(ratio)] = np.nan
        jump = np.nanmax(ratio, axis=1) if stats else np.full(len(ls.params), np.nan)
    seen = np.flatnonzero(np.isfinite(np.stack([ls.stats[c][in_win] for c in stats])).any(axis=(0, 1))) \
        if stats else np.zeros(0, dtype=np.int64)
    key = np.where(np.isnan(jump[seen]), np.inf, -jump[seen])
    order = seen[np.argsort(key, kind="stable")]
    jumps = {ls.params[j]: float(jump[j]) for j in order}
    top = []
    for j in order[: p.top_n]:
        row = {"param": ls.params[j], "jump": _r(jump[j])}
        for k, c in enumerate(stats):
            row[f"{c}_ratio"] = _r(ratio[j, k])
        top.append(row)
    return order, jumps, top


def _first_to_cross(ls: LayerWindow, onset_step: int, last_step: int, rule: RobustZ, pre: PrecursorParams,
                    interval: int, jumps: dict[str, float]) -> dict | None:
    """The param whose grad_norm crossed its own robust-z threshold first (walked back like a
    precursor crossing; ties go to the larger jump), up to `last_step`."""
    wide, wsteps = ls.stats["grad_norm"], ls.steps
    r = replace(rule, threshold=pre.layer_threshold, direction="up")
    lo_c = int(np.searchsorted(wsteps, onset_step - pre.lookback, side="left"))
    hi_c = int(np.searchsorted(wsteps, last_step, side="right"))
    z = robust_z_rows(wide, lo_c, hi_c, r)
    best: tuple | None = None
    gap = max(pre.max_gap, 2 * interval)
    for j, param in enumerate(ls.params):
        c = crossing_start(z[:, j], lo_c, wsteps, onset_step, pre.layer_threshold, gap)
        if c is None:
            continue
        jv = jumps.get(param, 0.0)
        key_j = (int(wsteps[c]), -(jv if np.isfinite(jv) else 0.0))
        if best is None or key_j < best[0]:
            best = (key_j, param, int(wsteps[c]), float(z[c - lo_c, j]))
    if best is None:
        return None
    return {"param": best[1], "step": best[2], "lead_steps": int(onset_step - best[2]), "z": _r(best[3])}


def _heatmap(ls: LayerWindow, order: np.ndarray, before: np.ndarray, onset_step: int, last_step: int,
             interval: int, p: LayerParams) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(params, steps, log10 of grad_norm over its pre-onset median as params x steps) for the
    top params by jump, from heat_before intervals before onset to heat_after after `last_step`."""
    wide, wsteps = ls.stats["grad_norm"], ls.steps
    hp = order[: p.heatmap_params]
    hs = (wsteps >= onset_step - p.heat_before * interval) & (wsteps <= last_step + p.heat_after * interval)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(wide[before][:, hp], axis=0)
        heat = np.log10(wide[hs][:, hp] / med).T
    return [ls.params[j] for j in hp], wsteps[hs], np.where(np.isfinite(heat), heat, np.nan)


def update_ratio(ls: LayerWindow | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The model's update/param ratio per logged step: ||update|| / ||params|| over all
    tensors (falls back to the mean of per-tensor ratios)."""
    if ls is None or len(ls) == 0:
        return None
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        if ls.has("update_norm") and "param_norm" in ls.stats:
            u2 = np.nansum(ls.stats["update_norm"] ** 2, axis=1)
            p2 = np.nansum(ls.stats["param_norm"] ** 2, axis=1)
            return ls.steps, np.sqrt(u2) / np.sqrt(p2)
        if ls.has("update_ratio"):
            return ls.steps, np.nanmean(ls.stats["update_ratio"], axis=1)
    return None


def _r(v: Any, nd: int = 4) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return round(f, nd) if np.isfinite(f) else None


@dataclass(frozen=True)
class DataParams:
    """- lookback: besides the onset step, the steps up to this many before it are examined
      (the one whose outliers explain the most excess wins).
    - outlier_z: a sample is an outlier when (loss - median) / (MAD_TO_SIGMA * MAD) >= outlier_z,
      median and MAD of the per-sample losses of the `reference_steps` steps before the
      examined ones (a wide, uncontaminated reference: a batch with a quarter of bad samples
      would inflate its own MAD), or of the step itself when those are missing.
    - share: the verdict is `data` when the outliers account for >= share of the step's
      excess loss over the run's typical loss, and are at most max_outlier_frac of the batch.
    - min_excess_sigma: below this many noise units of excess the step is not elevated and
      the verdict is `inconclusive`.
    - top_n: samples listed in the report.
    """

    lookback: int = 2
    reference_steps: int = 16
    outlier_z: float = 3.5
    share: float = 0.5
    max_outlier_frac: float = 0.5
    min_excess_sigma: float = 3.0
    top_n: int = 10


@dataclass
class DataAttribution:
    step: int | None = None
    verdict: str = "unknown"  # data | not_data | inconclusive | unknown
    reason: str = ""
    excess: float | None = None
    top_share: float | None = None
    n_outliers: int = 0
    n_samples: int = 0
    typical_loss: float | None = None
    step_median: float | None = None
    samples: list[dict] = field(default_factory=list)
    outlier_ids: list[int] = field(default_factory=list)
    batch_feature_median: dict = field(default_factory=dict)
    outlier_reference: str = ""


def rank_step_samples(ss: Any, typical: float, noise: float, p: DataParams,
                      reference: np.ndarray | None = None) -> DataAttribution:
    """Rank one step's samples (`ss`: DataFrame with sample_id, loss and maybe n_tokens, rank)
    by excess loss and give the verdict. `reference`: per-sample losses of the steps before
    the episode; outliers are judged against them (enough of them: at least 4 x the batch),
    else against the step's own samples."""
    out = DataAttribution(typical_loss=_r(typical, 6))
    # numpy over the step's few rows: pandas costs ~10 ms a call on an 8-row frame
    loss_all = ss["loss"].to_numpy(dtype=np.float64)
    fin = np.isfinite(loss_all)
    out.step = int(ss["step"].iloc[0]) if len(ss) else None
    out.n_samples = n = int(fin.sum())
    if n == 0:
        out.reason = "no finite per-sample losses at this step"
        return out
    loss = loss_all[fin]
    sid = ss["sample_id"].to_numpy(dtype=np.int64)[fin]
    rank = ss["rank"].to_numpy()[fin] if "rank" in ss.columns else None
    ntok = ss["n_tokens"].to_numpy(dtype=np.float64)[fin] if "n_tokens" in ss.columns else None
    w = ntok if ntok is not None and np.isfinite(ntok).all() and ntok.sum() > 0 else np.ones_like(loss)
    w = w / w.sum()
    med = float(np.median(loss))
    ref = reference[np.isfinite(reference)] if reference is not None else np.zeros(0)
    if ref.size >= max(4 * n, 16):
        out.outlier_reference = f"{ref.size} per-sample losses of the steps before the episode"
    else:
        ref = loss
        out.outlier_reference = "the step's own samples"
    rmed = float(np.median(ref))
    sc = max(MAD_TO_SIGMA * float(np.median(np.abs(ref - rmed))), 1e-12, 1e-6 * abs(rmed))
    zs = (loss - rmed) / sc
    ex_step, ex_run = loss - med, loss - typical
    order = np.lexsort((sid, -ex_step))  # by excess over the step's median, then sample id
    is_out = zs >= p.outlier_z
    excess = float(np.sum(w * ex_run))
    contrib = float(np.sum(w[is_out] * ex_run[is_out]))
    out.excess = _r(excess, 6)
    out.step_median = _r(med, 6)
    out.n_outliers = int(is_out.sum())
    out.outlier_ids = [int(sid[i]) for i in order if is_out[i]]
    out.top_share = _r(contrib / excess, 4) if excess > 0 else None
    # the top samples are those above the step's median (and every outlier): in a batch
    # smaller than top_n the tail would otherwise list below-median samples as "top"
    top = [i for i in order if ex_step[i] > 0 or is_out[i]][: max(p.top_n, out.n_outliers)]
    out.samples = [
        {"sample_id": int(sid[i]), "rank": int(rank[i]) if rank is not None else None,
         "loss": _r(loss[i], 6),
         "n_tokens": int(ntok[i]) if ntok is not None and np.isfinite(ntok[i]) else None,
         "excess_vs_step": _r(ex_step[i], 6), "excess_vs_run": _r(ex_run[i], 6),
         "z": _r(zs[i], 3), "outlier": bool(is_out[i])}
        for i in top
    ]
    out.verdict, out.reason = _verdict(out.step, n, out.n_outliers, excess, contrib, typical, noise, p)
    return out


def _verdict(step: int | None, n: int, n_outliers: int, excess: float, contrib: float, typical: float,
             noise: float, p: DataParams) -> tuple[str, str]:
    """(verdict, reason) of one step: `data` when a few outliers account for most of the
    step's excess loss over the run's typical loss (see DataParams)."""
    noise_floor = p.min_excess_sigma * noise if np.isfinite(noise) else 0.0
    if excess <= noise_floor or excess <= 0:
        return "inconclusive", (f"step {step}: mean sample loss exceeds the typical loss {typical:.4g} by "
                                f"{excess:.3g}, within {p.min_excess_sigma:g} noise units ({noise:.3g})")
    if n_outliers == 0:
        return "not_data", (f"step {step}: no sample stands out (robust z >= {p.outlier_z:g}); the "
                            f"excess loss {excess:.3g} is spread over all {n} samples")
    if n_outliers > p.max_outlier_frac * n:
        return "not_data", f"step {step}: {n_outliers} of {n} samples stand out: the batch as a whole is off"
    if contrib / excess >= p.share:
        return "data", (f"step {step}: the top {n_outliers} of {n} samples account for "
                        f"{100 * contrib / excess:.0f}% of the step's excess loss {excess:.3g}")
    return "not_data", (f"step {step}: the top {n_outliers} samples account for only "
                        f"{100 * contrib / excess:.0f}% of the excess loss {excess:.3g}; the rest is "
                        f"spread over the batch")


def data_attribution(
    ss: Any, onset_step: int, typical: float, noise: float, p: DataParams = DataParams()
) -> DataAttribution:
    """Examine the onset step and up to `p.lookback` steps before it (`ss` also holds the
    `p.reference_steps` steps before those); return the onset step's ranking unless an
    earlier step explains the spike with data."""
    if ss is None or len(ss) == 0:
        return DataAttribution(reason="no sample_stats rows at or before the onset step")
    first = onset_step - p.lookback
    ref = ss.loc[(ss["step"] < first) & (ss["step"] >= first - p.reference_steps), "loss"]
    ref = ref.to_numpy(dtype=np.float64)
    results = []
    for s in range(onset_step, first - 1, -1):
        sub = ss[ss["step"] == s]
        if len(sub):
            results.append(rank_step_samples(sub, typical, noise, p, ref))
    if not results:
        return DataAttribution(reason=f"no sample_stats rows for steps {onset_step - p.lookback}..{onset_step}")
    data = [r for r in results if r.verdict == "data"]
    if data:
        return max(data, key=lambda r: (r.top_share or 0.0) * (r.excess or 0.0))
    return results[0]
