"""Seconds to import a 1,000,000-row metrics file into a fresh store with `k2repro import`
(parse with DuckDB's CSV reader and explicit types, validate, map, write the run's Parquet
segments, rename), for a generic CSV and a W&B-style export, against the baseline of DuckDB's
bare `read_csv` of the same file into Arrow (auto-detected types), measured in the same run
in ABBA order. Writes reports/bench/import.json. Goal: an import <= 3 s on 2 cores.

    .venv/bin/python bench/import.py [--rows 1000000] [--pairs 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import abba, write  # noqa: E402

GOAL_S = 3.0


def make_generic(path: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.csv as pc

    rng = np.random.default_rng(0)
    step = np.arange(1, n + 1)
    t = pa.table({
        "iteration": step, "lm loss": 2.0 + 4.0 * np.exp(-step / 5e4) + rng.normal(0, 0.01, n),
        "grad-norm": rng.gamma(2.0, 0.5, n), "learning-rate": np.full(n, 3e-4),
        "elapsed time per iteration (ms)": rng.normal(1200.0, 20.0, n),
        "tokens": np.full(n, 4_194_304), "loss-scale": np.full(n, 65536.0),
        "my/custom_metric": rng.random(n),
    })
    pc.write_csv(t, path)


def make_wandb(path: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.csv as pc

    rng = np.random.default_rng(1)
    step = np.arange(1, n + 1)
    cols: dict[str, np.ndarray] = {"Step": step}
    for metric, base in (("train/loss", 2.0 + 4.0 * np.exp(-step / 5e4)), ("grad_norm", rng.gamma(2.0, 0.5, n)),
                         ("learning-rate", np.full(n, 3e-4))):
        v = base + rng.normal(0, 0.001, n)
        cols[f"k2 - {metric}"] = v
        cols[f"k2 - {metric}__MIN"] = v
        cols[f"k2 - {metric}__MAX"] = v
    pc.write_csv(pa.table(cols), path)


CPU: dict[str, list[float]] = {}


def cpu_s() -> float:
    """CPU seconds of this process, every thread (DuckDB's too): unlike wall time, it hardly
    moves with the load other users put on the machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def duckdb_bare(path: Path) -> float:
    import duckdb

    c0, t0 = cpu_s(), time.perf_counter()
    con = duckdb.connect()
    tbl = con.sql("SELECT * FROM read_csv($p)", params={"p": str(path)}).to_arrow_table()
    dt = time.perf_counter() - t0
    CPU.setdefault(f"read_csv:{path.name}", []).append(cpu_s() - c0)
    assert tbl.num_rows > 0
    con.close()
    return dt


def k2_import(kind: str, path: Path, work: Path) -> float:
    from k2repro.cli.main import main

    store = Path(tempfile.mkdtemp(dir=work)) / "runs"
    c0, t0 = cpu_s(), time.perf_counter()
    rc = main(["import", kind, str(path), "--store", str(store), "--name", "bench", "--json"])
    dt = time.perf_counter() - t0
    CPU.setdefault(f"import:{path.name}", []).append(cpu_s() - c0)
    assert rc == 0, rc
    shutil.rmtree(store.parent)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--pairs", type=int, default=2)
    args = ap.parse_args()
    import contextlib
    import io

    work = Path(tempfile.mkdtemp(prefix="k2import-bench-"))
    results = {}
    load_before = [round(x, 2) for x in os.getloadavg()]
    try:
        for kind, maker in (("csv", make_generic), ("wandb-csv", make_wandb)):
            path = work / f"{kind}.csv"
            maker(path, args.rows)
            with contextlib.redirect_stdout(io.StringIO()):
                k2_import(kind, path, work)  # warm-up: imports, DuckDB/pyarrow initialisation
                CPU.clear()
                ours, base = abba(lambda kind=kind, path=path: k2_import(kind, path, work),
                                  lambda path=path: duckdb_bare(path), args.pairs)
            med, bmed = statistics.median(ours), statistics.median(base)
            results[kind] = {
                "rows": args.rows, "file_mb": round(path.stat().st_size / 2**20, 1),
                "import_s": [round(x, 3) for x in ours], "import_median_s": round(med, 3),
                "duckdb_read_csv_s": [round(x, 3) for x in base],
                "duckdb_read_csv_median_s": round(bmed, 3),
                "ratio_import_to_read_csv": round(med / bmed, 2),
                "rows_per_s": round(args.rows / med), "meets_goal": med <= GOAL_S,
                "import_cpu_s": [round(x, 3) for x in CPU[f"import:{path.name}"]],
                "duckdb_read_csv_cpu_s": [round(x, 3) for x in CPU[f"read_csv:{path.name}"]],
                "cpu_ratio_import_to_read_csv": round(
                    statistics.median(CPU[f"import:{path.name}"])
                    / statistics.median(CPU[f"read_csv:{path.name}"]), 2),
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write("import", {
        "what": "k2repro import (parse, validate, map, write Parquet, rename) of a 1M-row file "
                "into a fresh store vs DuckDB's bare read_csv of the same file into Arrow",
        "goal_s": GOAL_S, "pairs": args.pairs, "results": results,
        "load_average_1_5_15min": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]},
        "note": "the machine is shared: compare the ratios (both sides measured in ABBA pairs under "
                "the same load) and the CPU seconds (all threads), which hardly depend on the load; "
                "wall seconds grow with the load average",
        "command": "bench/import.py " + " ".join(sys.argv[1:]),
    })


if __name__ == "__main__":
    main()
