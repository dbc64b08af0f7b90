"""`k2repro forensics RUN`: find, classify and explain the loss spikes of a run.

Thin: parse, call `k2repro.forensics`, render. Exit 0 whatever it finds; 2 for a missing
run or store, or a bad option.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from k2repro.errors import BadInputError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run id, a unique prefix of one, or a unique run name")
    parser.add_argument("--store", default=None,
                        help="audit store to read (default: $K2REPRO_STORE or runs)")
    parser.add_argument("--out", default="reports",
                        help="report folder: writes OUT/RUN/forensics.{html,md,json} (default: reports)")
    parser.add_argument("--out-store", default=None,
                        help="store root that receives this run's `spikes` rows (default: --store)")
    parser.add_argument("--no-spike-rows", action="store_true", help="do not write `spikes` rows")
    parser.add_argument("--no-html", action="store_true", help="skip the HTML report (and its plots)")
    parser.add_argument("--json", action="store_true",
                        help="print the report object (with `spikes`) as JSON to stdout")
    parser.add_argument("--signal", default="loss", help="steps column the spikes are found on (default: loss)")
    parser.add_argument("--episode-signal", action="append", default=None, metavar="SIGNAL",
                        help="steps columns whose episodes are found besides --signal (default: grad_norm); "
                        "repeat for several, 'none' for --signal alone")
    parser.add_argument("--no-lineage", action="store_true",
                        help="read this run's own steps only, not its ancestors' up to each resume "
                        "point (the logical run)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="robust z threshold of the episode rule (default 6)")
    parser.add_argument("--scan", action="append", default=[], metavar="SIGNAL",
                        help="also run robust_z over this whole steps column (e.g. grad_norm, logz_mean); "
                        "shown in the detector table")
    parser.add_argument("--detector", action="append", default=[], metavar="KIND:KEY=VAL,...",
                        help="change a side-by-side detector, e.g. robust_z:long_window=256 or "
                        "ewm_ratio:ratio=1.1 (kinds: robust_z, ewm_ratio, mean_ratio, nonfinite)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VAL",
                        help="change a parameter of episodes / precursors / layers / data, e.g. "
                        "episodes.transient_horizon=100 (see docs/forensics.md)")
    parser.add_argument("--data-dir", default=None,
                        help="packed data directory for sample text (default: from the run's hparams)")
    parser.add_argument("--replay", action="store_true",
                        help="causal check: replay the onset window (needs the replay tool)")


def build_params(args: argparse.Namespace) -> Any:
    """ForensicsParams from the command line; BadInputError names the bad option."""
    from k2repro.forensics.analyze import ForensicsParams
    from k2repro.forensics.detect import DetectorSpec, coerce_params, parse_spec

    p = ForensicsParams(signal=args.signal, data_dir=args.data_dir)
    rule = p.rule
    dets = {d.kind: d for d in p.detectors}
    for text in args.detector:
        try:
            spec = parse_spec(text)
        except ValueError as exc:
            raise BadInputError(f"--detector {text}: {exc}") from None
        if spec.kind == "robust_z":
            rule = spec.params
        else:
            dets[spec.kind] = DetectorSpec(spec.kind, spec.params, spec.kind)
    if args.threshold is not None:
        if not args.threshold > 0:
            raise BadInputError(f"--threshold must be > 0, got {args.threshold}")
        rule = replace(rule, threshold=args.threshold)
    sections: dict[str, dict[str, str]] = {}
    for item in args.set:
        key, eq, val = item.partition("=")
        sec, dot, name = key.strip().partition(".")
        if not eq or not dot or sec not in ("episodes", "precursors", "layers", "data"):
            raise BadInputError(f"--set {item}: expected SECTION.KEY=VALUE with SECTION one of "
                                "episodes, precursors, layers, data")
        sections.setdefault(sec, {})[name] = val
    from k2repro.forensics.source import STEP_SIGNALS

    for sig in args.scan:
        if sig not in STEP_SIGNALS:
            raise BadInputError(f"--scan {sig}: not a steps signal (one of {', '.join(STEP_SIGNALS)})")
    scan = tuple(dict.fromkeys((*p.scan_signals, *args.scan)))
    kw: dict[str, Any] = {"rule": rule, "detectors": tuple(dets.values()), "scan_signals": scan,
                          "lineage": not args.no_lineage}
    if args.episode_signal is not None:
        extra = [x for x in args.episode_signal if x != "none"]
        for sig in extra:
            if sig not in STEP_SIGNALS:
                raise BadInputError(f"--episode-signal {sig}: not a steps signal (one of {', '.join(STEP_SIGNALS)})")
        kw["episode_signals"] = tuple(dict.fromkeys((args.signal, *extra)))
    for sec, vals in sections.items():
        try:
            kw[sec] = coerce_params(getattr(p, sec), vals)
        except ValueError as exc:
            raise BadInputError(f"--set {sec}.*: {exc}") from None
    return replace(p, **kw)


def run(args: argparse.Namespace) -> int:
    from k2repro.forensics.analyze import analyze_run
    from k2repro.forensics.report import to_json, write_reports, write_spike_rows
    from k2repro.forensics.source import open_source

    params = build_params(args)
    from k2repro.core.layout import default_store

    store = Path(args.store) if args.store else default_store()
    if not store.is_dir():
        raise BadInputError(f"no store at {store} (pass --store or set K2REPRO_STORE)")
    src = open_source(store)
    # an exact run id, a unique prefix of one, or a unique run name (the pipeline passes its name)
    run_id = src.resolve_run_id(args.run) if hasattr(src, "resolve_run_id") else args.run
    from k2repro.progress import Progress

    prog = Progress(f"forensics {run_id}")
    prog("detecting episodes, then precursors, layers and data for each")
    try:
        res = analyze_run(src, run_id, params)
    finally:
        prog.close()
    prog.note(f"forensics {run_id}: {res.n_steps} steps read, {len(res.spikes)} episode(s) analysed "
              f"[{res.timings.get('total_s', 0.0):.1f}s]")
    if args.replay:
        _causal_checks(store, res)
    prog = Progress(f"forensics {run_id}")
    with prog:
        prog(f"writing reports to {args.out}")
        paths = write_reports(res, args.out, html_report=not args.no_html)
        if not args.no_spike_rows:
            prog(f"writing spike rows to {args.out_store or store}")
            paths["spikes"] = write_spike_rows(res, args.out_store or store)
    obj = to_json(res)
    if args.json:
        obj["files"] = {k: str(v) for k, v in paths.items()}
        json.dump(obj, sys.stdout, allow_nan=False)
        sys.stdout.write("\n")
        return 0
    rng = f" over steps {res.step_range[0]}..{res.step_range[1]}" if res.step_range else ""
    print(f"run {res.run_id}: {res.n_steps} logged points{rng}, {len(res.spikes)} spike(s)")
    n_minor = sum(1 for s in obj["spikes"] if s.get("minor"))
    for i in obj["ranked"]:
        s = obj["spikes"][i - 1]
        if s.get("minor"):
            continue
        verdict = (s.get("data") or {}).get("verdict", "-")
        print(f"  {s['signal']} steps {s['onset_step']}-{s['end_step']}: {s['class']}, {s['severity']}, "
              f"z {_mag(s['max_z'])}, magnitude {_mag(s['magnitude'])}, data {verdict}")
        print(f"    {s['reason']}")
    if n_minor:
        print(f"  and {n_minor} minor blip(s) (benign transients near the threshold; see the report)")
    for line in res.impossible:
        print(f"  not possible: {line}")
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def _causal_checks(store: Path, res: Any) -> None:
    """`--replay`: the causal check of every spike, its replays launched by the replay tool
    (forensics decides what to replay; launching a training run is a tool's job)."""
    from k2repro.forensics.causal import causal_check
    from k2repro.tools.replay import replay

    def launch(a: int, b: int, out_store: Path, overrides: dict[str, Any] | None) -> dict[str, Any]:
        return replay(store, res.run_id, a, b, out_store=out_store, checkpoints=False,
                      progress=lambda m: print(f"[replay] {m}", file=sys.stderr, flush=True),
                      overrides=overrides)

    res.notes = [n for n in res.notes if not n.startswith("causal check")]
    for sp in res.spikes:
        sp.causal = c = causal_check(res, sp, launch)
        res.notes.append(f"causal check, spike at {sp.episode.onset_step}: {c['verdict']}: {c['reason']}")


def _mag(v: float | None) -> str:
    return "inf" if v is None else f"{v:.3g}"
