"""What forensics says about one episode beyond its shape: which signals led it (precursors),
which parameter tensors jumped (layers) and whether a few samples of the batch caused it
(data), plus the window of the curve the report zooms into.

Separate from `analyze.py`, which decides which episodes get this detail and assembles the
result, and from the rules themselves (`precursors.py`, `attribute.py`): this module reads
the windows of layer and sample statistics around one episode and hands them to the rules.
`Availability` decides once per run which of these analyses the run's data allows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from k2repro.forensics.attribute import (
    DataAttribution,
    LayerAttribution,
    data_attribution,
    layer_attribution,
    update_ratio,
)
from k2repro.forensics.episodes import Episode
from k2repro.forensics.precursors import Crossing, first_crossing, lead_signal
from k2repro.forensics.sample_text import TextContext
from k2repro.forensics.source import LayerWindow, RunSource, finite_any

if TYPE_CHECKING:
    from k2repro.forensics.analyze import ForensicsParams

# Step signals that may lead a loss spike (besides per-layer grad norms and the update ratio).
PRECURSOR_STEP_SIGNALS = ("grad_norm", "logz_mean", "loss_max", "lr")


class Availability:
    """Which analyses the data allows, decided once per run; `lines` say why one is not."""

    def __init__(self, src: RunSource, st: dict[str, np.ndarray], p: ForensicsParams) -> None:
        self.lines: list[str] = []
        self.step_signals = [s for s in PRECURSOR_STEP_SIGNALS if s != p.signal and finite_any(st.get(s))]
        for s in PRECURSOR_STEP_SIGNALS:
            if s != p.signal and s not in self.step_signals:
                self.lines.append(f"precursor {s}: steps.{s} has no values in this run")
        self.layers = src.has_rows("layer_stats")
        if not self.layers:
            self.lines.append("layer attribution, update/param-ratio and per-layer grad-norm precursors: "
                              "no layer_stats rows (audit.layer_stats_every=0, or an import)")
        self.samples = src.has_rows("sample_stats")
        if not self.samples:
            self.lines.append("data attribution: no sample_stats rows (per-sample losses were not logged)")
        hp = src.hparams()
        try:
            self.layer_every = max(1, int(float(hp.get("audit.layer_stats_every", 1) or 1)))
        except ValueError:
            self.layer_every = 1
        self.hparams = hp


def precursors_and_layers(ep: Episode, src: RunSource, st: dict[str, np.ndarray], p: ForensicsParams,
                          avail: Availability) -> tuple[list[Crossing], Crossing | None, LayerAttribution | None]:
    """(every signal's first crossing, earliest first; the lead signal; the layer attribution)
    of one episode of the primary signal."""
    steps = st["step"]
    crossings: list[Crossing] = []
    c = first_crossing(p.signal, steps, st[p.signal], ep.onset_step, ep.peak_step, p.rule, p.precursors)
    crossings.append(c or Crossing(p.signal, ep.onset_step, 0, float(ep.max_z)))
    for s in avail.step_signals:
        c = first_crossing(s, steps, st[s], ep.onset_step, ep.peak_step, p.rule, p.precursors)
        if c:
            crossings.append(c)
    layers = None
    if avail.layers:
        ls = layer_window(src, ep, p, avail)
        layers = layer_attribution(ls, ep.onset_step, ep.peak_step, p.rule, p.precursors, p.layers)
        ur = update_ratio(ls)
        if ur is not None:
            c = first_crossing("update_ratio", ur[0], ur[1], ep.onset_step, ep.peak_step, p.rule, p.precursors)
            if c:
                crossings.append(c)
        ftc = layers.first_to_cross
        if ftc:
            crossings.append(Crossing(f"layer_grad_norm:{ftc['param']}", ftc["step"], ftc["lead_steps"],
                                      float(ftc["z"] or np.nan)))
    return sorted(crossings, key=lambda c: (-c.lead_steps, c.signal)), lead_signal(crossings), layers


def data_of(ep: Episode, src: RunSource, p: ForensicsParams, faults: list[dict],
            text_ctx: TextContext | None) -> DataAttribution:
    """The data attribution of one episode: its onset step's samples ranked, those a recorded
    fault injected marked, and their text and features where the packed data was found."""
    ss = src.samples(ep.onset_step - p.data.lookback - p.data.reference_steps, ep.onset_step)
    data = data_attribution(ss, ep.onset_step, ep.baseline, ep.noise, p.data)
    injected = injected_ids(faults)
    for s in data.samples:
        if s["sample_id"] in injected:
            s["injected"] = injected[s["sample_id"]]
    if text_ctx is not None:
        text_ctx.enrich(data, ss)
    return data


def injected_ids(faults: list[dict]) -> dict[int, str]:
    """Sample id -> which recorded fault injected it ("bad_batch at step 45")."""
    out: dict[int, str] = {}
    for f in faults:
        d = f.get("detail") or {}
        for sid in d.get("sample_ids") or []:
            try:
                out[int(sid)] = f"{d.get('kind', 'fault')} at step {f.get('step')}"
            except (TypeError, ValueError):
                continue
    return out


def layer_window(src: RunSource, ep: Episode, p: ForensicsParams, avail: Availability) -> LayerWindow:
    """layer_stats rows from enough logged points before onset (robust-z history + the
    pre-onset baseline) to the heatmap's right edge; the logging interval is taken from
    `audit.layer_stats_every` and checked against the rows found."""
    need = p.rule.history_needed + p.layers.pre_points + 4
    every = avail.layer_every
    for _ in range(2):
        lo = ep.onset_step - p.precursors.lookback - need * every
        hi = max(ep.peak_step, ep.onset_step) + (p.layers.heat_after + 1) * every
        ls = src.layer_window(lo, hi)
        if len(ls) == 0:
            return ls
        us = ls.steps
        est = int(np.median(np.diff(us))) if us.size > 1 else every
        if est <= every:
            return ls
        every = est
    return ls


def zoom(st: dict[str, np.ndarray], ep: Episode) -> dict[str, np.ndarray]:
    """The stretch of the curve around the episode that the report plots."""
    steps = st["step"]
    width = max(ep.end_step - ep.onset_step, 8)
    lo = int(np.searchsorted(steps, ep.onset_step - max(2 * width, 32), side="left"))
    hi = int(np.searchsorted(steps, min(ep.end_step, ep.peak_step + 4 * width) + max(width, 16), side="right"))
    return {k: v[lo:hi] for k, v in st.items() if k in ("step", "loss", "grad_norm", "lr", "logz_mean")}


def magnitude_key(e: Episode) -> float:
    """An episode's magnitude for ordering, non-finite (a NaN loss) as the largest."""
    return float("inf") if not np.isfinite(e.magnitude) else float(e.magnitude)


__all__ = ["PRECURSOR_STEP_SIGNALS", "Availability", "data_of", "injected_ids", "layer_window",
           "magnitude_key", "precursors_and_layers", "zoom"]
