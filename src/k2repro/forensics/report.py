"""The forensics report in three forms and the `spikes` table rows.

- forensics.json: `{"run_id", "spikes": [the spikes table's columns + extras], "impossible",
  ...}` (the `k2repro forensics --json` object);
- forensics.md: the same, for a terminal or a pull request;
- forensics.html: self-contained (inline CSS and PNG, no script, no external URL), so it
  opens offline and can be attached to a bug report as one file.
"""

from __future__ import annotations

import base64
import html
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

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
h3{font-size:1em}table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em}
.transient{background:#fdf0cf}.slow{background:#fde0d3}.persistent{background:#f3d0db}.divergence{background:#dcd0e0}
.imp{background:#fff6e0;border-left:4px solid #e0a000;padding:.4em .8em}
.note{color:#555;font-size:.9em}.txt{white-space:pre-wrap;max-width:480px;font-size:.8em}
img{max-width:100%;height:auto;display:block;margin:.4em 0}
.verdict-data{color:#a00;font-weight:bold}.verdict-not_data{color:#060;font-weight:bold}
"""


def _e(v: Any) -> str:
    # "://" as "&#58;//": a URL inside sample text renders the same but is never a link, and
    # the file contains no literal external URL
    return html.escape(_fmt(v) if not isinstance(v, str) else v, quote=True).replace("://", "&#58;//")


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return f'<p class="note">({html.escape(alt)}: no data to plot)</p>'
    b64 = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt, quote=True)}" src="data:image/png;base64,{b64}">'


def _table(headers: list[str], rows: list[list[str]], row_classes: list[str] | None = None) -> str:
    out = ["<table><thead><tr>", *[f"<th>{html.escape(h)}</th>" for h in headers], "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def to_html(res: ForensicsResult, obj: dict | None = None, plots: bool = True) -> str:
    from k2repro.forensics import plots as P

    o = obj or to_json(res)
    parts = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
             f"<title>Forensics: {_e(res.run_id)}</title>", f"<style>{CSS}</style></head><body>",
             f"<h1>Loss-spike forensics: run <code>{_e(res.run_id)}</code></h1>"]
    rng = o.get("step_range")
    parts.append(f"<p>{o['n_steps']:,} logged points" + (f" over steps {rng[0]}..{rng[1]}" if rng else "")
                 + f"; signals: {_e(', '.join(o['signals']) or 'none')}; "
                 f"<b>{o['n_spikes']}</b> spike(s) (episodes opened on "
                 f"<code>{_e(', '.join(res.params.episode_signals))}</code>).</p>")
    spikes = o["spikes"]
    major = [i for i in o.get("ranked", range(1, len(spikes) + 1)) if not spikes[i - 1].get("minor")]
    minor = [i for i in range(1, len(spikes) + 1) if spikes[i - 1].get("minor")]
    head = ["#", "signal", "onset", "peak", "duration", "class", "severity", "z", "magnitude", "excess",
            "attributed", "reason"]

    def row(i: int) -> list[str]:
        s = spikes[i - 1]
        att = [k for k, v in (s.get("attributed") or {}).items() if v]
        return [f'<a href="#spike-{i}">{i}</a>', _e(s["signal"]), _e(s["onset_step"]), _e(s["peak_step"]),
                _e(s.get("duration_steps")), _e(s["class"]), _e(s["severity"]), _e(_fmt(s["max_z"], 3)),
                _e(_fmt(s["magnitude"], 3)), _e(_fmt(s["excess"], 3)), _e(", ".join(att) or "-"),
                _e(s.get("reason") or "-")]

    parts.append("<h2>What matters first</h2>")
    if spikes:
        parts.append('<p class="note">Malignant spikes first, then by excess x duration.</p>')
        parts.append(_table(head, [row(i) for i in major], [spikes[i - 1]["class"] for i in major]))
        if minor:
            parts.append(f'<p>And <a href="#minor">{len(minor)} minor blip(s)</a>.</p>')
    else:
        parts.append("<p>No spike found.</p>")
    samp = sampling_lines(o)
    if samp:
        parts.append("<h2>Sampling</h2><ul>" + "".join(f"<li>{_e(x[2:])}</li>" for x in samp) + "</ul>")
    if o["impossible"]:
        parts.append('<div class="imp"><b>Not possible with this run\'s data:</b><ul>'
                     + "".join(f"<li>{_e(x)}</li>" for x in o["impossible"]) + "</ul></div>")
    if plots:
        parts.append("<h2>Overview</h2>")
        parts.append(_img(P.overview_png(res), "loss, grad norm and lr with spikes shaded"))
    parts.append("<h2>Detectors side by side</h2>")
    parts.append(_table(["detector", "signal", "flagged points", "share", "opens episodes", "first flagged steps"],
                        [[_e(n), _e(d["signal"]), _e(d["n_flagged"]), _e(_fmt(d.get("share"), 3)),
                          "yes" if d.get("opens_episodes") else "no", _e(d["flagged_steps"][:12])]
                         for n, d in o["detectors"].items()]))
    peers = o.get("peers") or {}
    if peers:
        parts.append("<h2>Peers' rules on this run</h2>")
        parts.append(_table(["rule", "fired (points)", "episodes", "first steps"],
                            [[_e(f"{n}: {d.get('rule', '')}"), _e(d.get("n_fired", 0)), _e(d.get("n_episodes", 0)),
                              _e((d.get("fired_steps") or [])[:8])] for n, d in peers.items()]))
    for i in major:
        parts.append(_spike_html(i, res.spikes[i - 1], spikes[i - 1], plots))
    if minor:
        parts.append(f'<h2 id="minor">Minor blips ({len(minor)})</h2>')
        parts.append(f'<p class="note">Benign transients under z = {MINOR_Z_FACTOR * res.params.rule.threshold:g} '
                     "with nothing behind them (no fault, intervention or data verdict).</p>")
        parts.append(_table(head, [row(i) for i in minor], [spikes[i - 1]["class"] for i in minor]))
    if o["notes"]:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(x)}</li>" for x in o["notes"]) + "</ul>")
    parts.append('<p class="note">Generated by k2repro forensics. Definitions: docs/forensics.md.</p>')
    parts.append("</body></html>")
    return "\n".join(parts)


def _spike_html(i: int, sp: Spike, s: dict, plots: bool) -> str:
    from k2repro.forensics import plots as P

    out = [f'<h2 id="spike-{i}">Spike {i}: {_e(s["signal"])}, steps {s["onset_step"]}-{s["end_step"]} '
           f'<span class="{_e(s["class"])}">{_e(s["class"])}</span>, {_e(s["severity"])}</h2>',
           f"<p><b>{_e(s.get('reason') or '-')}</b></p>"]
    out += [f'<p class="note">{_e(n)}</p>' for n in s.get("notes") or []]
    rec = (f"back within the noise band after {s.get('duration_steps')} steps" if s["recovered"]
           else "not recovered" + (" before the log ends" if s["censored"] else ""))
    out.append(f"<p>Peak {_e(s['peak_value'])} at step {s['peak_step']}; baseline {_e(s['baseline'])} "
               f"(noise band +-{_e(_fmt(s.get('band'), 3))}); magnitude {_e(s['magnitude'])} (peak / baseline); "
               f"excess {_e(s['excess'])}; {_e(rec)}; max robust z {_e(s['max_z'])}; "
               f"detectors that fired: {_e(s['detectors'])}.</p>")
    if not s["detailed"]:
        out.append('<p class="note">Not analysed in detail (see max_detailed).</p>')
    if plots:
        out.append(_img(P.zoom_png(sp), f"spike {i} zoom"))
    if s["precursors"]:
        out.append("<h3>Precursors</h3>")
        out.append(_table(["signal", "crossed at step", "lead (steps)", "z"],
                          [[_e(c["signal"]), _e(c["step"]), _e(c["lead_steps"]), _e(c["z"])]
                           for c in s["precursors"]]))
    la = s.get("layers")
    if la:
        out.append("<h3>Layers</h3>")
        if la["note"]:
            out.append(f'<p class="note">{_e(la["note"])}</p>')
        if la["first_to_cross"]:
            f = la["first_to_cross"]
            out.append(f"<p>First to cross: <code>{_e(f['param'])}</code> at step {f['step']} "
                       f"(lead {f['lead_steps']}).</p>")
        if la["top"]:
            keys = [k for k in la["top"][0] if k.endswith("_ratio")]
            out.append(_table(["param", "jump", *keys],
                              [[f"<code>{_e(t['param'])}</code>", _e(t["jump"]), *[_e(t.get(k)) for k in keys]]
                               for t in la["top"]]))
        if plots:
            out.append(_img(P.heatmap_png(sp), f"spike {i} layer heatmap"))
    da = s.get("data")
    if da:
        out.append("<h3>Data</h3>")
        out.append(f'<p><span class="verdict-{_e(da["verdict"])}">{_e(da["verdict"])}</span>: {_e(da["reason"])}</p>')
        if da["samples"]:
            smps = da["samples"]
            # optional columns only when some sample has them (no packed data: no text)
            opt = [c for c in ("injected", "doc_ids", "features", "text") if any(x.get(c) for x in smps)]
            rows = []
            for smp in smps:
                row = [_e(smp["sample_id"]), _e(smp.get("rank")), _e(smp["loss"]), _e(smp["excess_vs_step"]),
                       _e(smp["excess_vs_run"]), _e(smp["z"]), "yes" if smp["outlier"] else ""]
                for c in opt:
                    v = smp.get(c)
                    if c == "features":
                        ftxt = "<br>".join(f"{_e(k)}={_e(x)}" for k, x in (v or {}).items())
                        flags = ", ".join(smp.get("flags") or [])
                        row.append(f'<span class="mono">{ftxt}</span>' + (f"<br><b>{_e(flags)}</b>" if flags else ""))
                    elif c == "text":
                        orig = ('<p class="note">what the model trained on: the tokens the fault put in '
                                'place of this sample, decoded</p>' if v and smp.get("replaced") else
                                '<p class="note">the original sample; the fault replaced it in training</p>'
                                if v and smp.get("injected") else "")
                        row.append(f'{orig}<div class="txt">{_e(v)}</div>' if v else "")
                    else:
                        row.append(_e(v or ""))
                rows.append(row)
            names = {"injected": "injected", "doc_ids": "docs", "features": "features", "text": "text"}
            out.append(_table(["sample", "rank", "loss", "excess vs step median", "excess vs run", "z",
                               "outlier", *[names[c] for c in opt]], rows))
            if da["batch_feature_median"]:
                out.append('<p class="note">Batch median features: '
                           + _e(", ".join(f"{k}={v}" for k, v in da["batch_feature_median"].items())) + "</p>")
    if s["faults"]:
        out.append("<h3>Injected faults nearby</h3><ul>" + "".join(
            f"<li>step {_e(f.get('step'))}: {_e(json.dumps(f.get('detail')))}</li>" for f in s["faults"]) + "</ul>")
    if s["interventions"]:
        out.append("<h3>Guard actions</h3><ul>" + "".join(
            f"<li>step {_e(iv.get('step'))}: {_e(iv.get('kind'))}</li>" for iv in s["interventions"]) + "</ul>")
    return "\n".join(out)


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
