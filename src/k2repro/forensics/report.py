"""The forensics report in three forms and the `spikes` table rows.

- forensics.json: `{"run_id", "spikes": [the spikes table's columns + extras], "impossible",
  ...}` (the `k2repro forensics --json` object);
- forensics.md: the same, for a terminal or a pull request;
- forensics.html: self-contained (inline CSS and PNG, no script, no external URL), so it
  opens offline and can be attached to a bug report as one file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from k2repro.forensics.analyze import ForensicsResult, Spike

SPIKE_COLUMNS = ("onset_step", "peak_step", "end_step", "magnitude", "class", "severity",
                 "lead_signal", "top_layer", "top_samples", "signal", "baseline", "peak_value",
                 "excess", "max_z", "reason")

#: a benign transient whose max z stays under this many times the threshold, with no fault,
#: intervention or data verdict behind it, is "minor": listed in one table, not a section
MINOR_Z_FACTOR = 2.0


def clean(v: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/inf to None, tuples to lists."""
    if isinstance(v, dict):
        return {str(k): clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    if isinstance(v, np.ndarray):
        return [clean(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)  # timestamps and the like


def spike_json(sp: Spike) -> dict[str, Any]:
    e = sp.episode
    d: dict[str, Any] = dict(sp.row())
    d.update({
        "baseline": e.baseline, "peak_value": e.peak_value, "noise": e.noise,
        "recovered": e.recovered, "recovery_steps": e.recovery_steps, "censored": e.censored,
        "nonfinite": e.nonfinite, "max_z": e.max_z, "detectors": sp.detectors,
        "flagged_steps": e.flagged_steps[:50], "detailed": sp.detailed,
        "precursors": [{"signal": c.signal, "step": c.step, "lead_steps": c.lead_steps, "z": c.z}
                       for c in sp.precursors],
        "lead_steps": sp.lead.lead_steps if sp.lead else None,
        "faults": sp.faults, "interventions": sp.interventions,
        "duration_steps": e.duration_steps, "resolution_steps": e.resolution_steps,
        "band": e.band, "notes": e.notes,
        "attributed": _attributed(sp),
    })
    if not math.isfinite(e.magnitude):
        d["magnitude_note"] = "non-finite peak"
    if sp.layers is not None:
        la = sp.layers
        d["layers"] = {"top": la.top, "first_to_cross": la.first_to_cross,
                       "logged_every": la.interval, "note": la.note}
    if sp.data is not None:
        da = sp.data
        d["data"] = {"step": da.step, "verdict": da.verdict, "reason": da.reason,
                     "excess_loss": da.excess, "top_share": da.top_share,
                     "n_outliers": da.n_outliers, "n_samples": da.n_samples,
                     "typical_loss": da.typical_loss, "step_median": da.step_median,
                     "outlier_reference": da.outlier_reference,
                     "samples": da.samples, "batch_feature_median": da.batch_feature_median}
    if getattr(sp, "causal", None) is not None:
        d["causal"] = sp.causal
    return clean(d)


def _attributed(sp: Spike) -> dict[str, bool]:
    """Which explanations the data allowed for this spike."""
    return {"data": bool(sp.data is not None and sp.data.verdict == "data"),
            "layers": bool(sp.layers is not None and sp.layers.top),
            "samples": bool(sp.data is not None and sp.data.samples)}


def is_minor(sp: Spike, threshold: float) -> bool:
    """A near-threshold blip: benign, transient, nothing behind it (see MINOR_Z_FACTOR)."""
    e = sp.episode
    z = e.max_z if math.isfinite(e.max_z) else math.inf
    return (e.severity == "benign" and e.cls == "transient" and z < MINOR_Z_FACTOR * threshold
            and not sp.faults and not sp.interventions
            and not (sp.data is not None and sp.data.verdict == "data"))


def ranked(res: ForensicsResult) -> list[int]:
    """Spike numbers (1-based, as in `spikes`) in the order that matters: malignant first,
    then by relative excess x duration."""
    from k2repro.forensics.analyze import rank_key

    return [i + 1 for i in sorted(range(len(res.spikes)), key=lambda i: rank_key(res.spikes[i].episode))]


def to_json(res: ForensicsResult) -> dict[str, Any]:
    """The report object (also what `k2repro forensics --json` prints)."""
    thr = res.params.rule.threshold
    spikes = [spike_json(s) for s in res.spikes]
    for s, sp in zip(spikes, res.spikes, strict=True):
        s["minor"] = is_minor(sp, thr)
    return clean({
        "run_id": res.run_id,
        "run": res.run,
        "n_steps": res.n_steps,
        "n_points": res.n_steps,
        "step_range": list(res.step_range) if res.step_range else None,
        "sampling": res.sampling,
        "segments": res.segments,
        "restarts": res.restarts,
        "signals": res.signals,
        "n_spikes": len(res.spikes),
        "ranked": ranked(res),
        "spikes": spikes,
        "detectors": res.detectors,
        "impossible": res.impossible,
        "notes": res.notes,
        "faults": res.faults,
        "peers": res.peers,
        "params": res.params.to_dict(),
    })


def spike_rows(res: ForensicsResult) -> dict[str, list]:
    """This run's `spikes` rows as columns (the store's schema: docs/audit-store.md, `spikes`,
    with `spike_id`, `detail` and `detected_at`). `top_samples` is a JSON list; `detail` holds
    the rest of the spike's JSON object."""
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    cols: dict[str, list] = {c: [] for c in ("spike_id", *SPIKE_COLUMNS, "detail", "detected_at")}
    for i, sp in enumerate(res.spikes, 1):
        row = sp.row()
        full = spike_json(sp)
        cols["spike_id"].append(i)
        for c in SPIKE_COLUMNS:
            v = row[c]
            if c == "top_samples":
                v = json.dumps(v)
            elif isinstance(v, float) and not math.isfinite(v) and c != "magnitude":
                v = None
            cols[c].append(v)
        cols["detail"].append(json.dumps({k: v for k, v in full.items() if k not in SPIKE_COLUMNS},
                                         allow_nan=False))
        cols["detected_at"].append(now)
    return cols


def spikes_table(res: ForensicsResult) -> Any:
    """The `spikes` rows as a pyarrow Table with the store's explicit schema."""
    from k2repro.audit.writer import to_arrow

    return to_arrow("spikes", spike_rows(res), res.run_id)


def write_spike_rows(res: ForensicsResult, out_store: str | os.PathLike) -> Path:
    """Replace this run's spikes rows under the store root `out_store` (docs/architecture.md,
    "Data flow", keeps the pipeline's forensics stage in its own folder): one segment
    `<out_store>/<run_id>/spikes/forensics.parquet`, written as a temp file and renamed, so
    a rerun replaces the rows instead of adding a second copy."""
    from k2repro.audit.storemeta import ensure_store
    from k2repro.audit.writer import write_segment

    root = Path(out_store)
    ensure_store(root)
    return write_segment(root / res.run_id / "spikes", "forensics.parquet", spikes_table(res))


# --------------------------------------------------------------------------- markdown

def _fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
        return f"{v:.{nd}g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v) if v else "-"
    return str(v)


def _signed(v: Any) -> str:
    """An excess with its own sign ("+0.73", "-0.12"): a "+" glued to a negative number reads "+-"."""
    return "+" + _fmt(v) if isinstance(v, int | float) and v >= 0 else _fmt(v)


def _summary_line(i: int, s: dict) -> str:
    att = [k for k, v in (s.get("attributed") or {}).items() if v]
    return (f"| {i} | {s['signal']} | {s['onset_step']} | {s['peak_step']} | {s.get('duration_steps', '-')} "
            f"| {s['class']} | {s['severity']} | {_fmt(s['max_z'], 3)} | {_fmt(s['magnitude'], 3)} "
            f"| {_fmt(s['excess'], 3)} | {', '.join(att) or '-'} | {s.get('reason') or '-'} |")


SUMMARY_HEAD = ["| # | signal | onset | peak | duration | class | severity | z | magnitude | excess "
                "| attributed | reason |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]


def sampling_lines(o: dict) -> list[str]:
    sm = o.get("sampling") or {}
    if not sm.get("points"):
        return []
    out = [f"- {sm['points']:,} logged points over steps {sm.get('first_step', '-')}..{sm.get('last_step', '-')}"]
    if "median_gap" in sm:
        out.append(f"- gap between logged points: median {sm['median_gap']:g} steps, max {sm['max_gap']:,} "
                   f"(after step {sm['max_gap_at']:,}); irregularity {sm['irregularity']:g} "
                   "(coefficient of variation of the gaps; 0 = a fixed interval)")
        out.append(f"- what it can resolve: {sm['resolution']}")
    segs = o.get("segments") or []
    if len(segs) > 1:
        out.append(f"- {len(segs)} segments of one logical run (lineage): " + ", ".join(
            f"{g['run_id']} ({g['first_step']}-{g['last_step']})" for g in segs[:8])
            + (" ..." if len(segs) > 8 else ""))
    for r in (o.get("restarts") or [])[:8]:
        out.append(f"- restarted branch {r['run_id']}: from step {r['from_step']} of {r['parent_run_id']}, "
                   f"steps {r['first_step']}-{r['last_step']}")
    return out


def to_markdown(res: ForensicsResult, obj: dict | None = None) -> str:
    o = obj or to_json(res)
    lines = [f"# Loss-spike forensics: run `{res.run_id}`", ""]
    rng = o.get("step_range")
    lines.append(f"{o['n_steps']:,} logged points" + (f" over steps {rng[0]}..{rng[1]}" if rng else "")
                 + f"; signals: {', '.join(o['signals']) or 'none'}; "
                 f"{o['n_spikes']} spike(s) (episodes opened on "
                 f"{', '.join(res.params.episode_signals)}).")
    lines.append("")
    spikes = o["spikes"]
    major = [i for i in o.get("ranked", range(1, len(spikes) + 1)) if not spikes[i - 1].get("minor")]
    minor = [i for i in range(1, len(spikes) + 1) if spikes[i - 1].get("minor")]
    if spikes:
        lines += ["## What matters first", "",
                  "Malignant spikes first, then by excess x duration. Definitions: docs/forensics.md.", ""]
        lines += SUMMARY_HEAD + [_summary_line(i, spikes[i - 1]) for i in major]
        if minor:
            lines.append(f"| | | | | | | | | | | | and {len(minor)} minor blip(s), listed below |")
    else:
        lines.append("No spike found.")
    lines.append("")
    samp = sampling_lines(o)
    if samp:
        lines += ["## Sampling", ""] + samp + [""]
    if o["impossible"]:
        lines += ["## Not possible with this run's data", ""] + [f"- {x}" for x in o["impossible"]] + [""]
    lines += ["## Detectors (side by side)", "", "| detector | signal | flagged points | share | opens episodes | first flagged steps |",
              "|---|---|---|---|---|---|"]
    for name, d in o["detectors"].items():
        lines.append(f"| {name} | {d['signal']} | {d['n_flagged']} | {_fmt(d.get('share'), 3)} "
                     f"| {'yes' if d.get('opens_episodes') else 'no'} | {_fmt(d['flagged_steps'][:10])} |")
    lines.append("")
    peers = o.get("peers") or {}
    if peers:
        lines += peer_lines(peers) + [""]
    for i in major:
        lines += _spike_md(i, spikes[i - 1])
    if minor:
        lines += [f"## Minor blips ({len(minor)})", "",
                  f"Benign transients under z = {MINOR_Z_FACTOR * res.params.rule.threshold:g} with nothing "
                  "behind them (no fault, intervention or data verdict): one line each.", ""]
        lines += SUMMARY_HEAD + [_summary_line(i, spikes[i - 1]) for i in minor] + [""]
    if o["notes"]:
        lines += ["## Notes", ""] + [f"- {x}" for x in o["notes"]] + [""]
    return "\n".join(lines)


def peer_lines(peers: dict) -> list[str]:
    """Where the built-in guards of other trainers would have fired on the same run."""
    out = ["## Peers' rules on this run", "",
           "What the built-in guard of each trainer would have done on the same logged points.", "",
           "| rule | fired (points) | episodes | in k2repro's episodes | outside them | first steps |",
           "|---|---|---|---|---|---|"]
    for name, d in peers.items():
        out.append(f"| {name}: {d.get('rule', '')} | {d.get('n_fired', 0)} | {d.get('n_episodes', 0)} "
                   f"| {d.get('k2repro_episodes_matched', 0)} | {d.get('outside_k2repro_episodes', 0)} "
                   f"| {_fmt((d.get('fired_steps') or [])[:8])} |")
    return out


def _spike_md(i: int, s: dict) -> list[str]:
    lines = [f"## Spike {i}: {s['signal']}, steps {s['onset_step']}-{s['end_step']} ({s['class']}, {s['severity']})", ""]
    lines.append(f"- {s.get('reason') or '-'}")
    rec = (f"back within the band after {s.get('duration_steps')} steps"
           + (f" (recovery seen at the next logged point, {s['recovery_steps']} steps after onset)"
              if s.get("resolution_steps") and s["resolution_steps"] > 1 else "")
           if s["recovered"] else "not recovered" + (" before the log ends" if s["censored"] else ""))
    lines.append(f"- peak {_fmt(s['peak_value'])} at step {s['peak_step']}, baseline {_fmt(s['baseline'])} "
                 f"(noise band +-{_fmt(s.get('band'), 3)}), magnitude {_fmt(s['magnitude'])} (peak / baseline), "
                 f"excess {_fmt(s['excess'])}, {rec}; max robust z {_fmt(s['max_z'], 3)}; "
                 f"detectors: {_fmt(s['detectors'])}")
    for n in s.get("notes") or []:
        lines.append(f"- {n}")
    if s.get("peers_fired"):
        lines.append("- peers' rules that fired here: " + ", ".join(s["peers_fired"]))
    if s["precursors"]:
        pre = "; ".join(f"{c['signal']} at step {c['step']} (lead {c['lead_steps']})" for c in s["precursors"])
        lines.append(f"- precursors: {pre}")
    la = s.get("layers")
    if la:
        if la["top"]:
            lines.append("- layers that jumped most: " + "; ".join(
                f"{t['param']} x{_fmt(t['jump'], 3)}" for t in la["top"]))
        if la["first_to_cross"]:
            f = la["first_to_cross"]
            lines.append(f"- first layer to cross: {f['param']} at step {f['step']} (lead {f['lead_steps']})")
        if la["note"]:
            lines.append(f"- layers: {la['note']}")
    da = s.get("data")
    if da:
        lines.append(f"- data: **{da['verdict']}**: {da['reason']}")
        for smp in da["samples"][:5]:
            extra = f"; injected: {smp['injected']}" if smp.get("injected") else ""
            flags = f"; {', '.join(smp['flags'])}" if smp.get("flags") else ""
            lines.append(f"  - sample {smp['sample_id']}: loss {_fmt(smp['loss'])}, "
                         f"{_signed(smp['excess_vs_step'])} vs step median{flags}{extra}")
    for f in s["faults"]:
        lines.append(f"- injected fault at step {f.get('step')}: {_fmt((f.get('detail') or {}).get('kind'))}")
    for iv in s["interventions"]:
        lines.append(f"- guard action at step {iv.get('step')}: {iv.get('kind')}")
    lines.append("")
    return lines


# --------------------------------------------------------------------------- html

def to_html(res: ForensicsResult, obj: dict | None = None, plots: bool = True) -> str:
    """The self-contained HTML report (forensics/report_html.py): interactive charts inlined."""
    from k2repro.forensics.report_html import to_html as render

    return render(res, obj or to_json(res), plots)


# --------------------------------------------------------------------------- files

def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_reports(res: ForensicsResult, out_dir: str | os.PathLike, html_report: bool = True) -> dict[str, Path]:
    """Write `<out_dir>/<run_id>/forensics.{json,md,html}`; returns their paths."""
    d = Path(out_dir) / res.run_id
    obj = to_json(res)
    paths = {"json": d / "forensics.json", "md": d / "forensics.md"}
    _atomic_write(paths["json"], json.dumps(obj, indent=2, allow_nan=False) + "\n")
    _atomic_write(paths["md"], to_markdown(res, obj))
    if html_report:
        paths["html"] = d / "forensics.html"
        _atomic_write(paths["html"], to_html(res, obj))
    return paths
