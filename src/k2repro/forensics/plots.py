"""Report figures as interactive charts: the plotting of `k2repro ui` (assets/plot.js on the
vendored uPlot) with the data embedded, so an HTML report zooms and hovers offline, with no
server and nothing fetched (the assets are inlined: about 60 kB per report).

Why not PNGs any more: on a long run a short episode was thinner than a pixel, nothing could
be zoomed, and readers asked for values. Long series are still cut to a min/max envelope per
bucket (a one-step spike always survives); each episode is drawn at least 4 px wide with a
marker on top; the early loss no longer sets the y-range (it is clipped, and said so); grad
norm gets its own axis and legend entry; heatmap labels are 12 px.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

ASSET_DIR = Path(__file__).resolve().parent / "assets"
MAX_POINTS = 2000
WARMUP_SHARE = 0.05  # the first 5% of steps do not set the loss axis of the overview


def envelope(steps: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) with at most `max_points` points: for each bucket of consecutive steps its
    minimum and its maximum, in step order (so a one-step spike is kept)."""
    n = steps.size
    if n <= max_points:
        return steps, y
    b = int(math.ceil(n / (max_points // 2)))
    xs, ys = [], []
    for i in range(0, n, b):
        seg = y[i:i + b]
        fin = np.isfinite(seg)
        if not fin.any():
            continue
        idx = np.flatnonzero(fin)
        lo, hi = idx[np.argmin(seg[fin])], idx[np.argmax(seg[fin])]
        for j in sorted({lo, hi}):
            xs.append(steps[i + j])
            ys.append(seg[j])
    return np.asarray(xs), np.asarray(ys)


def _list(a: np.ndarray) -> list:
    return [None if not math.isfinite(float(v)) else float(v) for v in np.asarray(a, dtype=float)]


def _bands(spikes: list[Any]) -> list[dict]:
    return [{"from": int(sp.episode.onset_step), "to": int(max(sp.episode.end_step, sp.episode.onset_step)),
             "severity": sp.episode.severity, "label": f"#{i} {sp.episode.cls} · {sp.episode.severity}"}
            for i, sp in enumerate(spikes, 1)]


def joint(xs_list: list[np.ndarray], ys_list: list[np.ndarray]) -> tuple[list, list[list]]:
    """Several (x, y) series on one x axis (uPlot's data layout): None where a series has no point."""
    all_x = sorted({float(v) for xs in xs_list for v in xs})
    pos = {x: i for i, x in enumerate(all_x)}
    out = []
    for xs, ys in zip(xs_list, ys_list, strict=True):
        col: list = [None] * len(all_x)
        for x, y in zip(xs, ys, strict=True):
            col[pos[float(x)]] = None if not math.isfinite(float(y)) else float(y)
        out.append(col)
    return all_x, out


def post_warmup_range(steps: np.ndarray, y: np.ndarray) -> list[float] | None:
    """The loss axis from the values after the warm-up (0.1st..99.9th percentile, padded), so
    the early loss does not squash the rest; None when that would hide nothing."""
    fin = np.isfinite(y)
    if fin.sum() < 50:
        return None
    cut = steps[0] + WARMUP_SHARE * (steps[-1] - steps[0])
    tail = y[fin & (steps >= cut)]
    if tail.size < 10:
        return None
    lo, hi = np.percentile(tail, [0.1, 100.0])
    pad = 0.08 * max(hi - lo, 1e-12)
    if np.nanmax(y[fin]) <= hi + pad:
        return None
    return [float(lo - pad), float(hi + pad)]


def overview_spec(result: Any) -> dict | None:
    """Loss (and grad norm on its own right axis) over the whole run, every episode marked."""
    s = result.series
    if "step" not in s or s["step"].size == 0 or "loss" not in s or not np.isfinite(s["loss"]).any():
        return None
    lx, ly = envelope(s["step"], s["loss"])
    xs_l, ys_l, series = [lx], [ly], [{"label": "loss", "color": "#1f4e79"}]
    if "grad_norm" in s and np.isfinite(s["grad_norm"]).any():
        gx, gy = envelope(s["step"], s["grad_norm"])
        xs_l.append(gx)
        ys_l.append(gy)
        series.append({"label": "grad_norm", "color": "rgba(192,90,0,0.45)", "scale": "y2", "width": 0.8,
                       "logY": bool(np.nanmin(np.where(gy > 0, gy, np.nan)) > 0)})
    xs, cols = joint(xs_l, ys_l)
    for sr, col in zip(series, cols, strict=True):
        sr["ys"] = col
        sr["spanGaps"] = True  # the envelopes keep different steps: a series has no point at the other's
    rng = post_warmup_range(s["step"], s["loss"])
    return {"kind": "line", "xs": xs, "series": series, "bands": _bands(result.spikes), "yLabel": "loss",
            "yRange": rng, "height": 300,
            "note": ("loss axis from the values after the first 5% of steps: the early loss runs off the top"
                     if rng else "")}


def zoom_spec(sp: Any, signal: str = "loss") -> dict | None:
    """The episode's window with a lead-in before the onset: the signal, grad norm on a second
    axis, baseline, onset and the precursor crossings."""
    z = sp.zoom
    if not z or "step" not in z or z["step"].size == 0 or signal not in z:
        return None
    e = sp.episode
    series = [{"label": signal, "ys": _list(z[signal]), "color": "#1f4e79", "points": True}]
    if "grad_norm" in z and np.isfinite(z["grad_norm"]).any() and signal != "grad_norm":
        series.append({"label": "grad_norm", "ys": _list(z["grad_norm"]), "color": "#c05a00", "scale": "y2",
                       "width": 1.0})
    if e.baseline is not None and math.isfinite(e.baseline):
        series.append({"label": "baseline", "ys": [float(e.baseline)] * int(z["step"].size), "color": "#777",
                       "dash": [3, 3], "width": 1.0})
    marks = [{"x": int(e.onset_step), "label": "onset", "color": "#333", "row": 0}]
    marks += [{"x": int(c.step), "label": f"{c.signal} crossed", "color": "#c05a00", "row": 1 + k % 2}
              for k, c in enumerate(sp.precursors) if c.signal != signal and c.lead_steps > 0]
    return {"kind": "line", "xs": _list(z["step"]), "series": series, "yLabel": signal, "height": 260,
            "bands": [{"from": int(e.onset_step), "to": int(max(e.end_step, e.onset_step)), "severity": e.severity,
                       "label": f"{e.cls} · {e.severity}"}], "marks": marks}


def heatmap_spec(sp: Any) -> dict | None:
    """log10(grad norm / pre-onset median) per parameter tensor and logged step."""
    la = sp.layers
    if la is None or la.heat is None or la.heat.size == 0 or not np.isfinite(la.heat).any():
        return None
    steps = [int(x) for x in la.heat_steps]
    return {"kind": "heat", "diverging": True, "label": "(log10 grad norm / before onset)",
            "data": {"params": list(la.heat_params), "bucket_start": steps, "hi": steps[-1],
                     "z": [_list(row) for row in la.heat]}}


def assets_html() -> str:
    """uPlot's CSS and JS and plot.js, inlined (read from the package: nothing is fetched)."""
    css = (ASSET_DIR / "vendor" / "uPlot.min.css").read_text(encoding="utf-8")
    # the licence header's link without its scheme: a report holds no literal external URL
    js = (ASSET_DIR / "vendor" / "uPlot.iife.min.js").read_text(encoding="utf-8").replace("https://", "")
    return (f"<style>{css}\n.k2chart{{margin:.4em 0}}#k2tip{{position:fixed;pointer-events:none;background:#1d2330;"
            f"color:#fff;padding:3px 7px;border-radius:4px;font-size:12px;z-index:10}}</style>"
            f"<script>{_script_safe(js)}</script>")  # plot.js goes last (chart_html needs the divs first)


def plot_script() -> str:
    return f'<div id="k2tip" hidden></div><script>{_script_safe((ASSET_DIR / "plot.js").read_text(encoding="utf-8"))}</script>'


def chart_html(spec: dict | None, alt: str) -> str:
    """A chart's placeholder with its data; plot_script() draws it."""
    if not spec:
        return f'<p class="note">({html.escape(alt)}: no data to plot)</p>'
    note = spec.pop("note", "")
    data = _script_safe(json.dumps(spec, allow_nan=False))
    return (f'<div class="k2chart" role="img" aria-label="{html.escape(alt, quote=True)}">'
            f'<script type="application/json">{data}</script></div>'
            + (f'<p class="note">{html.escape(note)}</p>' if note else ""))


def _script_safe(text: str) -> str:
    """Text that cannot close its <script> element early."""
    return text.replace("</", "<\\/")
