"""`analyze_run`: detection, episodes, precursors, layer and data attribution of one run,
as SQL against the store's views. Runs every analysis the data allows and lists the others
in `impossible` with the reason.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from k2repro.errors import BadInputError
from k2repro.forensics.attribute import (
    DataAttribution,
    DataParams,
    LayerAttribution,
    LayerParams,
    data_attribution,
    layer_attribution,
    update_ratio,
)
from k2repro.forensics.detect import (
    Detection,
    DetectorSpec,
    RobustZ,
    params_dict,
    robust_z,
)
from k2repro.forensics.episodes import Episode, EpisodeParams, find_episodes, judge
from k2repro.forensics.parallel import Precomputed, precompute
from k2repro.forensics.precursors import (
    Crossing,
    PrecursorParams,
    first_crossing,
    lead_signal,
)
from k2repro.forensics.source import RunSource
from k2repro.forensics.textfeat import feature_flags, text_features, token_features

# Step signals that may lead a loss spike (besides per-layer grad norms and the update ratio).
PRECURSOR_STEP_SIGNALS = ("grad_norm", "logz_mean", "loss_max", "lr")
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


def _finite_any(a: np.ndarray | None) -> bool:
    return a is not None and a.size > 0 and bool(np.isfinite(a).any())


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


def analyze_run(con_or_store: Any, run_id: str, params: ForensicsParams = ForensicsParams()) -> ForensicsResult:
    """Find, classify and explain the spikes of `run_id` (a Store or a DuckDB connection with
    the store's views). Raises BadInputError when the run is not in the store.

    The stages: read the (logical) run, describe its sampling, run the detectors, find each
    signal's episodes, weigh the lineage's evidence, then attribute each episode."""
    t0 = time.perf_counter()
    p = params
    src = RunSource(con_or_store, run_id)
    if not src.exists():
        raise BadInputError(f"no run '{run_id}' in the store (no runs or steps rows for it)")
    res = ForensicsResult(run_id=run_id, params=p)
    res.run = src.run_row()
    st = _read_steps(src, res, p)
    res.timings["read_steps_s"] = time.perf_counter() - t0
    steps = st["step"]
    res.n_steps = int(steps.size)
    if steps.size:
        res.step_range = (int(steps[0]), int(steps[-1]))
    res.signals = [c for c in st if c not in ("step", "skipped") and _finite_any(st[c])]
    res.series = dict(st)
    res.sampling = sampling_summary(steps, p.episodes)

    events = src.events()
    for e in events:
        e["detail"] = _parse_detail(e.get("detail"))
    res.faults = [e for e in events if e.get("kind") == "fault_injected"]
    interventions = [e for e in events if e.get("kind") in INTERVENTION_KINDS]

    x = st.get(p.signal)
    if x is None or not _finite_any(x):
        n_bad = 0 if x is None else int(x.size)
        res.impossible.append(f"detection: the run has no finite {p.signal} values"
                              + (f" ({n_bad} logged, all non-finite: diverged from the start)" if n_bad else ""))
        res.impossible.extend(_Availability(src, st, p).lines)
        res.timings["total_s"] = time.perf_counter() - t0
        return res
    n_known = int(np.isfinite(x).sum())
    if n_known <= p.rule.min_history:
        res.impossible.append(
            f"robust_z detection: {n_known} finite {p.signal} values, the rule needs more than "
            f"min_history={p.rule.min_history}; only non-finite values are detected")

    t1 = time.perf_counter()
    # the other signals' whole-series passes start now (in a child process with workers >= 2)
    pre = precompute({s: st[s] for s in dict.fromkeys((*p.scan_signals, *p.episode_signals))
                      if s != p.signal and _finite_any(st.get(s))}, steps, p.rule, p.workers)
    try:
        t3 = time.perf_counter()
        firings = _peer_firings(st) if p.peers else {}  # while the child computes
        res.timings["peers_s"] = time.perf_counter() - t3
        dets = _run_detectors(res, st, p, pre)
        res.timings["detect_s"] = time.perf_counter() - t1 - res.timings["peers_s"]
        t2 = time.perf_counter()
        eps = _episodes(res, st, dets, interventions, p, pre)
    finally:
        pre.close()
    res.restarts = _restarts(src, res, p)
    last_step = int(steps[-1])
    for ep in eps:
        ev = _restart_evidence(src, ep, res.restarts, p)
        if ev is not None:
            judge(ep, p.episodes, last_step, restart=ev)
    res.timings["episodes_s"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    if p.peers:
        res.peers = peer_summary(st, eps, p, firings)
    res.timings["peers_s"] += time.perf_counter() - t3
    t3 = time.perf_counter()
    _attribute_all(res, src, st, eps, dets, interventions, p)
    res.timings["attribute_s"] = time.perf_counter() - t3
    res.notes.append("causal check (--replay): not run")
    res.timings["total_s"] = time.perf_counter() - t0
    return res


PEER_RULES = {
    "olmo_core": "loss or grad norm over 6 sigma of the trailing 128 steps (skip the step)",
    "llm_foundry": "loss over 2x the trailing 100-step mean for 5 steps in a row (stop the run)",
    "megatron": "loss over 10x the largest of the first 100 steps, or non-finite (stop the run)",
}


def _peer_firings(st: dict[str, np.ndarray]) -> dict[str, list]:
    """Each peer's episodes on the run's logged points (they do not depend on k2repro's)."""
    from k2repro.forensics.peers import run_peers

    steps = st["step"]
    return run_peers({k: (steps, st[k]) for k in ("loss", "grad_norm") if k in st and _finite_any(st[k])})


def peer_summary(st: dict[str, np.ndarray], eps: list[Episode], p: ForensicsParams,
                 firings: dict[str, list] | None = None) -> dict[str, dict]:
    """Where the built-in guards of OLMo-core, llm-foundry and Megatron-LM would have fired
    on the same logged points (forensics.peers has each rule as its source code has it),
    and which of k2repro's episodes each one's firings fall in (`firings`: _peer_firings(st),
    if already computed)."""
    out: dict[str, dict] = {}
    for peer, peps in (firings if firings is not None else _peer_firings(st)).items():
        fired = sorted({pe.onset_step for pe in peps})
        hit = [i for i, e in enumerate(eps) if any(_within(pe.onset_step, e) for pe in peps)]
        for i in hit:
            eps[i].notes.append(f"{peer}'s guard would have fired here")
        out[peer] = {"rule": PEER_RULES.get(peer, ""), "n_episodes": len(peps),
                     "n_fired": int(sum(pe.n_fired for pe in peps)), "fired_steps": fired[:50],
                     "episodes": [pe.to_dict() for pe in peps[:50]],
                     "k2repro_episodes_matched": len(hit),
                     "outside_k2repro_episodes": sum(1 for pe in peps
                                                     if not any(_within(pe.onset_step, e) for e in eps))}
    return out


def _within(step: int, e: Episode, slack: int = 2) -> bool:
    """A peer firing at `step` falls in episode `e` (give or take `slack` steps)."""
    return e.onset_step - slack <= step <= max(e.end_step, e.onset_step) + slack


def _read_steps(src: RunSource, res: ForensicsResult, p: ForensicsParams) -> dict[str, np.ndarray]:
    """The run's step signals; with `p.lineage`, the logical run: each ancestor's steps up to
    the step its child resumed from come first (one curve across resumes, rollbacks and
    imported restart segments)."""
    st = src.steps(p.signal)
    if src.dup_steps:
        res.notes.append(f"steps: {src.dup_steps} step numbers were logged twice; one row of each was used")
    if src.unlogged:
        res.notes.append(f"steps: {src.unlogged} rows have no {p.signal} (not logged) and were left out")
    first = int(st["step"][0]) if st["step"].size else None
    res.segments = [{"run_id": src.run_id, "first_step": first,
                     "last_step": int(st["step"][-1]) if st["step"].size else None}]
    row, seen = res.run, {src.run_id}
    parts = [st]
    while p.lineage and row.get("parent_run_id") and row.get("resumed_from_step") is not None:
        parent = str(row["parent_run_id"])
        if parent in seen or len(seen) > 10_000:
            break
        seen.add(parent)
        psrc = RunSource(src.con, parent)
        if not psrc.exists():
            res.notes.append(f"lineage: parent run {parent} is not in the store; its steps are not read")
            break
        cut = int(row["resumed_from_step"])
        pst = psrc.steps(p.signal)
        keep = pst["step"] <= cut
        if first is not None:
            keep &= pst["step"] < first
        pst = {k: v[keep] for k, v in pst.items()}
        if pst["step"].size:
            parts.insert(0, pst)
            res.segments.insert(0, {"run_id": parent, "first_step": int(pst["step"][0]),
                                    "last_step": int(pst["step"][-1])})
            first = int(pst["step"][0])
        row = psrc.run_row()
    if len(parts) == 1:
        return st
    keys = [k for k in st if all(k in q for q in parts)]
    out = {k: np.concatenate([q[k] for q in parts]) for k in keys}
    res.notes.append(
        f"logical run: {len(parts)} segments read as one curve through the lineage "
        f"({' -> '.join(str(g['run_id']) for g in res.segments[:6])}"
        f"{' -> ...' if len(res.segments) > 6 else ''}); steps {res.segments[0]['first_step']}"
        f"-{res.segments[-2]['last_step']} come from the ancestors (--no-lineage reads this run alone)")
    return out


def sampling_summary(steps: np.ndarray, ep: EpisodeParams) -> dict[str, Any]:
    """What the log's sampling can resolve: points, span, gaps, and the step ranges where a
    spike shorter than the local gap could sit between two logged points unseen."""
    steps = np.asarray(steps, dtype=np.int64)
    out: dict[str, Any] = {"points": int(steps.size)}
    if steps.size < 2:
        return out
    gaps = np.diff(steps)
    med = float(np.median(gaps))
    out.update({
        "first_step": int(steps[0]), "last_step": int(steps[-1]),
        "span_steps": int(steps[-1] - steps[0]), "median_gap": med,
        "max_gap": int(gaps.max()), "max_gap_at": int(steps[int(np.argmax(gaps))]),
        # coefficient of variation of the gaps: 0 for a log at a fixed interval
        "irregularity": round(float(np.std(gaps) / np.mean(gaps)), 4) if gaps.mean() > 0 else 0.0,
        "every_step": bool(np.all(gaps == 1)),
    })
    # stretches whose gaps exceed the transient horizon: a transient spike can hide there
    blind = gaps > max(ep.transient_horizon, 2 * med)
    ranges: list[dict[str, Any]] = []
    if blind.any():
        m = np.concatenate(([False], blind, [False])).astype(np.int8)
        d = np.diff(m)
        for a, b in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1), strict=True):
            g = gaps[a:b]
            ranges.append({"from_step": int(steps[a]), "to_step": int(steps[b]),
                           "median_gap": float(np.median(g)), "points": int(b - a + 1)})
        ranges.sort(key=lambda r: -(r["to_step"] - r["from_step"]))
    out["blind_ranges"] = ranges[:10]
    if ranges:
        r0 = ranges[0]
        out["resolution"] = (f"a spike shorter than ~{int(r0['median_gap']):,} steps may be invisible "
                             f"between steps {r0['from_step']:,} and {r0['to_step']:,}"
                             + (f" ({len(ranges) - 1} more such stretches)" if len(ranges) > 1 else ""))
    else:
        out["resolution"] = (f"every spike longer than {int(max(1, med)):,} "
                             f"step{'s' if med > 1 else ''} is seen (median gap {med:g})")
    return out


def _run_detectors(res: ForensicsResult, st: dict[str, np.ndarray], p: ForensicsParams,
                   pre: Precomputed) -> dict[str, Detection]:
    """Every detector side by side on the primary signal, robust_z over the scan signals."""
    steps = st["step"]
    x = st[p.signal]
    dets: dict[str, Detection] = {}
    for spec in p.resolved_detectors():
        dets[spec.name] = spec.run(x, steps)
    for sig in p.scan_signals:
        v = st.get(sig)
        if sig == p.signal or not _finite_any(v):
            continue
        dets[f"{sig}:robust_z"] = robust_z(v, p.rule, steps, parts=pre.get(sig))
    n = max(1, int(x.size))
    for name, d in dets.items():
        idx = np.flatnonzero(d.flags)
        sig = name.split(":")[0] if ":" in name else p.signal
        res.detectors[name] = {"signal": sig, "kind": d.kind, "n_flagged": int(idx.size),
                               "share": round(idx.size / n, 4),
                               "flagged_steps": [int(s) for s in steps[idx[:50]]],
                               "opens_episodes": name in p.episode_detectors}
        res.flags[f"{p.signal}:{name}" if ":" not in name else name] = d.flags
        if idx.size / n > p.noisy_share and name not in p.episode_detectors:
            res.notes.append(
                f"detector {name} flagged {idx.size:,} of {n:,} points ({idx.size / n:.1%}): "
                f"{_NOISY_WHY.get(d.kind, 'its rule is shown for comparison')}, so it does not "
                "open episodes")
    return dets


_NOISY_WHY = {
    "ewm_ratio": "a ratio to an exponentially weighted mean fires on every noise burst and "
                 "plateau once the noise is a few percent of the level",
    "mean_ratio": "a ratio to the trailing mean lags a falling loss",
}


def _episodes(res: ForensicsResult, st: dict[str, np.ndarray], dets: dict[str, Detection],
              interventions: list[dict], p: ForensicsParams, pre: Precomputed) -> list[Episode]:
    """The primary signal's episodes, then each other episode signal's; an episode of another
    signal that overlaps a primary one becomes a note on it, the others stand alone."""
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
        if sig == p.signal or not _finite_any(v):
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


def _restarts(src: RunSource, res: ForensicsResult, p: ForensicsParams) -> list[dict]:
    """Runs restarted from a checkpoint of this run or of an ancestor segment (resumes,
    rollbacks, stitched import branches; replays are checks, not restarts): the lineage
    evidence for severity."""
    table = "runs_raw" if src.columns("runs_raw") else "runs"
    if "parent_run_id" not in src.columns(table):
        return []
    out: list[dict] = []
    for seg in res.segments:
        rows = src.con.execute(
            f"SELECT run_id, resumed_from_step, source FROM {table} WHERE parent_run_id = ? "
            "AND resumed_from_step IS NOT NULL", [seg["run_id"]]).fetchall()
        for rid, frm, source in rows:
            if str(source or "").startswith("replay") or any(rid == g["run_id"] for g in res.segments):
                continue
            rng = src.con.execute("SELECT min(step), max(step) FROM steps WHERE run_id = ?",
                                  [rid]).fetchone()
            out.append({"run_id": rid, "from_step": int(frm), "parent_run_id": seg["run_id"],
                        "source": source, "first_step": rng[0], "last_step": rng[1]})
    return out


def _restart_evidence(src: RunSource, ep: Episode, restarts: list[dict], p: ForensicsParams) -> dict | None:
    """The restart nearest before onset that covers it, and whether it spiked there."""
    cands = [r for r in restarts if r["from_step"] < ep.onset_step
             and r["last_step"] is not None and r["last_step"] >= ep.onset_step]
    if not cands:
        return None
    r = max(cands, key=lambda r: r["from_step"])
    hi = max(ep.end_step, ep.onset_step + ep.duration_steps)
    vals = src.con.execute(
        f"SELECT step, {ep.signal}::DOUBLE FROM steps WHERE run_id = ? AND step BETWEEN ? AND ? "
        f"AND {ep.signal} IS NOT NULL ORDER BY step", [r["run_id"], ep.onset_step, hi]).fetchall() \
        if ep.signal in src.columns("steps") else []
    ev = dict(r, spiked=None, at_step=None, value=None)
    if vals:
        arr = np.array([v for _, v in vals], dtype=np.float64)
        k = int(np.nanargmax(np.where(np.isfinite(arr), arr, np.inf)))
        bar = ep.baseline + max(ep.band, 0.25 * ep.excess if np.isfinite(ep.excess) else ep.band)
        ev.update(spiked=bool(not np.isfinite(arr[k]) or arr[k] > bar), at_step=int(vals[k][0]),
                  value=float(arr[k]))
    return ev


def _attribute_all(res: ForensicsResult, src: RunSource, st: dict[str, np.ndarray],
                   eps: list[Episode], dets: dict[str, Detection], interventions: list[dict],
                   p: ForensicsParams) -> None:
    """Precursors, layers and data for the largest episodes of the primary signal."""
    avail = _Availability(src, st, p)
    res.impossible.extend(avail.lines)
    order = sorted(range(len(eps)), key=lambda i: -_mag_key(eps[i]))
    detailed = set([i for i in order if eps[i].signal == p.signal][: p.max_detailed])
    if len(eps) > p.max_detailed:
        res.notes.append(f"{len(eps)} episodes: the {p.max_detailed} largest are analysed in detail "
                         f"(max_detailed), the others are listed with their class only")
    text_ctx = _TextContext(src, p, res) if avail.samples else None
    for i, ep in enumerate(eps):
        sp = Spike(episode=ep, detailed=i in detailed)
        sp.detectors = [n for n, d in dets.items() if d.flags[ep.onset: ep.end + 1].any()] \
            if ep.signal == p.signal else [f"{ep.signal}:robust_z"]
        ep.detectors = sp.detectors
        lo_s = ep.onset_step - p.precursors.lookback - p.data.lookback
        sp.faults = [e for e in res.faults if e.get("step") is not None and lo_s <= e["step"] <= ep.end_step]
        sp.interventions = [e for e in interventions if e.get("step") is not None
                            and ep.onset_step - 1 <= e["step"] <= ep.end_step]
        sp.zoom = _zoom(st, ep, p)
        if sp.detailed:
            _detail(sp, src, st, p, avail, text_ctx)
        res.spikes.append(sp)
    if text_ctx is not None:
        res.notes.extend(text_ctx.notes)


def _mag_key(e: Episode) -> float:
    return float("inf") if not np.isfinite(e.magnitude) else float(e.magnitude)


def rank_key(e: Episode) -> tuple:
    """What matters first: malignant before benign, then excess x duration."""
    ex = e.excess if np.isfinite(e.excess) else float("inf")
    rel = ex / e.baseline if e.baseline and np.isfinite(e.baseline) and e.baseline > 0 else ex
    return (e.severity != "malignant", -(rel * max(1, e.duration_steps)), e.onset_step)


def _zoom(st: dict[str, np.ndarray], ep: Episode, p: ForensicsParams) -> dict[str, np.ndarray]:
    steps = st["step"]
    width = max(ep.end_step - ep.onset_step, 8)
    lo = int(np.searchsorted(steps, ep.onset_step - max(2 * width, 32), side="left"))
    hi = int(np.searchsorted(steps, min(ep.end_step, ep.peak_step + 4 * width) + max(width, 16), side="right"))
    return {k: v[lo:hi] for k, v in st.items() if k in ("step", "loss", "grad_norm", "lr", "logz_mean")}


class _Availability:
    """Which analyses the data allows, decided once per run."""

    def __init__(self, src: RunSource, st: dict[str, np.ndarray], p: ForensicsParams) -> None:
        self.lines: list[str] = []
        self.step_signals = [s for s in PRECURSOR_STEP_SIGNALS if s != p.signal and _finite_any(st.get(s))]
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


def _detail(sp: Spike, src: RunSource, st: dict[str, np.ndarray], p: ForensicsParams,
            avail: _Availability, text_ctx: _TextContext | None) -> None:
    ep = sp.episode
    steps = st["step"]
    crossings: list[Crossing] = []
    c = first_crossing(p.signal, steps, st[p.signal], ep.onset_step, ep.peak_step, p.rule, p.precursors)
    crossings.append(c or Crossing(p.signal, ep.onset_step, 0, float(ep.max_z)))
    for s in avail.step_signals:
        c = first_crossing(s, steps, st[s], ep.onset_step, ep.peak_step, p.rule, p.precursors)
        if c:
            crossings.append(c)
    if avail.layers:
        ls = _layer_window(src, ep, p, avail)
        sp.layers = layer_attribution(ls, ep.onset_step, ep.peak_step, p.rule, p.precursors, p.layers)
        ur = update_ratio(ls)
        if ur is not None:
            c = first_crossing("update_ratio", ur[0], ur[1], ep.onset_step, ep.peak_step, p.rule, p.precursors)
            if c:
                crossings.append(c)
        ftc = sp.layers.first_to_cross
        if ftc:
            crossings.append(Crossing(f"layer_grad_norm:{ftc['param']}", ftc["step"], ftc["lead_steps"],
                                      float(ftc["z"] or np.nan)))
    sp.precursors = sorted(crossings, key=lambda c: (-c.lead_steps, c.signal))
    sp.lead = lead_signal(crossings)
    if avail.samples:
        ss = src.samples(ep.onset_step - p.data.lookback - p.data.reference_steps, ep.onset_step)
        sp.data = data_attribution(ss, ep.onset_step, ep.baseline, ep.noise, p.data)
        injected = _injected_ids(sp.faults)
        for s in sp.data.samples:
            if s["sample_id"] in injected:
                s["injected"] = injected[s["sample_id"]]
        if text_ctx is not None:
            text_ctx.enrich(sp.data, ss)


def _injected_ids(faults: list[dict]) -> dict[int, str]:
    out: dict[int, str] = {}
    for f in faults:
        d = f.get("detail") or {}
        for sid in d.get("sample_ids") or []:
            try:
                out[int(sid)] = f"{d.get('kind', 'fault')} at step {f.get('step')}"
            except (TypeError, ValueError):
                continue
    return out


def _layer_window(src: RunSource, ep: Episode, p: ForensicsParams, avail: _Availability) -> Any:
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


class _TextContext:
    """Sample text, document ids and features from the run's packed data, if it can be found."""

    def __init__(self, src: RunSource, p: ForensicsParams, res: ForensicsResult) -> None:
        self.p = p
        self.notes: list[str] = []
        self.ds = None
        self.dir: str | None = None
        self._sample_text = None
        self._tokenizer: Any = None
        cands: list[tuple[str, str]] = []
        if p.data_dir:
            cands.append((p.data_dir, "--data-dir"))
        hp = src.hparams()
        self._hp = hp
        # samples a recorded fault replaced: (step, sample id) -> (batch position, data position, kind)
        self._replaced: dict[tuple[int, int], tuple[int, int, str]] = {}
        for f in res.faults:
            d = f.get("detail") or {}
            if d.get("kind") != "bad_batch" or d.get("data_position") is None or f.get("step") is None:
                continue
            for sid, pos in zip(d.get("sample_ids") or [], d.get("positions") or [], strict=False):
                self._replaced[(int(f["step"]), int(sid))] = (int(pos), int(d["data_position"]),
                                                              str(d.get("bad_batch_kind") or "random"))
        if hp.get("data.packed_dir"):
            cands.append((str(hp["data.packed_dir"]), "hparams data.packed_dir"))
        manifest = src.manifest()
        for m in manifest:
            if str(m.get("artifact", "")).startswith("packed/") and m.get("path"):
                cands.append((str(Path(str(m["path"])).parent), "data_manifest"))
        want = {str(m.get("artifact")): m.get("sha256") for m in manifest}
        from k2repro.data.packed import PackedDataset

        tried = []
        for path, why in cands:
            if not (Path(path) / "manifest.json").exists():
                tried.append(f"{path} ({why}): no manifest.json")
                continue
            try:
                ds = PackedDataset(path, p.split)
            except BadInputError as exc:
                tried.append(f"{path} ({why}): {exc}")
                continue
            mine = {a.get("artifact"): a.get("sha256") for a in ds.artifacts()}
            key = f"packed/{p.split}.bin"
            if want.get(key) and mine.get(key) and want[key] != mine[key]:
                tried.append(f"{path} ({why}): sha256 of {key} differs from the run's data_manifest")
                continue
            self.ds, self.dir = ds, path
            break
        if self.ds is None:
            why = "; ".join(tried) if tried else "the run records no packed data directory"
            self.notes.append(f"sample text and features: packed data not found ({why}); "
                              "pass --data-dir")
            return
        try:
            from k2repro.data.pack import sample_text

            self._sample_text = sample_text
        except ImportError:
            self.notes.append("sample text: k2repro.data.pack.sample_text is not available; "
                              "features are computed on token ids only")

    def _docs(self, sid: int) -> list[dict] | None:
        """[{doc_id, domain, snippet, ...}] of the sample, or None without a tokenizer."""
        if self._sample_text is None:
            return None
        try:
            return list(self._sample_text(self.dir, self.p.split, int(sid)))
        except Exception as exc:  # noqa: BLE001 - text is a courtesy; report once and go on
            self.notes.append(f"sample text: {type(exc).__name__}: {exc}; features are computed "
                              "on token ids only")
            self._sample_text = None
            return None

    def trained_tokens(self, sid: int, step: int | None) -> np.ndarray | None:
        """The tokens the model trained on in place of sample `sid` at `step` when a recorded
        fault replaced it (None: it trained on the packed sample). Regenerated from the fault's
        event and the run's seed as the trainer made them (train/faults.py)."""
        hit = self._replaced.get((int(step), int(sid))) if step is not None else None
        if hit is None or self.ds is None:
            return None
        seed = self._hp.get("train.seed")
        if seed is None:
            self.notes.append("sample text: the run records no train.seed; a replaced sample is shown as packed")
            self._replaced.clear()
            return None
        from k2repro.train.faults import degenerate_sample

        position, data_position, kind = hit
        seq_len = int(self._hp.get("train.seq_len") or self.ds.seq_len)
        return degenerate_sample(int(seed), data_position, position, seq_len + 1, self.ds.vocab_size, kind)

    def _decode(self, toks: np.ndarray) -> str | None:
        if self._sample_text is None:
            return None
        try:
            if self._tokenizer is None:
                from k2repro.data.pack import tokenizer_path
                from k2repro.data.tokenizer import load_tokenizer

                self._tokenizer = load_tokenizer(tokenizer_path(self.dir or ""))
            from k2repro.data.tokenizer import decode

            return decode(self._tokenizer, toks).strip("\ufffd")
        except Exception as exc:  # noqa: BLE001 - text is a courtesy; report once and go on
            self.notes.append(f"sample text: {type(exc).__name__}: {exc}; features are computed on token ids only")
            self._sample_text = None
            return None

    def features(self, sid: int, with_text: bool, step: int | None = None) -> tuple[dict, str | None, list[str]]:
        assert self.ds is not None
        if not 0 <= sid < len(self.ds):
            return {}, None, []
        replaced = self.trained_tokens(sid, step)
        if replaced is not None:  # what the model saw, not the packed sample the fault displaced
            f = token_features(replaced)
            text = self._decode(replaced) if with_text else None
            if text is not None:
                f.update(text_features(text))
            return f, text, self.ds.docs_of(sid) if with_text else []
        toks = self.ds.get([sid])[0]
        f = token_features(toks)
        docs = self._docs(sid) if with_text else None
        if docs is None:
            return f, None, self.ds.docs_of(sid) if with_text else []
        text = "\n".join(str(d.get("snippet", "")) for d in docs)
        f.update(text_features(text))
        return f, text, [str(d.get("doc_id")) for d in docs]

    def enrich(self, data: DataAttribution, ss: Any) -> None:
        if self.ds is None or data.step is None:
            return
        step_ids = [int(s) for s in ss.loc[ss["step"] == data.step, "sample_id"]]
        # the batch's typical features: the median over its samples (64 of them at most)
        pick = step_ids
        if len(pick) > 64:
            pick = [pick[i] for i in np.linspace(0, len(pick) - 1, 64).astype(int)]
        feats = [self.features(s, with_text=self._sample_text is not None, step=data.step)[0] for s in pick]
        med: dict[str, float] = {}
        for k in {k for f in feats for k in f}:
            vals = [f[k] for f in feats if k in f and f[k] is not None and np.isfinite(f[k])]
            if vals:
                med[k] = round(float(np.median(vals)), 4)
        data.batch_feature_median = med
        for s in data.samples:
            f, text, docs = self.features(s["sample_id"], with_text=True, step=data.step)
            if self.trained_tokens(s["sample_id"], data.step) is not None:
                s["replaced"] = True  # text and features are of the fault's tokens
            s["features"] = f
            s["flags"] = feature_flags(f, med)
            s["doc_ids"] = docs
            if text is not None:
                s["text"] = text[: self.p.text_chars]
