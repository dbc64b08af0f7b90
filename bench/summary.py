"""reports/bench/summary.md from the JSON files the benchmarks wrote (reports/bench/*.json):
every figure with its goal, the baseline measured in the same run, the ratio, whether the goal
is met, and the machine and load it ran on. `bench/run_all.py` calls it at the end; it also runs
alone on whatever JSON files are there:

    .venv/bin/python bench/summary.py [--dir reports/bench] [--out reports/bench/summary.md]

Each benchmark writes its own JSON shape, so each known file has a small extractor; an unknown
file gets a generic row (its `what`, `goal`, ratio-like and met-like keys).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "reports" / "bench"
RUN_ALL = "run_all.json"

Row = dict  # figure, ours, baseline, ratio, goal, met


def _f(x: object, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def _med(xs: list | None) -> float | None:
    return statistics.median(xs) if xs else None


def _ci(d: dict, key: str = "ci95") -> str:
    ci = d.get(key)
    return f" [{_f(ci[0])}, {_f(ci[1])}]" if isinstance(ci, list) and len(ci) == 2 else ""


def trainer(d: dict) -> list[Row]:
    r = d.get("median_ratio")
    return [{"figure": "trainer tokens/s (world size 1, audit off)",
             "ours": f"{_f(_med(d.get('ours_tokens_per_s')))} tok/s",
             "baseline": f"{_f(_med(d.get('baseline_tokens_per_s')))} tok/s (bare PyTorch loop)",
             "ratio": f"{_f(r)}{_ci(d)}", "goal": d.get("goal", ">= 0.95"),
             "met": r is not None and r >= 0.95}]


def audit(d: dict) -> list[Row]:
    rows = []
    st = d.get("step_time_s", {})
    for key, label in (("default", "defaults"), ("full", "full statistics")):
        x = d.get(key)
        if not isinstance(x, dict):
            continue
        rows.append({"figure": f"step time with the audit on ({label}) / off, 2 ranks",
                     "ours": f"{_f(_med(st.get(key)))} s/step", "baseline": f"{_f(_med(st.get('off')))} s/step (audit off)",
                     "ratio": f"{_f(x.get('median_ratio'))}{_ci(x)}", "goal": f"<= {x.get('goal')}",
                     "met": x.get("met")})
    return rows


def audit_api(d: dict) -> list[Row]:
    rows = []
    for key, label in (("log_step", "log_step every step"), ("full", "log_step + log_layer_stats every step")):
        x = d.get(key)
        if not isinstance(x, dict):
            continue
        for clock in ("wall", "cpu"):
            c = x.get(clock)
            if not isinstance(c, dict):
                continue
            ours = _med(d.get("step_time_s" if clock == "wall" else "step_cpu_s", {}).get(key))
            base = _med(d.get("step_time_s" if clock == "wall" else "step_cpu_s", {}).get("off"))
            goal = d.get("goal", {}).get(key) if isinstance(d.get("goal"), dict) else d.get("goal")
            rows.append({"figure": f"`k2repro.audit.start` on a plain loop: {label}, {clock} time per step",
                         "ours": f"{_f(ours)} s", "baseline": f"{_f(base)} s (same loop, no audit)",
                         "ratio": f"{_f(c.get('median_ratio'))}{_ci(c)}",
                         "goal": goal if goal is not None else "none stated in the JSON",
                         "met": c.get("met")})
    return rows


def logger(d: dict) -> list[Row]:
    rows = []
    goals = d.get("goals", {})
    for name, x in sorted(d.get("results", {}).items()):
        if name == "k2repro_sink" or not isinstance(x, dict) or "ours_speedup" not in x:
            continue
        if name.startswith("mlflow"):
            goal, met = ">= 100x MLflow (the best MLflow backend)", goals.get("ours_ge_100x_mlflow")
        elif name.startswith("wandb"):
            goal, met = ">= 10x W&B offline", goals.get("ours_ge_10x_wandb_offline")
        else:
            goal, met = "fastest of all measured", goals.get("ours_fastest_of_all_measured")
        scaled = " (2,000 steps, scaled)" if x.get("scaled") else ""
        rows.append({"figure": f"logging throughput, {d.get('scalars_per_step', 67)} scalars/step: vs {name}",
                     "ours": f"{_f(x.get('paired_ours_steps_per_s'))} steps/s",
                     "baseline": f"{_f(x.get('steps_per_s'))} steps/s{scaled}",
                     "ratio": f"{_f(x.get('ours_speedup'))}x", "goal": goal, "met": met})
    return rows


def dedup(d: dict) -> list[Row]:
    q = d.get("quality", {})
    qo, qb = q.get("ours", {}), q.get("baseline", {})
    speed = d.get("median_speedup")
    quality_ok = None
    if qo and qb:
        quality_ok = all(qo.get(k, 0) >= max(qb.get(k, 0), 0.95) for k in ("precision", "recall"))
    return [{"figure": "dedup documents/s (sample corpus)",
             "ours": f"{_f(d.get('ours', {}).get('docs_per_s'))} docs/s",
             "baseline": f"{_f(d.get('baseline', {}).get('docs_per_s'))} docs/s (datasketch MinHashLSH)",
             "ratio": f"{_f(speed)}x{_ci(d, 'speedup_ci95')}", "goal": "speedup >= 1",
             "met": speed is not None and speed >= 1},
            {"figure": "dedup precision / recall (constructed set)",
             "ours": f"{_f(qo.get('precision'))} / {_f(qo.get('recall'))}",
             "baseline": f"{_f(qb.get('precision'))} / {_f(qb.get('recall'))}", "ratio": "—",
             "goal": ">= the baseline's and >= 0.95", "met": quality_ok}]


def forensics(d: dict) -> list[Row]:
    g = d.get("goal", {})
    log = d.get("log", {})
    return [{"figure": f"forensics on {_f(log.get('n_steps'))} steps x {_f(log.get('n_params'))} tensors "
                       f"({_f(log.get('layer_rows'))} layer rows): time, peak RSS",
             "ours": f"{_f(d.get('forensics_s'))} s, {_f(d.get('peak_rss_mb'))} MB",
             "baseline": f"{_f(d.get('baseline_scan_s'))} s, {_f(d.get('baseline_peak_rss_mb'))} MB (DuckDB bare scan)",
             "ratio": _f(d.get("ratio_forensics_over_scan")),
             "goal": f"<= {_f(g.get('time_s'))} s and <= {_f(g.get('rss_mb'))} MB", "met": g.get("met")}]


def import_(d: dict) -> list[Row]:
    rows = []
    for kind, x in sorted(d.get("results", {}).items()):
        rows.append({"figure": f"import of {_f(x.get('rows'))} rows ({kind}, {_f(x.get('file_mb'))} MB)",
                     "ours": f"{_f(x.get('import_median_s'))} s wall, {_f(_med(x.get('import_cpu_s')))} s CPU",
                     "baseline": f"{_f(x.get('duckdb_read_csv_median_s'))} s wall, "
                                 f"{_f(_med(x.get('duckdb_read_csv_cpu_s')))} s CPU (DuckDB read_csv)",
                     "ratio": f"{_f(x.get('ratio_import_to_read_csv'))} wall, {_f(x.get('cpu_ratio_import_to_read_csv'))} CPU",
                     "goal": f"<= {_f(d.get('goal_s'))} s", "met": x.get("meets_goal")})
    return rows


def replay(d: dict) -> list[Row]:
    pairs = d.get("pairs") if isinstance(d.get("pairs"), list) else []
    ours = base = None
    if pairs:
        ours = _med([p.get("replay", {}).get("wall_s") for p in pairs if p.get("replay", {}).get("wall_s")])
        base = _med([p.get("original", {}).get("window_wall_s") for p in pairs
                     if p.get("original", {}).get("window_wall_s")])
    ours = ours or d.get("replay_wall_s")
    base = base or d.get("original_window_wall_s")
    w = d.get("window")
    return [{"figure": f"replay of a {_f(d.get('window_steps'))}-step window"
                       + (f" (steps {w[0]}..{w[1]})" if isinstance(w, list) else "")
                       + f", bit-exact: {_f(d.get('all_bit_exact', d.get('bit_exact')))}",
             "ours": f"{_f(ours)} s (`k2repro replay`)", "baseline": f"{_f(base)} s (original, same steps)",
             "ratio": _f(d.get("ratio")), "goal": d.get("goal", "<= 1.2"), "met": d.get("meets_goal")}]


def compact(d: dict) -> list[Row]:
    b, c = d.get("baseline_query_s", {}), d.get("compacted_query_s", {})
    return [{"figure": f"query over {_f(d.get('files_before'))} small segments, after `gc --compact` "
                       f"(identical answers: {_f(d.get('identical_answers'))})",
             "ours": f"{_f(c.get('median'))} s", "baseline": f"{_f(b.get('median'))} s (before compaction)",
             "ratio": f"{_f(d.get('ratio_baseline_over_compacted'))}x faster",
             "goal": d.get("goal", "none stated in the JSON"), "met": d.get("met", d.get("meets_goal"))}]


def generic(d: dict) -> list[Row]:
    ratio = next((d[k] for k in ("median_ratio", "ratio", "speedup", "median_speedup") if k in d), None)
    met = next((d[k] for k in ("met", "meets_goal") if k in d), None)
    return [{"figure": d.get("what", "see the JSON"), "ours": "see the JSON", "baseline": "see the JSON",
             "ratio": _f(ratio), "goal": _f(d.get("goal")), "met": met}]


EXTRACTORS: dict[str, Callable[[dict], list[Row]]] = {
    "trainer": trainer, "audit": audit, "audit_api": audit_api, "logger": logger, "dedup": dedup,
    "forensics": forensics, "import": import_, "replay": replay, "compact": compact,
}


def machine_text(m: dict | None) -> str:
    if not m:
        return "unknown"
    return f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gb')} GB, Python {m.get('python')}"


def load_text(d: dict) -> str:
    for a, b in (("loadavg_before", "loadavg_after"), ("loadavg_at_start", "loadavg_at_end")):
        if a in d:
            return f"{[round(x, 1) for x in d[a]]} -> {[round(x, 1) for x in d.get(b, [])]}"
    la = d.get("load_average_1_5_15min")
    if isinstance(la, dict):
        return f"{la.get('before')} -> {la.get('after')}"
    return "not recorded"


def build(directory: Path, out: Path | None = None) -> str:
    run_all = {}
    if (directory / RUN_ALL).exists():
        run_all = json.loads((directory / RUN_ALL).read_text())
    files = sorted(p for p in directory.glob("*.json") if p.name != RUN_ALL)
    fresh = {n for b in run_all.get("benches", []) for n in b.get("wrote", [])}
    lines = ["# Benchmarks: summary", ""]
    where = os.path.relpath(directory, (out or directory / "summary.md").parent)
    if where != ".":
        lines += [f"The JSON files of these figures are in [{where}/]({where}/).", ""]
    if run_all:
        lines += [f"Regenerated by `{run_all.get('command', 'make bench')}` on {run_all.get('date')}, "
                  f"{run_all.get('wall_s', 0) / 60:.1f} min in all, on {machine_text(run_all.get('machine'))} "
                  f"({run_all.get('machine', {}).get('platform', '')}).",
                  f"Load average (1, 5, 15 min) before: {run_all.get('load_before')}, after: {run_all.get('load_after')}; "
                  f"`uptime` at the start: `{run_all.get('uptime_before', '')}`. The machine is shared with other "
                  "work: wall-clock figures move with its load, so each benchmark measures its baseline in the same "
                  "run (ABBA pairs where it can) and the ratio is the figure to read.", ""]
    else:
        lines += ["Built by `bench/summary.py` from the JSON files in reports/bench (no run_all.json: the "
                  "benchmarks ran one by one).", ""]
    lines += ["| benchmark | figure | ours | baseline (same run) | ratio | goal | met |",
              "|---|---|---|---|---|---|---|"]
    machines = {}
    notes = []
    for p in files:
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            notes.append(f"- {p.name}: not valid JSON ({exc.msg})")
            continue
        name = p.stem
        try:
            rows = EXTRACTORS.get(name, generic)(d)
        except Exception as exc:  # a changed JSON shape must not lose the other benchmarks
            rows = generic(d)
            notes.append(f"- {p.name}: extractor failed ({type(exc).__name__}: {exc}); generic row shown")
        machines[machine_text(d.get("machine"))] = machines.get(machine_text(d.get("machine")), []) + [name]
        stale = "" if not run_all or p.name in fresh else " (stale: not rewritten by this run)"
        for i, r in enumerate(rows):
            label = f"`{p.name}`{stale}" if i == 0 else ""
            lines.append(f"| {label} | {r['figure']} | {r['ours']} | {r['baseline']} | {r['ratio']} | "
                         f"{r['goal']} | {_f(r['met']) if r['met'] is not None else '—'} |")
        cmd = d.get("command")
        what = str(d.get("what", "")).rstrip(".")
        notes.append(f"- `{p.name}`: {what + '. ' if what else ''}Load while it ran: {load_text(d)}."
                     + (f" Command: `{cmd}`." if cmd else ""))
    lines += ["", "Machines: " + "; ".join(f"{m} ({', '.join(n)})" for m, n in machines.items()) + ".", ""]
    if run_all:
        lines += ["## What `make bench` ran", "",
                  "| benchmark | arguments | exit | minutes | load before -> after | JSON written |",
                  "|---|---|---|---|---|---|"]
        for b in run_all.get("benches", []):
            args = " ".join(b.get("args", [])) or "(defaults)"
            lines.append(f"| {b['name']} | `{args}` | {b.get('rc')}{' (timed out)' if b.get('timed_out') else ''} | "
                         f"{b.get('seconds', 0) / 60:.1f} | {b.get('load_before')} -> {b.get('load_after')} | "
                         f"{', '.join(b.get('wrote', [])) or 'none'} |")
        reduced = [b for b in run_all.get("benches", []) if b.get("reason")]
        if reduced:
            lines += ["", "Arguments below a benchmark's defaults, so that `make bench` stays under 20 minutes "
                          "on 2 cores (run the script alone with its defaults for the full measurement):"]
            lines += [f"- {b['name']}: {b['reason']}" for b in reduced]
        failed = [b for b in run_all.get("benches", []) if b.get("rc") != 0]
        if failed:
            lines += ["", "Failures (the run went on):"]
            lines += [f"- {b['name']}: exit {b.get('rc')}: `{b.get('tail', '')}`" for b in failed]
        lines.append("")
    lines += ["## Notes per file", ""] + notes + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=str(OUT), help="folder of the benchmark JSON files (default reports/bench)")
    ap.add_argument("--out", default=None, help="the page to write (default: summary.md in --dir)")
    args = ap.parse_args(argv)
    d = Path(args.dir)
    if not d.is_dir():
        print(f"bench/summary.py: error: {d} is not a folder", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else d / "summary.md"
    text = build(d, out)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
