"""Logger throughput: 20,000 steps x 67 scalars through k2repro's AuditSink against MLflow
(SQLite backend and file store), TensorBoard (tensorboardX SummaryWriter), DVCLive and W&B
offline. End to end: the logging calls, the background writes and the final close/finish.

What 67 scalars are for k2repro: one `steps` row (15 numeric columns + batch_hash + time) and
`layer_stats` for 10 parameter tensors x 5 statistics, logged as columnar batches once per
`flush_every` = 10 steps (the trainer's way: statistics reach the host once per flush). The
others get the same 67 values per step through their per-step API (`log_metrics(dict, step)`,
`add_scalar` x 67, `log_metric` x 67 with `live.step` set, `run.log(dict, step)`).

Each logger runs in its own process (imports, threads and files cannot leak across), between
two runs of ours: the speed-up is taken against the mean of that pair, so the load of a shared
machine drifting during the bench hits both sides alike. Slow ones
run 2,000 steps and are reported as measured, with the 20,000-step time scaled linearly. Setup
(creating the run/experiment/database) is timed apart and not in steps/s. Also measured: a
floor that writes the same batches straight to Parquet in the loop (no thread, no schema
conformance, no redaction), to show what the sink's safety costs.

    .venv/bin/python bench/logger_throughput.py            # writes reports/bench/logger.json
    .venv/bin/python bench/logger_throughput.py --quick    # 2,000 steps everywhere (smoke run)

Bench-only packages: the `bench` extra (`make bench` installs it). A peer logger that cannot be
imported stops the full run before anything is measured (exit 1, naming the package): the
comparison is the point, so it is never quietly shorter. `--check-peers` does only that check;
`--only NAME ...` runs a subset and needs only those.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write  # noqa: E402

STEPS = 20_000
SLOW_STEPS = 2_000
FLUSH_EVERY = 10
N_PARAMS = 10
STEP_COLS = ["loss", "grad_norm", "lr", "tokens", "step_time_s", "tokens_per_s", "loss_min", "loss_max",
             "loss_std", "logz_mean", "skipped", "clipped", "mfu", "peak_mem_bytes", "n_samples"]
LAYER_COLS = ["grad_norm", "param_norm", "update_norm", "update_ratio", "grad_max_abs"]
N_SCALARS = len(STEP_COLS) + 2 + N_PARAMS * len(LAYER_COLS)  # 15 + batch_hash + time + 50 = 67
INT_COLS = {"tokens", "peak_mem_bytes", "n_samples"}
BOOL_COLS = {"skipped", "clipped"}

# logger -> steps it runs (slow ones are scaled to STEPS)
LOGGERS = {
    "k2repro_sink": STEPS,
    "parquet_sync_per_flush": STEPS,
    "tensorboardX": SLOW_STEPS,
    "mlflow_sqlite": SLOW_STEPS,
    "mlflow_file": SLOW_STEPS,
    "dvclive": SLOW_STEPS,
    "wandb_offline": SLOW_STEPS,
}


def values(n: int):  # noqa: ANN201 - numpy array
    import numpy as np

    return np.random.default_rng(0).random((n, N_SCALARS))


def names() -> list[str]:
    """The 67 metric names the per-step loggers get."""
    out = [f"train/{c}" for c in STEP_COLS] + ["train/batch_hash_u32", "train/time"]
    out += [f"layers/{p}/{c}" for p in range(N_PARAMS) for c in LAYER_COLS]
    assert len(out) == N_SCALARS
    return out


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ------------------------------------------------------------------------------ loggers


def _batches(vals, n: int):  # noqa: ANN001, ANN202
    """Columnar batches per flush: what a trainer hands the sink."""
    from datetime import datetime, timezone

    params = [f"layers.{i}.weight" for i in range(N_PARAMS)]
    now = datetime.now(timezone.utc)
    for s0 in range(0, n, FLUSH_EVERY):
        blk = vals[s0:s0 + FLUSH_EVERY]
        k = len(blk)
        steps = list(range(s0 + 1, s0 + k + 1))
        cols: dict = {"step": steps}
        for j, c in enumerate(STEP_COLS):
            col = blk[:, j]
            cols[c] = ((col * 1e6).astype("int64").tolist() if c in INT_COLS else
                       (col > 0.5).tolist() if c in BOOL_COLS else col.tolist())
        cols["batch_hash"] = [f"{int(x * 2**32):08x}" for x in blk[:, len(STEP_COLS)]]
        cols["time"] = [now] * k
        ls = blk[:, len(STEP_COLS) + 2:].reshape(k * N_PARAMS, len(LAYER_COLS))
        layer = {"step": [s for s in steps for _ in range(N_PARAMS)], "param": params * k}
        for j, c in enumerate(LAYER_COLS):
            layer[c] = ls[:, j].tolist()
        yield cols, layer


def run_k2repro_sink(n: int, out: Path) -> dict:
    from k2repro.audit.sink import AuditSink

    t0 = time.perf_counter()
    sink = AuditSink(out, "bench-run", flush_every=FLUSH_EVERY)
    sink.start({"name": "bench"}, {"bench": {"steps": n}}, {"host": "bench"}, [])
    setup = time.perf_counter() - t0
    vals = values(n)
    t0 = time.perf_counter()
    for cols, layer in _batches(vals, n):
        sink.log_steps(cols)
        sink.log_layer_stats(layer)
        sink.flush()
    sink.close()
    return {"seconds": time.perf_counter() - t0, "setup_s": setup, "segments": sink.segments_written}


def run_parquet_floor(n: int, out: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / "steps").mkdir(parents=True)
    (out / "layer_stats").mkdir(parents=True)
    vals = values(n)
    t0 = time.perf_counter()
    for i, (cols, layer) in enumerate(_batches(vals, n)):
        pq.write_table(pa.table(cols), out / "steps" / f"{i:08d}.parquet", compression="zstd")
        pq.write_table(pa.table(layer), out / "layer_stats" / f"{i:08d}.parquet", compression="zstd")
    return {"seconds": time.perf_counter() - t0, "setup_s": 0.0}


def _per_step(vals, n: int):  # noqa: ANN001, ANN202
    keys = names()
    for s in range(n):
        yield s + 1, dict(zip(keys, vals[s].tolist(), strict=True))


def _timed(n: int, setup, log_step, finish) -> dict:  # noqa: ANN001
    """Setup timed apart; then every step through `log_step(handle, step, metrics)` and the
    final `finish(handle)`, timed together."""
    t0 = time.perf_counter()
    handle = setup()
    setup_s = time.perf_counter() - t0
    vals = values(n)
    t0 = time.perf_counter()
    for step, metrics in _per_step(vals, n):
        log_step(handle, step, metrics)
    finish(handle)
    return {"seconds": time.perf_counter() - t0, "setup_s": setup_s}


def run_mlflow(n: int, out: Path, backend: str) -> dict:
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = f"sqlite:///{out / 'mlflow.db'}" if backend == "sqlite" else (out / "mlruns").as_uri()

    def setup() -> None:
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("bench")
        mlflow.start_run()

    res = _timed(n, setup, lambda _h, step, m: mlflow.log_metrics(m, step=step), lambda _h: mlflow.end_run())
    return {**res, "backend": uri.split(":")[0]}


def run_tensorboardx(n: int, out: Path) -> dict:
    from tensorboardX import SummaryWriter

    def log(w, step: int, metrics: dict) -> None:  # noqa: ANN001
        for k, v in metrics.items():
            w.add_scalar(k, v, step)

    return _timed(n, lambda: SummaryWriter(str(out)), log, lambda w: w.close())


def run_dvclive(n: int, out: Path) -> dict:
    from dvclive import Live

    def log(live, step: int, metrics: dict) -> None:  # noqa: ANN001
        live.step = step  # set the step instead of next_step(): no per-step summary writes
        for k, v in metrics.items():
            live.log_metric(k, v)

    return _timed(n, lambda: Live(str(out / "dvclive"), save_dvc_exp=False, dvcyaml=False, report=None),
                  log, lambda live: live.end())


def run_wandb(n: int, out: Path) -> dict:
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DISABLE_GIT="true",
                      WANDB_DIR=str(out), WANDB_CONSOLE="off")
    import wandb

    return _timed(n, lambda: wandb.init(project="bench", mode="offline", dir=str(out)),
                  lambda run, step, m: run.log(m, step=step), lambda run: run.finish())


RUNNERS = {
    "k2repro_sink": run_k2repro_sink,
    "parquet_sync_per_flush": run_parquet_floor,
    "tensorboardX": run_tensorboardx,
    "mlflow_sqlite": lambda n, out: run_mlflow(n, out, "sqlite"),
    "mlflow_file": lambda n, out: run_mlflow(n, out, "file"),
    "dvclive": run_dvclive,
    "wandb_offline": run_wandb,
}
#: The modules each peer logger imports (MLflow's SQLite store needs SQLAlchemy and Alembic).
PEER_MODULES = {"tensorboardX": ("tensorboardX",), "mlflow_sqlite": ("mlflow", "sqlalchemy", "alembic"),
                "mlflow_file": ("mlflow",), "dvclive": ("dvclive",), "wandb_offline": ("wandb",)}
PACKAGES = {"tensorboardX": "tensorboardX", "mlflow_sqlite": "mlflow-skinny", "mlflow_file": "mlflow-skinny",
            "dvclive": "dvclive", "wandb_offline": "wandb", "k2repro_sink": "k2repro", "parquet_sync_per_flush": "pyarrow"}


def one(name: str, n: int) -> dict:
    """Run one logger in this process; the output folder is a fresh temp dir (cwd too, so no
    logger finds a git or DVC repository to talk to)."""
    from importlib import metadata

    with tempfile.TemporaryDirectory(prefix=f"k2bench-{name}-") as tmp:
        out = Path(tmp)
        os.chdir(out)
        res = RUNNERS[name](n, out / "out")
        res.update(steps=n, bytes=du(out / "out"))
    try:
        res["version"] = metadata.version(PACKAGES[name])
    except metadata.PackageNotFoundError:
        res["version"] = None
    return res


def spawn(name: str, n: int, timeout: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    try:
        res = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(n)], capture_output=True,
                             text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout} s"}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"failed: {tail[:300]}"}
    return json.loads(lines[-1])


def missing_peers(only: list[str] | None = None) -> dict[str, str]:
    """{logger: why it cannot run} for the peer loggers (all, or those in `only`) whose modules
    do not import here; each import is tried for real (an installed but broken package counts)."""
    import importlib

    out: dict[str, str] = {}
    for name, modules in PEER_MODULES.items():
        if only and name not in only:
            continue
        for mod in modules:
            try:
                importlib.import_module(mod)
            except Exception as exc:  # noqa: BLE001 - any failure to import means the peer is missing
                out[name] = f"{mod}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
                break
    return out


def check_peers(only: list[str] | None = None) -> int:
    """Print one line per missing peer and the fix; 0 when every peer imports, else 1."""
    miss = missing_peers(only)
    for name, why in miss.items():
        print(f"logger_throughput: peer '{name}' cannot run ({why})", file=sys.stderr)
    if miss:
        pkgs = sorted({PACKAGES[n] for n in miss} | ({"sqlalchemy", "alembic"} if "mlflow_sqlite" in miss else set()))
        print(f"logger_throughput: install the bench extra (pip install '.[bench]', or {' '.join(pkgs)}); "
              "`make bench` does", file=sys.stderr)
        return 1
    print("logger_throughput: every peer logger imports: " + ", ".join(
        n for n in PEER_MODULES if not only or n in only))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="2,000 steps for every logger (smoke run)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these loggers")
    ap.add_argument("--check-peers", action="store_true",
                    help="only check that every peer logger imports (exit 1 naming those that do not)")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps or STEPS)))
        return 0
    if args.check_peers or check_peers(args.only):
        return check_peers(args.only) if args.check_peers else 1

    def summarize(name: str, runs: list[dict], n: int) -> dict:
        ok = [r for r in runs if "skipped" not in r]
        if not ok:
            return runs[0]
        secs = statistics.median(r["seconds"] for r in ok)
        r = dict(ok[0], seconds=secs, steps_per_s=n / secs, seconds_for_20k=secs * STEPS / n,
                 scaled=n != STEPS, bytes_per_step=ok[0]["bytes"] / n)
        if len(ok) > 1:
            r["seconds_all"] = [round(x["seconds"], 4) for x in ok]
        return r

    # The machine is shared: every other logger runs between two runs of ours, and its ratio is
    # taken against the mean of that pair, so load drift hits both sides alike.
    ours_n = SLOW_STEPS if args.quick else STEPS
    ours_runs: list[dict] = []

    def ours_rate() -> float | None:
        r = spawn("k2repro_sink", ours_n, timeout=900)
        ours_runs.append(r)
        return None if "skipped" in r else ours_n / r["seconds"]

    results: dict[str, dict] = {}
    load_start = list(os.getloadavg())
    for name, n in LOGGERS.items():
        if name == "k2repro_sink" or (args.only and name not in args.only):
            continue
        n = SLOW_STEPS if args.quick else n
        before = ours_rate()
        r = summarize(name, [spawn(name, n, timeout=900)], n)
        after = ours_rate()
        if "steps_per_s" in r and before and after:
            r["paired_ours_steps_per_s"] = (before + after) / 2
            r["ours_speedup"] = r["paired_ours_steps_per_s"] / r["steps_per_s"]
            print(f"{name}: {r['steps_per_s']:.0f} steps/s ({n} steps, {r['bytes'] / 1e6:.2f} MB); "
                  f"ours around it {before:.0f}/{after:.0f} steps/s", flush=True)
        else:
            print(f"{name}: {r.get('skipped', 'ours failed')}", flush=True)
        results[name] = r
    results = {"k2repro_sink": summarize("k2repro_sink", ours_runs or [spawn("k2repro_sink", ours_n, 900)],
                                         ours_n), **results}
    ours = results["k2repro_sink"].get("steps_per_s")
    speed = {k: v["ours_speedup"] for k, v in results.items() if "ours_speedup" in v}
    others = {k: v for k, v in speed.items() if k != "parquet_sync_per_flush"}
    mlflow = [speed[k] for k in ("mlflow_sqlite", "mlflow_file") if k in speed]
    goals = {
        "ours_vs_best_mlflow": min(mlflow) if mlflow else None,
        "ours_ge_100x_mlflow": bool(mlflow and min(mlflow) >= 100),
        "ours_vs_wandb_offline": speed.get("wandb_offline"),
        "ours_ge_10x_wandb_offline": (speed["wandb_offline"] >= 10) if "wandb_offline" in speed else None,
        "ours_fastest_of_all_measured": bool(ours and others and min(others.values()) > 1),
    }
    payload = {"loadavg_at_start": load_start, "loadavg_at_end": list(os.getloadavg()), "steps": STEPS,
               "slow_steps": SLOW_STEPS, "scalars_per_step": N_SCALARS, "flush_every": FLUSH_EVERY,
               "ratio_method": "ours_speedup = mean of the two runs of ours around the logger / the logger", "quick": args.quick, "results": results, "goals": goals,
               "command": "python bench/logger_throughput.py" + (" --quick" if args.quick else "")}
    if not args.only:
        write("logger", payload)
    print()
    print("| logger | steps run | steps/s | s for 20k steps | MB on disk | bytes/step | ours x (paired) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "steps_per_s" not in r:
            print(f"| {name} | skipped: {r['skipped']} | | | | | |")
            continue
        speedup = f"{r['ours_speedup']:.1f}" if "ours_speedup" in r else "(ours)"
        print(f"| {name} {r.get('version') or ''} | {r['steps']} | {r['steps_per_s']:,.0f} | "
              f"{r['seconds_for_20k']:.2f}{' (scaled)' if r['scaled'] else ''} | {r['bytes'] / 1e6:.2f} | "
              f"{r['bytes_per_step']:.0f} | {speedup} |")
    print(json.dumps(goals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
