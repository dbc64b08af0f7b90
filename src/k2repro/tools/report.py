"""`k2repro report RUN`: one self-contained page per run: what it was, how training went, and
the "over training" view: every `evals` metric against step and tokens, next to the training
loss, with the spikes that forensics found marked.

Reads the store only (no torch). Writes `<out>/<run_id>/report.{json,md,html}`; the HTML inlines
its figures as PNG data URIs and names no external URL, so it opens offline. Missing parts (no
evals yet, no spikes table, an imported run without lr) are said so, not errors.

Choosing among eval rows: a run may have been evaluated with different settings (k, sample
size, data); the report shows the settings that cover the most checkpoints, and one row per
(step, metric) within them.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k2repro.errors import BadInputError

METRIC_ORDER = ("val/loss", "val/ppl", "mem/exact_match", "mem/matched_prefix")


@dataclass
class ReportData:
    run: dict
    steps: Any  # DataFrame: step, loss, grad_norm, lr, tokens
    evals: Any  # DataFrame: step, metric, value, n_tokens, manifest_sha256, detail
    spikes: Any  # DataFrame of the spikes table
    checkpoints: Any  # DataFrame of the checkpoints table


def load(store: str | os.PathLike | None, run_ref: str) -> ReportData:
    """Read what the report needs (`store` None: the default store); BadInputError for a
    missing store or run."""
    from k2repro.audit.store import open_store
    from k2repro.core.layout import default_store

    root = Path(store) if store is not None else default_store()
    if not root.is_dir():
        raise BadInputError(f"no store at {root} (pass --store or set K2REPRO_STORE)")
    with open_store(root) as st:
        run_id = st.resolve_run_id(run_ref)
        run = st.run(run_id)
        steps = st.sql("SELECT step, loss, grad_norm, lr, tokens FROM steps WHERE run_id = ? ORDER BY step", [run_id])
        evals = st.sql("SELECT step, metric, value, n_tokens, manifest_sha256, detail FROM evals "
                       "WHERE run_id = ? ORDER BY step, metric", [run_id])
        spikes = st.sql("SELECT * FROM spikes WHERE run_id = ? ORDER BY onset_step", [run_id])
        ckpts = st.sql("SELECT step, path, manifest_sha256 FROM checkpoints WHERE run_id = ? ORDER BY step", [run_id])
    return ReportData(run=run, steps=steps, evals=evals, spikes=spikes, checkpoints=ckpts)


# ------------------------------------------------------------------------------- computation

def _settings_hash(detail: Any) -> str:
    try:
        return str(json.loads(detail or "{}").get("settings_hash", ""))
    except (TypeError, json.JSONDecodeError):
        return ""


def choose_evals(evals: Any) -> Any:
    """The eval rows of the settings that cover the most checkpoints, one per (step, metric)."""
    if evals.empty:
        return evals
    ev = evals.copy()
    ev["settings_hash"] = [_settings_hash(d) for d in ev["detail"]]
    cover = ev.groupby("settings_hash")["step"].nunique()
    best = sorted(cover.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    ev = ev[ev["settings_hash"] == best]
    return ev.sort_values(["step", "metric"]).drop_duplicates(["step", "metric"], keep="first").reset_index(drop=True)


def metric_names(ev: Any) -> list[str]:
    names = list(dict.fromkeys(ev["metric"])) if len(ev) else []
    head = [m for m in METRIC_ORDER[:2] if m in names]
    domains = sorted(m for m in names if m.startswith("val/ppl/"))
    mem = [m for m in METRIC_ORDER[2:] if m in names]
    return head + domains + mem + sorted(m for m in names if m not in (*head, *domains, *mem))


def tokens_at(steps: Any, step: int) -> int | None:
    """Tokens trained on by the end of `step`: the sum of the steps table's per-step tokens
    when it starts at step 1, else step x the median tokens per step."""
    if steps.empty or steps["tokens"].isna().all():
        return None
    s = steps.dropna(subset=["tokens"])
    if int(s["step"].min()) == 1:
        return int(s.loc[s["step"] <= step, "tokens"].sum())
    return int(step * float(s["tokens"].median()))


def over_training(data: ReportData) -> dict:
    """Rows per evaluated checkpoint: step, tokens, mean training loss since the previous
    checkpoint, every metric."""
    ev = choose_evals(data.evals)
    names = metric_names(ev)
    rows = []
    prev = 0
    for step in sorted({int(s) for s in ev["step"]}) if len(ev) else []:
        sub = ev[ev["step"] == step]
        vals = {str(m): _num(v) for m, v in zip(sub["metric"], sub["value"], strict=True)}
        tr = data.steps[(data.steps["step"] > prev) & (data.steps["step"] <= step)]["loss"] if len(data.steps) else []
        tr_loss = _num(float(tr.mean())) if len(tr) else None
        rows.append({"step": step, "tokens": tokens_at(data.steps, step), "train_loss": tr_loss,
                     "manifest_sha256": str(sub["manifest_sha256"].iloc[0]) if len(sub) else None, **vals})
        prev = step
    settings = {}
    if len(ev):
        try:
            d = json.loads(ev["detail"].iloc[0] or "{}")
            settings = {k: d[k] for k in ("k", "mem_samples", "val_windows", "seq_len", "settings_hash") if k in d}
        except json.JSONDecodeError:
            pass
    n_settings = int(data.evals["detail"].map(_settings_hash).nunique()) if len(data.evals) else 0
    return {"metrics": names, "rows": rows, "settings": settings, "n_settings_in_store": n_settings}


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def spike_list(spikes: Any) -> list[dict]:
    out = []
    for r in spikes.to_dict("records"):
        out.append({k: r.get(k) for k in ("onset_step", "peak_step", "end_step", "magnitude", "class",
                                          "severity", "lead_signal", "top_layer")})
    for s in out:
        for k in ("onset_step", "peak_step", "end_step"):
            s[k] = None if s[k] is None or s[k] != s[k] else int(s[k])
        s["magnitude"] = _num(s["magnitude"])
        for k in ("class", "severity", "lead_signal", "top_layer"):  # NULL text comes back as NaN
            s[k] = s[k] if isinstance(s[k], str) else None  # from pandas (a spike with no lead)
    return out


def find_forensics(run_id: str, out_dir: Path, extra: list[Path]) -> dict[str, str]:
    """Forensics reports of this run next to the report or under the given folders, as links
    relative to the report's folder."""
    here = out_dir / run_id
    for base in [out_dir, *extra]:
        links = {}
        for ext in ("html", "md", "json"):
            p = base / run_id / f"forensics.{ext}"
            if p.is_file():
                links[ext] = os.path.relpath(p, here)
        if links:
            return links
    return {}


def build(data: ReportData, out_dir: Path, forensics_dirs: list[Path]) -> dict:
    """The report as a JSON-able object (the --json output and report.json)."""
    r = data.run
    run_id = str(r["run_id"])
    st = data.steps
    training: dict[str, Any] = {"n_steps": int(len(st))}
    if len(st):
        training.update(first_step=int(st["step"].min()), last_step=int(st["step"].max()),
                        first_loss=_num(st["loss"].iloc[0]), last_loss=_num(st["loss"].iloc[-1]),
                        min_loss=_num(st["loss"].min()), tokens=tokens_at(st, int(st["step"].max())))
    keys = ("name", "status", "source", "world_size", "config_hash", "git_commit", "git_dirty",
            "parent_run_id", "resumed_from_step", "started_at", "ended_at")
    return {
        "run_id": run_id,
        "run": {k: _plain(r.get(k)) for k in keys},
        "training": training,
        "checkpoints": [int(s) for s in data.checkpoints["step"]] if len(data.checkpoints) else [],
        "over_training": over_training(data),
        "spikes": spike_list(data.spikes),
        "forensics": find_forensics(run_id, out_dir, forensics_dirs),
    }


def _plain(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if hasattr(v, "item"):
        return _plain(v.item())
    return str(v)


# ------------------------------------------------------------------------------------- figures

def _spike_bands(spikes: list[dict]) -> list[dict]:
    return [{"from": s["onset_step"], "to": s["end_step"] if s["end_step"] is not None else s["onset_step"],
             "severity": s.get("severity"), "label": f"{s.get('class') or 'spike'} · {s.get('severity') or ''}"}
            for s in spikes if s["onset_step"] is not None]


def _series(data: ReportData, col: str) -> tuple[Any, Any]:
    import numpy as np

    from k2repro.forensics.plots import envelope

    st = data.steps
    return envelope(np.asarray(st["step"], dtype=float), np.asarray(st[col], dtype=float))


def training_specs(data: ReportData, obj: dict) -> list[dict]:
    """Loss with grad norm on its own axis (spikes marked), and the learning rate: the charts
    of `k2repro ui` (forensics/plots.py), drawn offline from the embedded data."""
    import numpy as np

    from k2repro.forensics.plots import joint, post_warmup_range

    st = data.steps
    have = [k for k in ("loss", "grad_norm", "lr") if len(st) and st[k].notna().any()]
    out: list[dict] = []
    if "loss" in have:
        parts = [_series(data, "loss")] + ([_series(data, "grad_norm")] if "grad_norm" in have else [])
        xs, cols = joint([p[0] for p in parts], [p[1] for p in parts])
        # the envelopes keep different steps: each series spans the other's points (spanGaps)
        series = [{"label": "loss", "ys": cols[0], "color": "#1f4e79", "spanGaps": True}]
        if len(cols) > 1:
            series.append({"label": "grad_norm", "ys": cols[1], "color": "rgba(192,90,0,0.45)", "scale": "y2", "width": 0.8,
                           "spanGaps": True})
        out.append({"kind": "line", "xs": xs, "series": series, "yLabel": "loss", "height": 280,
                    "bands": _spike_bands(obj["spikes"]),
                    "yRange": post_warmup_range(np.asarray(st["step"], dtype=float),
                                                np.asarray(st["loss"], dtype=float))})
    if "lr" in have:
        x, y = _series(data, "lr")
        out.append({"kind": "line", "xs": [float(v) for v in x], "series": [{"label": "lr", "ys": _floats(y)}],
                    "yLabel": "lr", "height": 160})
    return out


def _floats(vals: Any) -> list:
    return [None if v is None or not math.isfinite(float(v)) else float(v) for v in vals]


def over_training_specs(data: ReportData, obj: dict) -> list[dict]:
    """Evals against checkpoint step: loss (train and val), perplexities, memorization. A
    share (exact match) keeps its whole 0..1 axis and the matched prefix starts at 0, so a
    0.05 change no longer reads as a peak."""
    ot = obj["over_training"]
    rows = ot["rows"]
    if not rows:
        return []
    steps = [float(r["step"]) for r in rows]
    bands = _spike_bands(obj["spikes"])
    out = [{"kind": "line", "xs": steps, "yLabel": "loss", "height": 220, "bands": bands,
            "series": [{"label": "train loss", "ys": _floats(r.get("train_loss") for r in rows), "color": "#9bb0c8"}]
            + ([{"label": "val/loss", "ys": _floats(r.get("val/loss") for r in rows), "color": "#1f4e79",
                 "points": True}] if "val/loss" in ot["metrics"] else [])}]
    ppl = [m for m in ot["metrics"] if m.startswith("val/ppl")]
    if ppl:
        vals = [v for r in rows for m in ppl if (v := r.get(m))]
        out.append({"kind": "line", "xs": steps, "yLabel": "perplexity", "height": 220, "bands": bands,
                    "logY": bool(vals and min(vals) > 0 and max(vals) / min(vals) > 20),
                    "series": [{"label": m, "ys": _floats(r.get(m) for r in rows), "points": True} for m in ppl]})
    mem = [m for m in ot["metrics"] if m.startswith("mem/")]
    if mem:
        series = []
        if "mem/exact_match" in mem:
            series.append({"label": "mem/exact_match", "ys": _floats(r.get("mem/exact_match") for r in rows),
                           "color": "#6a3d9a", "points": True})
        if "mem/matched_prefix" in mem:
            pre = _floats(r.get("mem/matched_prefix") for r in rows)
            series.append({"label": "mem/matched_prefix", "ys": pre, "color": "#c05a00", "points": True,
                           "scale": "y2" if series else "y"})
        top = max([v for v in series[-1]["ys"] if v is not None] or [1.0])
        out.append({"kind": "line", "xs": steps, "yLabel": "exact match" if "mem/exact_match" in mem else "tokens",
                    "height": 220, "bands": bands, "series": series,
                    "yRange": [0.0, 1.0] if "mem/exact_match" in mem else [0.0, top * 1.1],
                    "y2Range": [0.0, top * 1.1]})
    return out


# ------------------------------------------------------------------------------------ renderers

def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.5g}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10000:
        return f"{v:,}"
    return str(v)


def _table_rows(obj: dict) -> tuple[list[str], list[list[str]]]:
    ot = obj["over_training"]
    cols = ["step", "tokens", "train loss", *ot["metrics"]]
    rows = [[_fmt(r["step"]), _fmt(r["tokens"]), _fmt(r["train_loss"]), *(_fmt(r.get(m)) for m in ot["metrics"])]
            for r in ot["rows"]]
    return cols, rows


def _spike_rows(obj: dict) -> tuple[list[str], list[list[str]]]:
    cols = ["onset", "peak", "end", "magnitude", "class", "severity", "lead signal", "top layer"]
    rows = [[_fmt(s[k]) for k in ("onset_step", "peak_step", "end_step", "magnitude", "class", "severity",
                                   "lead_signal", "top_layer")] for s in obj["spikes"]]
    return cols, rows


def _summary_lines(obj: dict) -> list[str]:
    r, t = obj["run"], obj["training"]
    lines = [f"name {r['name']}, status {r['status']}, source {r['source']}, world size {r['world_size']}",
             f"config hash {r['config_hash']}, git {r['git_commit'] or '-'}" + (" (dirty)" if r["git_dirty"] else "")]
    if r.get("parent_run_id"):
        lines.append(f"continues run {r['parent_run_id']} from step {r['resumed_from_step']}")
    if t["n_steps"]:
        lines.append(f"{t['n_steps']} steps ({t['first_step']}..{t['last_step']}), {_fmt(t['tokens'])} tokens; "
                     f"loss {_fmt(t['first_loss'])} -> {_fmt(t['last_loss'])} (min {_fmt(t['min_loss'])})")
    else:
        lines.append("no steps recorded")
    lines.append(f"checkpoints at steps: {', '.join(map(str, obj['checkpoints'])) or 'none'}")
    return lines


def _eval_note(obj: dict) -> str:
    ot = obj["over_training"]
    if not ot["rows"]:
        return f"No evals yet: run `k2repro eval {obj['run_id']}`."
    s = ot["settings"]
    note = (f"Held-out perplexity on the packed `val` split ({'all' if not s.get('val_windows') else s['val_windows']} "
            f"windows); memorization: greedy continuation of a {s.get('k', '?')}-token prefix of "
            f"{s.get('mem_samples', '?')} training sequences seen before each checkpoint. Train loss: "
            "mean over the steps since the previous checkpoint.")
    if ot["n_settings_in_store"] > 1:
        note += f" The store holds evals made with {ot['n_settings_in_store']} settings; shown: {s.get('settings_hash')}."
    return note


def to_markdown(obj: dict) -> str:
    out = [f"# Run report: `{obj['run_id']}`", ""]
    out += [f"- {line}" for line in _summary_lines(obj)]
    out += ["", "## Over training", "", _eval_note(obj), ""]
    cols, rows = _table_rows(obj)
    if rows:
        out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        out.append("")
    out += ["## Spikes", ""]
    if obj["spikes"]:
        cols, rows = _spike_rows(obj)
        out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        out.append("No spikes recorded (run `k2repro forensics` to look for them).")
    f = obj["forensics"]
    if f:
        out += ["", "Forensics report: " + ", ".join(f"[{k}]({v})" for k, v in f.items())]
    out.append("")
    return "\n".join(out)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}th{background:#f3f3f3}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em}
.note{color:#555;font-size:.9em}.tw{max-width:100%;overflow-x:auto}
"""


def _html_table(cols: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f'<div class="tw"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _charts(specs: list[dict], alt: str) -> str:
    from k2repro.forensics.plots import chart_html

    return "".join(chart_html(s, alt) for s in specs)


def to_html(obj: dict, data: ReportData | None = None) -> str:
    e = html.escape
    from k2repro.forensics.plots import assets_html, plot_script

    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>Run report: {e(obj['run_id'])}</title><style>{CSS}</style>",
             assets_html() if data is not None else "", "</head><body>",
             f"<h1>Run report: <code>{e(obj['run_id'])}</code></h1>",
             "<ul>" + "".join(f"<li>{e(x)}</li>" for x in _summary_lines(obj)) + "</ul>"]
    parts.append("<h2>Training</h2>")
    parts.append(_charts(training_specs(data, obj), "training loss, gradient norm and learning rate")
                 if data is not None else "")
    parts.append('<h2 id="over-training">Over training</h2>')
    parts.append(f'<p class="note">{e(_eval_note(obj))}</p>')
    if data is not None:
        parts.append(_charts(over_training_specs(data, obj), "eval metrics against step"))
    cols, rows = _table_rows(obj)
    if rows:
        parts.append(_html_table(cols, rows))
    parts.append("<h2>Spikes</h2>")
    if obj["spikes"]:
        parts.append('<p class="note">Shaded on the figures above.</p>')
        parts.append(_html_table(*_spike_rows(obj)))
    else:
        parts.append("<p>No spikes recorded (run <code>k2repro forensics</code> to look for them).</p>")
    if obj["forensics"]:
        parts.append("<p>Forensics report: " + ", ".join(
            f'<a href="{e(v, quote=True)}">{e(k)}</a>' for k, v in obj["forensics"].items()) + "</p>")
    parts.append('<p class="note">Generated by k2repro report (docs/eval.md). Charts: drag to zoom, double-click '
                 'to reset, hover for values.</p>' + (plot_script() if data is not None else "") + "</body></html>")
    return "\n".join(p for p in parts if p)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    from k2repro.audit.redact import scrub_text

    tmp.write_text(scrub_text(text), encoding="utf-8")  # credentials by value, whatever the report shows
    os.replace(tmp, path)


def write_report(store: str | os.PathLike | None, run_ref: str, out_dir: str | os.PathLike = "reports",
                 forensics_dirs: list[str | os.PathLike] | None = None,
                 html_report: bool = True) -> tuple[dict, dict[str, Path]]:
    """Build and write `<out_dir>/<run_id>/report.{json,md,html}`; returns (object, paths)."""
    data = load(store, run_ref)
    out = Path(out_dir)
    obj = build(data, out, [Path(p) for p in (forensics_dirs or [])])
    d = out / obj["run_id"]
    paths = {"json": d / "report.json", "md": d / "report.md"}
    _atomic_write(paths["json"], json.dumps(obj, indent=2, allow_nan=False) + "\n")
    _atomic_write(paths["md"], to_markdown(obj))
    if html_report:
        paths["html"] = d / "report.html"
        _atomic_write(paths["html"], to_html(obj, data))
    return obj, paths
