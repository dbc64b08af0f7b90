"""Forensics over a 1,000,000-step synthetic log with 100 parameter tensors of layer_stats
(100M rows, about 3-4 GB of Parquet) on 2 cores: time and peak memory of detection,
attribution and the JSON report, against DuckDB's bare scan of the same files measured in
the same run.

    .venv/bin/python bench/forensics.py [--steps 1000000] [--params 100] [--work DIR]

The log is generated once (single-threaded DuckDB, a few minutes) into a work folder (default:
<tmp>/k2repro-bench/forensics, or $K2REPRO_BENCH_WORK) and reused while its spec is unchanged.
Each measurement runs in a fresh process, so its peak RSS is its own. Output:
reports/bench/forensics.json. Goal (issue 18): <= 3 s and <= 2 GB for detection, attribution and
JSON, median of 3 runs on 2 cores, with nothing else running on the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import write  # noqa: E402

RUN_ID = "bench-forensics"
GOAL_S, GOAL_MB = 3.0, 2048.0
SAMPLES_PER_STEP = 8
THREADS = 2


def spikes(n: int) -> list:
    """Known spikes spread over the run: bad batches, lr spikes, grad-norm leads, a slow one."""
    from k2repro.forensics.synthetic import InjectedSpike

    f = [0.004, 0.11, 0.23, 0.37, 0.46, 0.58, 0.67, 0.79, 0.88, 0.95]
    kinds = ["bad_batch", "bad_batch", "lr_spike", "grad_lead", "bad_batch", "slow", "lr_spike",
             "grad_lead", "bad_batch", "bad_batch"]
    out = []
    for frac, kind in zip(f, kinds, strict=True):
        step = max(60, int(frac * n))
        if kind == "slow":
            out.append(InjectedSpike(kind, step, size=1.0, decay=80.0))
        elif kind == "lr_spike":
            out.append(InjectedSpike(kind, step, size=50.0))
        elif kind == "grad_lead":
            out.append(InjectedSpike(kind, step, size=0.8, lead=2))
        else:
            out.append(InjectedSpike(kind, step))
    return out


def expected_onsets(sp: list) -> list[int]:
    # an lr spike shows in the loss of the step after it
    return [s.step + 1 if s.kind == "lr_spike" else s.step for s in sp]


def generate(work: Path, n_steps: int, n_params: int) -> dict:
    """The run's small tables through the audit store's writer; layer_stats (n_steps x
    n_params rows) straight from DuckDB into `<store>/<run>/layer_stats/` in step order."""
    import duckdb
    import numpy as np
    import pyarrow as pa

    from k2repro.forensics.synthetic import SyntheticRun, param_names, write_tables
    from k2repro.forensics.synthetic import generate as gen

    spec_key = {"n_steps": n_steps, "n_params": n_params, "samples": SAMPLES_PER_STEP, "v": 3}
    digest = hashlib.sha256(json.dumps(spec_key, sort_keys=True).encode()).hexdigest()[:12]
    store = work / f"store-{digest}"
    done = store / "DONE.json"
    if done.exists():
        return json.loads(done.read_text())
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    sp = spikes(n_steps)
    spec = SyntheticRun(run_id=RUN_ID, n_steps=n_steps, seed=7, tau=2000.0, batch=SAMPLES_PER_STEP,
                        with_layers=False, spikes=tuple(sp), n_params=n_params)
    data = gen(spec)
    d = data["drivers"]
    tables: dict = {
        "runs": {"run_id": [RUN_ID], "name": [RUN_ID], "source": ["train"], "world_size": [2]},
        "hparams": {"key": ["audit.layer_stats_every", "train.max_steps"], "value": ["1", str(n_steps)],
                    "value_type": ["int", "int"]},
        "steps": {k: v for k, v in data["steps"].items()},
        "sample_stats": data["sample_stats"],
    }
    ev = data["events"]
    if ev:
        from datetime import datetime, timezone

        tables["events"] = {"time": [datetime(2025, 1, 1, tzinfo=timezone.utc)] * len(ev),
                            "rank": [0] * len(ev), "step": [e["step"] for e in ev],
                            "kind": [e["kind"] for e in ev], "severity": [e["severity"] for e in ev],
                            "detail": [json.dumps(e["detail"]) for e in ev]}
    run_dir = write_tables(store, RUN_ID, tables)
    del tables, data
    t_small = time.perf_counter() - t0

    con = duckdb.connect()
    con.execute("SET threads=1")
    con.execute("SET preserve_insertion_order=true")
    names = param_names(n_params)
    w = np.linspace(1.0, 0.3, n_params)
    con.register("drv_df", pa.table({"step": d["step"], "g": d["grad_norm"], "lr": d["lr"], "focus": d["focus"]}))
    con.execute("CREATE TABLE drv AS SELECT * FROM drv_df")
    con.register("pn_df", pa.table({"p": np.arange(n_params), "name": names, "w": w,
                                    "hot": np.arange(n_params) < max(1, n_params // 3)}))
    con.execute("CREATE TABLE pn AS SELECT * FROM pn_df")
    out_dir = run_dir / "layer_stats"
    out_dir.mkdir(parents=True, exist_ok=True)
    chunk = 100_000
    t1 = time.perf_counter()
    for lo in range(1, n_steps + 1, chunk):
        hi = min(n_steps, lo + chunk - 1)
        tmp = out_dir / f".b-{lo:09d}.parquet.tmp"
        # the same formulas as synthetic.generate's numpy path; noise from a hash of
        # (step, param) so the file does not depend on thread scheduling
        con.execute(f"""
COPY (
  SELECT '{RUN_ID}' AS run_id, step::BIGINT AS step, name AS param, gn AS grad_norm,
         pnorm AS param_norm, un AS update_norm, un / pnorm AS update_ratio, 0.1 * gn AS grad_max_abs
  FROM (
    SELECT d.step, pn.p, pn.name,
           d.g * pn.w * exp(0.05 * 3.4641 * ((hash(d.step * 1009 + pn.p) % 1000003) / 1000003.0 - 0.5))
             * CASE WHEN pn.hot THEN d.focus ELSE 1.0 END AS gn,
           10.0 * pn.w * (1.0 + 0.0005 * d.step) AS pnorm,
           d.lr * sqrt(pn.w) * 30.0 * exp(0.05 * 3.4641 * ((hash(d.step * 7919 + pn.p) % 1000003) / 1000003.0 - 0.5)) AS un
    FROM drv d CROSS JOIN pn
    WHERE d.step BETWEEN {lo} AND {hi}
  )
  ORDER BY step, p
) TO '{tmp}' (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 122880)""")
        os.replace(tmp, out_dir / f"b-{lo:09d}.parquet")
        print(f"  layer_stats steps {lo}..{hi} ({time.perf_counter() - t1:.0f} s)", flush=True)
    con.close()
    size = sum(f.stat().st_size for f in run_dir.rglob("*.parquet"))
    info = {"store": str(store), "n_steps": n_steps, "n_params": n_params,
            "layer_rows": n_steps * n_params, "sample_rows": n_steps * SAMPLES_PER_STEP,
            "parquet_bytes": size,
            "layer_parquet_bytes": sum(f.stat().st_size for f in out_dir.glob("*.parquet")),
            "generate_s": round(time.perf_counter() - t0, 1), "generate_small_tables_s": round(t_small, 1),
            "spikes": [{"kind": s.kind, "step": s.step} for s in sp],
            "expected_onsets": expected_onsets(sp)}
    done.write_text(json.dumps(info, indent=2))
    return info


# ----------------------------------------------------------------------------- measured parts

def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space, so it starts
    afresh at exec; ru_maxrss would carry over the launching process's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child_scan(store: str) -> dict:
    """Baseline: DuckDB reads every column of the run's Parquet files once."""
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads={THREADS}")
    run = Path(store) / RUN_ID
    t = time.perf_counter()
    ls = con.execute(
        "SELECT count(*), sum(step), min(param), sum(grad_norm), sum(param_norm), "
        "sum(update_norm), sum(update_ratio), sum(grad_max_abs) FROM read_parquet(?)",
        [str(run / "layer_stats" / "*.parquet")]).fetchone()
    t_ls = time.perf_counter() - t
    t1 = time.perf_counter()
    con.execute("SELECT sum(grad_norm) FROM read_parquet(?)", [str(run / "layer_stats" / "*.parquet")]).fetchone()
    t_one = time.perf_counter() - t1
    t2 = time.perf_counter()
    st = con.execute("SELECT count(*), sum(loss), sum(grad_norm), sum(lr), sum(logz_mean) FROM read_parquet(?)",
                     [str(run / "steps" / "*.parquet")]).fetchone()
    t_st = time.perf_counter() - t2
    return {"scan_s": t_ls + t_st, "scan_layer_stats_s": t_ls, "scan_steps_s": t_st,
            "scan_one_column_s": t_one,
            "layer_rows": ls[0], "steps_rows": st[0], "peak_rss_mb": _peak_rss_mb()}


def child_forensics(store: str, out: str, html: bool) -> dict:
    """The measured work: open the store, analyze (detect, episodes, precursors, layer and
    data attribution), build and write the JSON (and spike rows)."""
    t0 = time.perf_counter()
    import k2repro
    from k2repro.forensics.analyze import analyze_run
    from k2repro.forensics.report import to_json, write_spike_rows

    t_import = time.perf_counter() - t0
    t = time.perf_counter()
    s = k2repro.open_store(store)
    s.con.execute(f"SET threads={THREADS}")
    res = analyze_run(s, RUN_ID)
    t_an = time.perf_counter() - t
    t = time.perf_counter()
    obj = to_json(res)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "forensics.json").write_text(json.dumps(obj, allow_nan=False))
    write_spike_rows(res, Path(out) / "spike-store")
    t_json = time.perf_counter() - t
    total = time.perf_counter() - t0
    rss = _peak_rss_mb()
    # the forked child of the whole-series passes (forensics/parallel.py), reaped by now
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    result = {
        "peak_rss_child_mb": child_rss,
        "forensics_s": total, "import_s": t_import, "analyze_s": t_an, "json_and_rows_s": t_json,
        "breakdown": {k: round(v, 3) for k, v in res.timings.items()},
        "peak_rss_mb": rss, "onsets": [sp.episode.onset_step for sp in res.spikes],
        "classes": [sp.episode.cls for sp in res.spikes],
        "verdicts": [sp.data.verdict if sp.data else None for sp in res.spikes],
        "leads": [sp.lead.signal if sp.lead else None for sp in res.spikes],
    }
    if html:
        from k2repro.forensics.report import to_html

        t = time.perf_counter()
        (Path(out) / "forensics.html").write_text(to_html(res, obj), encoding="utf-8")
        result["html_s"] = time.perf_counter() - t
        result["peak_rss_with_html_mb"] = _peak_rss_mb()
    return result


def _child(kind: str, *args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--child", kind, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"bench child {kind} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--params", type=int, default=100)
    ap.add_argument("--work", default=os.environ.get("K2REPRO_BENCH_WORK")
                    or str(Path(tempfile.gettempdir()) / "k2repro-bench" / "forensics"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        fn = {"scan": child_scan, "forensics": child_forensics}[kind]
        args = [*rest[:2]] + ([rest[2] == "1"] if kind == "forensics" else [])
        print(json.dumps(fn(*args)))
        return
    info = generate(Path(a.work), a.steps, a.params)
    print(f"log: {info['layer_rows']:,} layer_stats rows, {info['parquet_bytes'] / 2**30:.2f} GiB "
          f"(generated in {info['generate_s']} s)", flush=True)
    scans, runs = [], []
    load_before = list(os.getloadavg())  # a busy machine makes every figure below slower
    out = Path(a.work) / "out"
    for i in range(a.repeats):  # interleaved, so drift on a shared machine hits both
        scans.append(_child("scan", info["store"]))
        runs.append(_child("forensics", info["store"], str(out), "1" if i == 0 else "0"))
    med = sorted(runs, key=lambda r: r["forensics_s"])[len(runs) // 2]
    base = sorted(scans, key=lambda r: r["scan_s"])[len(scans) // 2]
    found = [any(abs(o - e) <= 2 for o in med["onsets"]) for e in info["expected_onsets"]]
    payload = {
        "what": "k2repro forensics (detection, episodes, precursors, layer + data attribution, JSON and "
                "spike rows) over a synthetic 1M-step run; baseline: DuckDB's bare scan of the same "
                "Parquet files (every layer_stats column + steps), same machine, same run",
        "threads": THREADS,
        "log": {k: info[k] for k in ("n_steps", "n_params", "layer_rows", "sample_rows", "parquet_bytes",
                                     "layer_parquet_bytes", "generate_s")},
        "baseline_scan_s": round(base["scan_s"], 3),
        "baseline_scan_layer_stats_s": round(base["scan_layer_stats_s"], 3),
        "scan_layer_stats_one_column_s": round(base["scan_one_column_s"], 3),
        "baseline_peak_rss_mb": round(base["peak_rss_mb"], 1),
        "forensics_s": round(med["forensics_s"], 3),
        "forensics_runs_s": [round(r["forensics_s"], 3) for r in runs],
        "baseline_runs_s": [round(r["scan_s"], 3) for r in scans],
        "ratio_forensics_over_scan": round(med["forensics_s"] / base["scan_s"], 3),
        # measured before the HTML in the run that also writes it
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
        "peak_rss_child_mb": round(max(r["peak_rss_child_mb"] for r in runs), 1),
        "breakdown_s": {"import": round(med["import_s"], 3), "analyze": round(med["analyze_s"], 3),
                        "json_and_rows": round(med["json_and_rows_s"], 3), **med["breakdown"]},
        "html_s_not_in_goal": round(runs[0].get("html_s", float("nan")), 3),
        "peak_rss_with_html_mb": round(runs[0].get("peak_rss_with_html_mb", float("nan")), 1),
        "spikes": {"injected": info["spikes"], "found_onsets": med["onsets"], "classes": med["classes"],
                   "data_verdicts": med["verdicts"], "lead_signals": med["leads"],
                   "all_injected_found": all(found), "n_found": len(med["onsets"]),
                   "n_not_injected": sum(not any(abs(o - e) <= 2 for e in info["expected_onsets"])
                                         for o in med["onsets"])},
        "goal": {"time_s": GOAL_S, "rss_mb": GOAL_MB,
                 "met": med["forensics_s"] <= GOAL_S and max(r["peak_rss_mb"] for r in runs) <= GOAL_MB},
        "load_before": load_before, "load_after": list(os.getloadavg()),
        "note": "layer_stats and sample_stats are read only in windows around episodes (row groups pruned "
                "by step), so forensics touches a small part of the 100M rows; the scan baseline reads all.",
    }
    write("forensics", payload)


if __name__ == "__main__":
    main()
