"""Report figures as PNG bytes (matplotlib, Agg backend: no display, no fonts fetched), so
the HTML report can inline them and open offline.

Long runs are drawn from a min/max envelope per pixel column, so a 1M-step log plots in
a fraction of a second and a one-step spike still shows.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

CLASS_COLORS = {"transient": "#f2c14e", "slow": "#f78154", "persistent": "#b33f62",
                "divergence": "#4d2d52"}
MAX_POINTS = 2000


def _mpl() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def envelope(steps: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, ...]:
    """(x, lo, hi) per bucket of consecutive points; lo == hi when no bucketing is needed."""
    n = steps.size
    if n <= max_points:
        return steps, y, y
    b = int(np.ceil(n / max_points))
    m = (n // b) * b
    yy = np.where(np.isfinite(y[:m]), y[:m], np.nan).reshape(-1, b)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lo, hi = np.nanmin(yy, axis=1), np.nanmax(yy, axis=1)
    return steps[:m].reshape(-1, b)[:, 0], lo, hi


def _png(fig: Any) -> bytes:
    plt = _mpl()
    buf = io.BytesIO()
    # fixed margins (set per figure) instead of bbox_inches="tight", which draws everything twice
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _shade(ax: Any, spikes: list[Any]) -> None:
    for sp in spikes:
        e = sp.episode
        ax.axvspan(e.onset_step, max(e.end_step, e.onset_step + 1), color=CLASS_COLORS.get(e.cls, "#999"),
                   alpha=0.35, lw=0)


def overview_png(result: Any) -> bytes | None:
    """Loss, grad norm and lr over the whole run, spikes shaded by class."""
    s = result.series
    if "step" not in s or s["step"].size == 0:
        return None
    panels = [k for k in ("loss", "grad_norm", "lr") if k in s and np.isfinite(s[k]).any()]
    if not panels:
        return None
    plt = _mpl()
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 0.5 + 2.0 * len(panels)), sharex=True, squeeze=False)
    fig.subplots_adjust(left=0.08, right=0.98, top=1 - 0.25 / (0.5 + 2.0 * len(panels)),
                        bottom=0.5 / (0.5 + 2.0 * len(panels)), hspace=0.12)
    for ax, k in zip(axes[:, 0], panels, strict=True):
        x, lo, hi = envelope(s["step"], s[k])
        if lo is hi:
            ax.plot(x, hi, lw=0.8, color="#1f4e79")
        else:
            ax.fill_between(x, lo, hi, color="#1f4e79", lw=0.5, step="mid")
        _shade(ax, result.spikes)
        ax.set_ylabel(k)
        if k in ("grad_norm", "lr") and np.nanmin(np.where(s[k] > 0, s[k], np.nan)) > 0:
            ax.set_yscale("log")
        nf = ~np.isfinite(s[k])
        if nf.any():
            ax.plot(s["step"][nf], np.full(nf.sum(), np.nanmax(hi)), "x", color="#c00", ms=3,
                    label="non-finite")
            ax.legend(loc="upper right", fontsize=7)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.5) for c in CLASS_COLORS.values()]
    axes[0, 0].legend(handles, list(CLASS_COLORS), loc="upper right", fontsize=7, ncol=4)
    return _png(fig)


def zoom_png(sp: Any, signal: str = "loss") -> bytes | None:
    """The episode's window: the signal, grad norm on a second axis, onset/peak/end and the
    precursor crossings."""
    z = sp.zoom
    if not z or "step" not in z or z["step"].size == 0 or signal not in z:
        return None
    plt = _mpl()
    e = sp.episode
    fig, ax = plt.subplots(figsize=(8, 2.8))
    fig.subplots_adjust(left=0.1, right=0.9, top=0.88, bottom=0.18)
    ax.plot(z["step"], z[signal], ".-", ms=3, lw=0.8, color="#1f4e79", label=signal)
    ax.axvspan(e.onset_step, max(e.end_step, e.onset_step + 1), color=CLASS_COLORS.get(e.cls, "#999"),
               alpha=0.3, lw=0)
    if np.isfinite(e.baseline):
        ax.axhline(e.baseline, color="#555", lw=0.7, ls=":", label="baseline")
    ax.axvline(e.onset_step, color="#333", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel(signal)
    if "grad_norm" in z and np.isfinite(z["grad_norm"]).any():
        ax2 = ax.twinx()
        ax2.plot(z["step"], z["grad_norm"], lw=0.8, color="#c05a00", alpha=0.8, label="grad_norm")
        ax2.set_ylabel("grad_norm", color="#c05a00")
    for c in sp.precursors:
        if c.signal != signal and c.lead_steps > 0:
            ax.axvline(c.step, color="#c05a00", lw=0.6, alpha=0.6)
    ax.set_title(f"steps {e.onset_step}-{e.end_step}: {e.cls}, {e.severity}", fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)


def heatmap_png(sp: Any) -> bytes | None:
    """log10(grad norm / pre-onset median) per parameter tensor and logged step."""
    la = sp.layers
    if la is None or la.heat is None or la.heat.size == 0 or not np.isfinite(la.heat).any():
        return None
    plt = _mpl()
    h = la.heat
    n = len(la.heat_params)
    height = 0.9 + 0.17 * n
    fig, ax = plt.subplots(figsize=(8, height))
    fig.subplots_adjust(left=0.33, right=0.84, top=1 - 0.15 / height, bottom=0.55 / height)
    lim = max(0.5, float(np.nanmax(np.abs(h))))
    steps = la.heat_steps
    im = ax.imshow(h, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest",
                   extent=(steps[0] - 0.5, steps[-1] + 0.5, n - 0.5, -0.5))
    ax.set_yticks(range(n))
    ax.set_yticklabels([p if len(p) <= 40 else "..." + p[-37:] for p in la.heat_params], fontsize=6)
    ax.axvline(sp.episode.onset_step, color="k", lw=0.8, ls="--")
    ax.set_xlabel("step")
    cax = fig.add_axes((0.86, 0.55 / height, 0.015, 1 - 0.7 / height))
    fig.colorbar(im, cax=cax, label="log10 grad norm / before")
    return _png(fig)
