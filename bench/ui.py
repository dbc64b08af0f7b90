"""`k2repro ui` at scale: request times of a real server (`k2repro ui`, real HTTP) on the
synthetic store of bench/forensics.py (1M steps, 100 parameter tensors = 100M layer_stats rows)
and on a store of 1,000 runs, on 2 cores.

    .venv/bin/python bench/ui.py [--steps 1000000] [--params 100] [--runs 1000] [--repeats 30]

Measured (issue 20's goals): a 1M-step curve request, min/max per pixel bucket, p95 <= 200 ms
(full range and random zooms); the same curve fetched whole (no downsampling) as the baseline;
a layer heatmap over 100M rows <= 1 s warm, with the cold first request (it builds the per-run
block cache: the one-time cost) reported beside it and the heatmap without the cache; the runs
page with 1,000 runs <= 300 ms. The 1M-step store is bench/forensics.py's own (same default
folder, <tmp>/k2repro-bench/forensics, so one copy of its ~3-4 GB serves both; generated if
missing, a few minutes); the 1,000-run store is generated once into <tmp>/k2repro-bench/ui
($K2REPRO_BENCH_WORK replaces <tmp>/k2repro-bench). Output: reports/bench/ui.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import write  # noqa: E402
from bench.forensics import RUN_ID  # noqa: E402
from bench.forensics import generate as generate_big  # noqa: E402

GOALS = {"curve_p95_ms": 200.0, "heatmap_warm_s": 1.0, "runs_page_ms": 300.0}


def many_runs(work: Path, n: int, steps: int = 50) -> Path:
    """A store of `n` small runs (steps, hparams, a few lineage links), generated once."""
    from k2repro.forensics.synthetic import SyntheticRun, generate, write_tables

    store = work / f"runs-{n}x{steps}"
    done = store / "DONE"
    if done.exists():
        return store
    for i in range(n):
        rid = f"r{i:05d}"
        data = generate(SyntheticRun(run_id=rid, n_steps=steps, seed=i, with_layers=False, batch=2))
        write_tables(store, rid, {
            "runs": {"run_id": [rid], "name": [f"run-{i % 97}"], "source": ["train"], "world_size": [1],
                     "parent_run_id": [f"r{i - 1:05d}" if i % 10 else None],
                     "resumed_from_step": [steps // 2 if i % 10 else None]},
            "hparams": {"key": ["run.tags", "optim.lr"], "value": [json.dumps(["bench", f"g{i % 7}"]), "0.001"],
                        "value_type": ["list", "float"]},
            "steps": data["steps"]})
    done.write_text("ok\n")
    return store


class Client:
    """A `k2repro ui` server process and timed GETs against it."""

    def __init__(self, store: Path) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.ui.serve import Server

        self.srv = Server(store)

    def get(self, path: str) -> tuple[float, int, dict]:
        t = time.perf_counter()
        with urllib.request.urlopen(self.srv.base + path, timeout=600) as r:
            body = r.read()
        ms = (time.perf_counter() - t) * 1000
        return ms, len(body), json.loads(body)

    def close(self) -> None:
        self.srv.stop()


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def summary(xs: list[float]) -> dict:
    return {"p50_ms": round(statistics.median(xs), 1), "p95_ms": round(p95(xs), 1), "max_ms": round(max(xs), 1),
            "n": len(xs)}


def bench_big(store: Path, n_steps: int, repeats: int, rng: random.Random) -> dict:
    c = Client(store)
    try:
        out: dict = {}
        ms, size, d = c.get(f"/api/runs/{RUN_ID}/curve?points=2000")
        out["curve_cold_first_request_ms"] = round(ms, 1)
        full = [c.get(f"/api/runs/{RUN_ID}/curve?points=2000")[0] for _ in range(repeats)]
        zooms = []
        for _ in range(repeats):
            w = rng.choice([100, 1000, 10_000, 100_000, 500_000])
            lo = rng.randint(1, max(1, n_steps - w))
            zooms.append(c.get(f"/api/runs/{RUN_ID}/curve?points=2000&lo={lo}&hi={lo + w}")[0])
        out["curve_full_range"] = summary(full) | {"points_sent": len(d["step"]), "bytes": size}
        out["curve_random_zooms"] = summary(zooms)
        out["curve_p95_ms"] = round(p95(full + zooms), 1)
        raw = [c.get(f"/api/runs/{RUN_ID}/curve?raw=1") for _ in range(3)]
        out["curve_whole_no_downsampling"] = summary([r[0] for r in raw]) | {"points_sent": len(raw[0][2]["step"]),
                                                                             "bytes": raw[0][1]}
        ms, _, h = c.get(f"/api/runs/{RUN_ID}/layers?col=update_ratio&buckets=600")
        out["heatmap_cold_first_request_s"] = round(ms / 1000, 3)
        out["heatmap_cache_used"] = h["cached"]
        warm = [c.get(f"/api/runs/{RUN_ID}/layers?col=update_ratio&buckets=600")[0] for _ in range(5)]
        zoomed = []
        span = min(50_000, n_steps // 20)
        for _ in range(5):
            lo = rng.randint(1, n_steps - span)
            zoomed.append(c.get(f"/api/runs/{RUN_ID}/layers?col=update_ratio&buckets=600&lo={lo}&hi={lo + span}")[0])
        out["heatmap_warm_full_range"] = summary(warm) | {"params": len(h["params"]), "buckets": len(h["bucket_start"])}
        out["heatmap_warm_zoom"] = summary(zoomed) | {"steps": span}
        out["heatmap_warm_s"] = round(max(warm + zoomed) / 1000, 3)
        return out
    finally:
        c.close()


def bench_heatmap_uncached(store: Path) -> dict:
    """The same heatmap aggregated from the raw rows (no cache), in-process: the baseline."""
    from k2repro.ui.data import StoreReader

    r = StoreReader(store)
    try:
        t = time.perf_counter()
        r.heatmap(RUN_ID, col="update_ratio", buckets=600, cache=False)
        return {"heatmap_uncached_s": round(time.perf_counter() - t, 3),
                "threads": r._store.con.execute("SELECT current_setting('threads')").fetchone()[0]}
    finally:
        r.close()


def bench_runs(store: Path, repeats: int) -> dict:
    c = Client(store)
    try:
        ms, size, d = c.get("/api/runs")
        warm = [c.get("/api/runs")[0] for _ in range(repeats)]
        return {"runs_cold_first_request_ms": round(ms, 1), "runs_page": summary(warm) | {"runs": len(d["runs"]),
                                                                                         "bytes": size},
                "runs_page_ms": round(p95(warm), 1)}
    finally:
        c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--params", type=int, default=100)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=30)
    bench_root = Path(os.environ.get("K2REPRO_BENCH_WORK") or Path(tempfile.gettempdir()) / "k2repro-bench")
    ap.add_argument("--work", default=str(bench_root / "ui"), help="folder of the 1,000-run store")
    ap.add_argument("--forensics-work", default=str(bench_root / "forensics"),
                    help="bench/forensics.py's work folder (its 1M-step store is reused, made if missing)")
    ap.add_argument("--out", default="ui", help="name of the JSON under reports/bench/ (default ui)")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(a.work)
    rng = random.Random(0)
    t = time.perf_counter()
    info = generate_big(Path(a.forensics_work), a.steps, a.params)
    big = Path(info["store"])
    runs_store = many_runs(work, a.runs)
    gen_s = time.perf_counter() - t
    res: dict = {"n_steps": a.steps, "n_params": a.params, "layer_rows": a.steps * a.params, "n_runs": a.runs,
                 "generate_or_reuse_s": round(gen_s, 1), "cores": os.cpu_count()}
    res |= bench_big(big, a.steps, a.repeats, rng)
    res |= bench_heatmap_uncached(big)
    res |= bench_runs(runs_store, a.repeats)
    res["goals"] = GOALS
    res["met"] = {k: res[k] <= v for k, v in GOALS.items()}
    write(a.out, res)


if __name__ == "__main__":
    main()
