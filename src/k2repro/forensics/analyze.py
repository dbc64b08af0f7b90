"""`analyze_run`: find, classify and explain the loss spikes of one run, as SQL against the
store's views. Runs every analysis the data allows and lists the others in `impossible` with
the reason.

This module holds what forensics is asked and what it answers (`ForensicsParams`, `Spike`,
`ForensicsResult`) and the order of the stages, each a function: read the logical run
(`logical_run.py`), describe its sampling (`sampling.py`), run the detectors (`detect.py`),
find each signal's episodes (`episodes.py`), weigh the lineage's evidence and the peers'
guards (`peers.py`), then explain the largest episodes (`explain.py`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from k2repro.core.spike import RobustZ
from k2repro.errors import BadInputError
from k2repro.forensics.attribute import DataAttribution, DataParams, LayerAttribution, LayerParams
from k2repro.forensics.classify import judge
from k2repro.forensics.detect import Detection, DetectorSpec, params_dict, robust_z
from k2repro.forensics.episodes import Episode, EpisodeParams, find_episodes
from k2repro.forensics.explain import (
    Availability,
    data_of,
    magnitude_key,
    precursors_and_layers,
    zoom,
)
from k2repro.forensics.logical_run import find_restarts, read_logical_run, restart_evidence
from k2repro.forensics.parallel import Precomputed, precompute
from k2repro.forensics.peers import peer_firings, peer_summary
from k2repro.forensics.precursors import Crossing, PrecursorParams
from k2repro.forensics.sample_text import TextContext
from k2repro.forensics.sampling import sampling_summary
from k2repro.forensics.source import RunSource, finite_any, footer_cache

INTERVENTION_KINDS = ("skip", "rollback", "abort")


@dataclass(frozen=True)
class ForensicsParams:
    """Everything tunable, with the documented defaults (docs/forensics.md)."""

    signal: str = "loss"
    rule: RobustZ = RobustZ()
    # side-by-side detectors on the primary signal; the robust_z entry uses `rule`
    detectors: tuple[DetectorSpec, ...] = (
        DetectorSpec("robust_z"), DetectorSpec("ewm_ratio"), DetectorSpec("mean_ratio"),
        DetectorSpec("nonfinite"),
    )
    # other step signals scanned whole with the robust_z rule; their detectors are named
    # "<signal>:robust_z"
    scan_signals: tuple[str, ...] = ("loss_max",)
    # the signals whose episodes are found (each with the same step-aware rules); an episode
    # of another signal that overlaps one of the primary signal's is folded into it as a note
    episode_signals: tuple[str, ...] = ("loss", "grad_norm")
    # read the logical run: the ancestors' steps up to each resume point come first, so a
    # run resumed, rolled back or imported as restart segments reads as one curve
    lineage: bool = True
    # show where peers' built-in guards (OLMo-core, llm-foundry, Megatron-LM) would fire
    peers: bool = True
    # a detector that flags more than this share of points gets a note saying why it does
    # not open episodes
    noisy_share: float = 0.02
    # the detectors whose flags open episodes. loss_max (the worst sample of the step) is
    # among them because a few bad samples in a batch barely move the mean loss but always
    # move the max: in a tiny 16-sample run a 25% random-token batch is 3 sigma on the loss
    # and 12 on loss_max
    episode_detectors: tuple[str, ...] = ("robust_z", "nonfinite", "loss_max:robust_z")
    # a flag of another signal's detector opens an episode only where the primary signal's
    # robust z is at least this: the max of a batch has a heavier upper tail than the mean,
    # and alone flagged 8 noise points in a synthetic million-step log (3 with this bar);
    # the real bad batches of a tiny 2-rank run were at loss z 3.1-4.2
    corroborate_z: float = 2.0
    episodes: EpisodeParams = EpisodeParams()
    precursors: PrecursorParams = PrecursorParams()
    layers: LayerParams = LayerParams()
    data: DataParams = DataParams()
    # processes for the whole-series passes: with 2, the other signals' robust z (loss_max,
    # grad_norm) is computed in a forked child while this process works on the primary
    # signal (same values; 1 = all here; logs under parallel.MIN_POINTS points never fork)
    workers: int = 2
    max_detailed: int = 50
    data_dir: str | None = None
    split: str = "train"
    text_chars: int = 400

    def resolved_detectors(self) -> tuple[DetectorSpec, ...]:
        return tuple(DetectorSpec("robust_z", self.rule, d.name) if d.kind == "robust_z" else d
                     for d in self.detectors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "signal": self.signal,
            "rule": params_dict(self.rule),
            "detectors": [{"name": d.name, "kind": d.kind, **params_dict(d.params)}
                          for d in self.resolved_detectors()],
            "episode_detectors": list(self.episode_detectors),
            "corroborate_z": self.corroborate_z,
            "scan_signals": list(self.scan_signals),
            "episodes": params_dict(self.episodes),
            "precursors": params_dict(self.precursors),
            "layers": params_dict(self.layers),
            "data": params_dict(self.data),
            "max_detailed": self.max_detailed,
            "episode_signals": list(self.episode_signals),
            "lineage": self.lineage,
        }


@dataclass
class Spike:
    """One episode with everything forensics found about it."""

    episode: Episode
    detectors: list[str] = field(default_factory=list)
    precursors: list[Crossing] = field(default_factory=list)
    lead: Crossing | None = None
    layers: LayerAttribution | None = None
    data: DataAttribution | None = None
    faults: list[dict] = field(default_factory=list)
    interventions: list[dict] = field(default_factory=list)
    detailed: bool = True
    zoom: dict[str, np.ndarray] = field(default_factory=dict)
    causal: dict | None = None  # the causal check's findings (--replay: forensics.causal)

    @property
    def top_layer(self) -> str | None:
        if self.layers and self.layers.top:
            return self.layers.top[0]["param"]
        return None

    @property
    def top_samples(self) -> list[int]:
        if self.data and self.data.verdict == "data":
            return list(self.data.outlier_ids)
        return []

    def row(self) -> dict[str, Any]:
        """The `spikes` table's columns (docs/audit-store.md, `spikes`)."""
        e = self.episode
        return {
            "onset_step": e.onset_step, "peak_step": e.peak_step, "end_step": e.end_step,
            "magnitude": float(e.magnitude), "class": e.cls, "severity": e.severity,
            "lead_signal": self.lead.signal if self.lead else None,
            "top_layer": self.top_layer, "top_samples": self.top_samples,
            "signal": e.signal, "baseline": float(e.baseline), "peak_value": float(e.peak_value),
            "excess": float(e.excess), "max_z": float(e.max_z), "reason": e.reason,
        }


@dataclass
class ForensicsResult:
    """Everything `analyze_run` found about one run: what the reports and the `spikes` rows
    are made of (forensics/report.py)."""

    run_id: str
    params: ForensicsParams
    run: dict = field(default_factory=dict)
    n_steps: int = 0
    step_range: tuple[int, int] | None = None
    signals: list[str] = field(default_factory=list)
    detectors: dict[str, dict] = field(default_factory=dict)
    spikes: list[Spike] = field(default_factory=list)
    impossible: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    faults: list[dict] = field(default_factory=list)
    series: dict[str, np.ndarray] = field(default_factory=dict)
    flags: dict[str, np.ndarray] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    peers: dict[str, dict] = field(default_factory=dict)
    segments: list[dict] = field(default_factory=list)
    restarts: list[dict] = field(default_factory=list)


def rank_key(e: Episode) -> tuple:
    """What matters first: malignant before benign, then excess x duration."""
    ex = e.excess if np.isfinite(e.excess) else float("inf")
    rel = ex / e.baseline if e.baseline and np.isfinite(e.baseline) and e.baseline > 0 else ex
    return (e.severity != "malignant", -(rel * max(1, e.duration_steps)), e.onset_step)


def analyze_run(con_or_store: Any, run_id: str, params: ForensicsParams = ForensicsParams()) -> ForensicsResult:
    """Find, classify and explain the spikes of `run_id` (a Store or a DuckDB connection with
    the store's views). Raises BadInputError when the run is not in the store.

    Nothing passed in is changed: the connection's settings are restored (source.footer_cache)
    and the result is a new object."""
    src = RunSource(con_or_store, run_id)
    with footer_cache(src.con):
        return _analyze(src, run_id, params)


def _analyze(src: RunSource, run_id: str, p: ForensicsParams) -> ForensicsResult:
    """The stages in order. Each is a function that returns what it found; this one puts the
    findings into a new result and times the stages (`timings`)."""
    t0 = time.perf_counter()
    if not src.exists():
        raise BadInputError(f"no run '{run_id}' in the store (no runs or steps rows for it)")
    res, st, interventions = read_run(src, run_id, p)
    res.timings["read_steps_s"] = time.perf_counter() - t0
    x = st.get(p.signal)
    if x is None or not finite_any(x):
        res.impossible += [_no_detection(x, p.signal), *Availability(src, st, p).lines]
        res.timings["total_s"] = time.perf_counter() - t0
        return res
    res.impossible += _short_history(x, p)
    with _timed(res.timings, "detect_s"):
        # the other signals' whole-series passes start now (in a child process with workers >= 2)
        pre = precompute({s: st[s] for s in dict.fromkeys((*p.scan_signals, *p.episode_signals))
                          if s != p.signal and finite_any(st.get(s))}, st["step"], p.rule, p.workers)
    with closing(pre):
        with _timed(res.timings, "peers_s"):
            firings = peer_firings(st) if p.peers else {}  # while the child computes
        with _timed(res.timings, "detect_s"):
            dets, res.detectors, res.flags, notes = run_detectors(st, p, pre)
            res.notes += notes
        with _timed(res.timings, "episodes_s"):
            eps = find_all_episodes(st, dets, interventions, p, pre)
    with _timed(res.timings, "episodes_s"):
        res.restarts = find_restarts(src, res.segments)
        weigh_restarts(src, eps, res.restarts, p.episodes, last_step=int(st["step"][-1]))
    with _timed(res.timings, "peers_s"):
        if p.peers:
            res.peers = peer_summary(eps, firings)
    with _timed(res.timings, "attribute_s"):
        res.spikes, impossible, notes = explain_episodes(src, st, eps, dets, res.faults, interventions, p)
        res.impossible += impossible
        res.notes += notes
    res.notes.append("causal check (--replay): not run")
    res.timings["total_s"] = time.perf_counter() - t0
    return res


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds the block takes to `timings[key]` (a stage may run in several parts)."""
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t


def read_run(src: RunSource, run_id: str, p: ForensicsParams) -> tuple[ForensicsResult, dict[str, np.ndarray],
                                                                      list[dict]]:
    """Stage: a new result describing the run (its runs row, the logical run's signals, their
    sampling, the faults injected), the step signals, and the guard's interventions."""
    run = src.run_row()
    logical = read_logical_run(src, run, p.signal, p.lineage)
    st = logical.series
    steps = st["step"]
    events = src.events()
    for e in events:
        e["detail"] = _parse_detail(e.get("detail"))
    res = ForensicsResult(
        run_id=run_id, params=p, run=run, n_steps=int(steps.size),
        step_range=(int(steps[0]), int(steps[-1])) if steps.size else None,
        signals=[c for c in st if c not in ("step", "skipped") and finite_any(st[c])],
        series=dict(st), sampling=sampling_summary(steps, p.episodes), segments=logical.segments,
        notes=list(logical.notes), faults=[e for e in events if e.get("kind") == "fault_injected"])
    return res, st, [e for e in events if e.get("kind") in INTERVENTION_KINDS]


def _no_detection(x: np.ndarray | None, signal: str) -> str:
    n_bad = 0 if x is None else int(x.size)
    return (f"detection: the run has no finite {signal} values"
            + (f" ({n_bad} logged, all non-finite: diverged from the start)" if n_bad else ""))


def _short_history(x: np.ndarray, p: ForensicsParams) -> list[str]:
    n_known = int(np.isfinite(x).sum())
    if n_known > p.rule.min_history:
        return []
    return [f"robust_z detection: {n_known} finite {p.signal} values, the rule needs more than "
            f"min_history={p.rule.min_history}; only non-finite values are detected"]


def _parse_detail(d: Any) -> dict:
    if isinstance(d, dict):
        return d
    if isinstance(d, str) and d.strip():
        try:
            v = json.loads(d)
            return v if isinstance(v, dict) else {"value": v}
        except json.JSONDecodeError:
            return {"text": d}
    return {}


def run_detectors(st: dict[str, np.ndarray], p: ForensicsParams, pre: Precomputed
                  ) -> tuple[dict[str, Detection], dict[str, dict], dict[str, np.ndarray], list[str]]:
    """Stage: every detector side by side on the primary signal, robust_z over the scan
    signals. Returns (detections by name, the report's detector table, flags by
    "signal:detector", notes on detectors too noisy to open episodes)."""
    steps = st["step"]
    table: dict[str, dict] = {}
    flags: dict[str, np.ndarray] = {}
    notes: list[str] = []
    x = st[p.signal]
    dets: dict[str, Detection] = {}
    for spec in p.resolved_detectors():
        dets[spec.name] = spec.run(x, steps)
    for sig in p.scan_signals:
        v = st.get(sig)
        if sig == p.signal or not finite_any(v):
            continue
        dets[f"{sig}:robust_z"] = robust_z(v, p.rule, steps, parts=pre.get(sig))
    n = max(1, int(x.size))
    for name, d in dets.items():
        idx = np.flatnonzero(d.flags)
        sig = name.split(":")[0] if ":" in name else p.signal
        table[name] = {"signal": sig, "kind": d.kind, "n_flagged": int(idx.size),
                       "share": round(idx.size / n, 4),
                       "flagged_steps": [int(s) for s in steps[idx[:50]]],
                       "opens_episodes": name in p.episode_detectors}
        flags[f"{p.signal}:{name}" if ":" not in name else name] = d.flags
        if idx.size / n > p.noisy_share and name not in p.episode_detectors:
            notes.append(
                f"detector {name} flagged {idx.size:,} of {n:,} points ({idx.size / n:.1%}): "
                f"{_NOISY_WHY.get(d.kind, 'its rule is shown for comparison')}, so it does not "
                "open episodes")
    return dets, table, flags, notes


_NOISY_WHY = {
    "ewm_ratio": "a ratio to an exponentially weighted mean fires on every noise burst and "
                 "plateau once the noise is a few percent of the level",
    "mean_ratio": "a ratio to the trailing mean lags a falling loss",
}


def find_all_episodes(st: dict[str, np.ndarray], dets: dict[str, Detection], interventions: list[dict],
                      p: ForensicsParams, pre: Precomputed) -> list[Episode]:
    """Stage: the primary signal's episodes, then each other episode signal's; an episode of
    another signal that overlaps a primary one becomes a note on it, the others stand alone."""
    steps = st["step"]
    names = [n for n in p.episode_detectors if n in dets]
    if not names:
        raise BadInputError(f"episode detectors {list(p.episode_detectors)} are not among "
                            f"the configured detectors {list(dets)}")
    rz = next((d for n, d in dets.items() if d.kind == "robust_z" and ":" not in n), None)
    extra = np.zeros(steps.size, dtype=bool)
    for n in names:
        if ":" in n:
            extra |= dets[n].flags
    ivs = [e for e in interventions if e.get("kind") in ("rollback", "abort")]
    parts = (rz.scores, rz.scale, rz.pred) if rz is not None and rz.scale is not None else None
    eps = find_episodes(steps, st[p.signal], p.rule, p.episodes, extra_flags=extra,
                        corroborate_z=p.corroborate_z, interventions=ivs, signal=p.signal,
                        parts=parts)
    for sig in p.episode_signals:
        v = st.get(sig)
        if sig == p.signal or not finite_any(v):
            continue
        for g in find_episodes(steps, v, p.rule, p.episodes, interventions=ivs, signal=sig,
                               parts=pre.get(sig)):
            hit = [e for e in eps if e.signal == p.signal and e.onset_step <= g.end_step
                   and g.onset_step <= e.end_step]
            if hit:
                hit[0].notes.append(f"{sig} spiked too: steps {g.onset_step}-{g.end_step}, "
                                    f"peak {g.peak_value:.4g} at step {g.peak_step}, "
                                    f"{g.magnitude:.3g}x its baseline")
                continue
            if g.nonfinite:
                continue  # a non-finite grad norm without the loss: the loss's own rule decides
            g.notes.append(f"{sig} burst; the {p.signal} did not spike")
            g.reason += f" ({sig} burst; the {p.signal} did not spike)"
            eps.append(g)
    eps.sort(key=lambda e: (e.onset_step, e.signal != p.signal))
    return eps


def weigh_restarts(src: RunSource, eps: list[Episode], restarts: list[dict], p: EpisodeParams,
                   last_step: int) -> None:
    """Stage: judge again, with the lineage's evidence, each episode that a run restarted
    from a checkpoint before its onset covers (a restart says the spike was malignant)."""
    for ep in eps:
        ev = restart_evidence(src, ep, restarts)
        if ev is not None:
            judge(ep, p, last_step, restart=ev)


def explain_episodes(src: RunSource, st: dict[str, np.ndarray], eps: list[Episode], dets: dict[str, Detection],
                     faults: list[dict], interventions: list[dict], p: ForensicsParams
                     ) -> tuple[list[Spike], list[str], list[str]]:
    """Stage: a Spike for each episode, with precursors, layers and data for the largest
    episodes of the primary signal. Returns (spikes, analyses the data does not allow, notes)."""
    avail = Availability(src, st, p)
    notes: list[str] = []
    order = sorted(range(len(eps)), key=lambda i: -magnitude_key(eps[i]))
    detailed = set([i for i in order if eps[i].signal == p.signal][: p.max_detailed])
    if len(eps) > p.max_detailed:
        notes.append(f"{len(eps)} episodes: the {p.max_detailed} largest are analysed in detail "
                     f"(max_detailed), the others are listed with their class only")
    text_ctx = TextContext(src, p, faults) if avail.samples else None
    spikes = [_spike(ep, i in detailed, src, st, dets, faults, interventions, p, avail, text_ctx)
              for i, ep in enumerate(eps)]
    if text_ctx is not None:
        notes.extend(text_ctx.notes)
    return spikes, avail.lines, notes


def _spike(ep: Episode, detailed: bool, src: RunSource, st: dict[str, np.ndarray], dets: dict[str, Detection],
           faults: list[dict], interventions: list[dict], p: ForensicsParams, avail: Availability,
           text_ctx: TextContext | None) -> Spike:
    """One episode with the detectors that flagged it, the faults and interventions around
    it, its zoom window, and (`detailed`) its precursors, layers and data."""
    sp = Spike(episode=ep, detailed=detailed)
    sp.detectors = [n for n, d in dets.items() if d.flags[ep.onset: ep.end + 1].any()] \
        if ep.signal == p.signal else [f"{ep.signal}:robust_z"]
    ep.detectors = sp.detectors
    lo_s = ep.onset_step - p.precursors.lookback - p.data.lookback
    sp.faults = [e for e in faults if e.get("step") is not None and lo_s <= e["step"] <= ep.end_step]
    sp.interventions = [e for e in interventions if e.get("step") is not None
                        and ep.onset_step - 1 <= e["step"] <= ep.end_step]
    sp.zoom = zoom(st, ep)
    if detailed:
        sp.precursors, sp.lead, sp.layers = precursors_and_layers(ep, src, st, p, avail)
        if avail.samples:
            sp.data = data_of(ep, src, p, sp.faults, text_ctx)
    return sp


__all__ = ["INTERVENTION_KINDS", "ForensicsParams", "ForensicsResult", "Spike", "analyze_run",
           "explain_episodes", "find_all_episodes", "rank_key", "read_run", "run_detectors", "weigh_restarts"]
