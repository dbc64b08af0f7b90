"""The forensics report as one self-contained HTML file: tables, and the charts of
`k2repro ui` (forensics/plots.py: uPlot and plot.js inlined, the data embedded), so the
report zooms and hovers with no server and opens offline. Split from report.py (which builds
the JSON object this renders) to keep each file and function short."""

from __future__ import annotations

import html
from typing import Any

from k2repro.forensics.analyze import ForensicsResult, Spike
from k2repro.forensics.report import MINOR_Z_FACTOR, _fmt, sampling_lines

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
h3{font-size:1em}table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em}
.transient{background:#fdf0cf}.slow{background:#fde0d3}.persistent{background:#f3d0db}.divergence{background:#dcd0e0}
.imp{background:#fff6e0;border-left:4px solid #e0a000;padding:.4em .8em}
.note{color:#555;font-size:.9em}.txt{white-space:pre-wrap;max-width:100%;overflow-wrap:break-word;font-size:.8em}
table{width:100%;table-layout:auto}td{overflow-wrap:break-word}.k2chart canvas{max-width:100%}
.verdict-data{color:#a00;font-weight:bold}.verdict-not_data{color:#060;font-weight:bold}
"""


def _e(v: Any) -> str:
    # "://" as "&#58;//": a URL inside sample text renders the same but is never a link, and
    # the file contains no literal external URL
    return html.escape(_fmt(v) if not isinstance(v, str) else v, quote=True).replace("://", "&#58;//")


def _table(headers: list[str], rows: list[list[str]], row_classes: list[str] | None = None) -> str:
    out = ["<table><thead><tr>", *[f"<th>{html.escape(h)}</th>" for h in headers], "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def to_html(res: ForensicsResult, o: dict, plots: bool = True) -> str:
    """The report page for `res` (its JSON object `o`); `plots=False` leaves the charts out."""
    from k2repro.forensics import plots as P

    parts = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
             f"<title>Forensics: {_e(res.run_id)}</title>", f"<style>{CSS}</style>",
             P.assets_html() if plots else "", "</head><body>",
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
        parts.append(P.chart_html(P.overview_spec(res), "loss and grad norm, every spike marked"))
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
    parts.append('<p class="note">Generated by k2repro forensics. Definitions: docs/forensics.md. Charts: drag '
                 'to zoom, double-click to reset, hover for values.</p>')
    parts.append((P.plot_script() if plots else "") + "</body></html>")
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
        out.append(P.chart_html(P.zoom_spec(sp), f"spike {i} zoom"))
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
            out.append(P.chart_html(P.heatmap_spec(sp), f"spike {i} layer heatmap"))
    if s.get("data"):
        out.append(_data_html(s["data"]))
    if s["faults"]:
        out.append("<h3>Injected faults nearby</h3>")
        out.append(_table(["step", "fault", "details"], [[_e(f.get("step")), _e((f.get("detail") or {}).get("kind") or f.get("kind")),
                                                           _e(_fault_text(f.get("detail") or {}))] for f in s["faults"]]))
    if s["interventions"]:
        out.append("<h3>Guard actions</h3><ul>" + "".join(
            f"<li>step {_e(iv.get('step'))}: {_e(iv.get('kind'))}</li>" for iv in s["interventions"]) + "</ul>")
    return "\n".join(out)




def _data_html(da: dict) -> str:
    """The data attribution: verdict, and the worst samples with their documents and text."""
    out: list[str] = []
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
    return "\n".join(out)


def _fault_text(detail: dict) -> str:
    """A fault's detail as words ("positions: 0, 1, 5, 6 · fraction: 0.5"), never raw JSON;
    long id lists are counted."""
    parts = []
    for k, v in detail.items():
        if k == "kind":
            continue
        if isinstance(v, list):
            v = ", ".join(str(x) for x in v[:8]) + (f" (+{len(v) - 8} more)" if len(v) > 8 else "")
        parts.append(f"{k.replace('_', ' ')}: {v}")
    return " · ".join(parts) or "-"
