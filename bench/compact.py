"""Compaction: query time over a store of many small segments against the same store after
`gc --compact`, measured in the same run (ABBA pairs over two copies), plus the compaction's
own wall time.

    .venv/bin/python bench/compact.py [--runs 20] [--segments 150] [--rows 40] [--pairs 10]

The store imitates long runs whose eval/forensics appends and rolling segments left many
small files: each run gets `--segments` appended `steps` segments of `--rows` rows. Output:
reports/bench/compact.json (medians with 95% bootstrap intervals, ratio baseline/compacted).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import abba, bootstrap_ci, write  # noqa: E402

QUERY = "SELECT run_id, count(*), max(loss), min(step) FROM steps GROUP BY 1 ORDER BY 1"


def build(root: Path, runs: int, segments: int, rows: int) -> int:
    from k2repro.audit.storemeta import ensure_store
    from k2repro.audit.writer import to_arrow, write_run_tables, write_segment

    ensure_store(root)
    files = 0
    for r in range(runs):
        rid = f"bench-{r:03d}"
        write_run_tables(root, rid, {"runs": {"name": [rid]}})
        for s in range(segments):
            steps = list(range(s * rows + 1, (s + 1) * rows + 1))
            tbl = to_arrow("steps", {"step": steps, "loss": [10.0 / st for st in steps]}, rid)
            write_segment(root / rid / "steps", f"x-{s:08d}.parquet", tbl)
            files += 1
    return files


def timed_query(root: Path) -> float:
    from k2repro.audit.store import open_store

    with open_store(root) as s:
        t0 = time.perf_counter()
        s.execute(QUERY).fetchall()
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--segments", type=int, default=150)
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--pairs", type=int, default=10)
    a = ap.parse_args()
    from k2repro.audit.store import open_store
    from k2repro.tools.gc import compact

    with tempfile.TemporaryDirectory(prefix="k2repro-bench-compact-") as tmp:
        small, big = Path(tmp) / "small", Path(tmp) / "compacted"
        t0 = time.perf_counter()
        files = build(small, a.runs, a.segments, a.rows)
        build_s = time.perf_counter() - t0
        shutil.copytree(small, big)
        t0 = time.perf_counter()
        rep = compact(big)
        compact_s = time.perf_counter() - t0
        with open_store(small) as s1, open_store(big) as s2:
            same = s1.execute(QUERY).fetchall() == s2.execute(QUERY).fetchall()
        timed_query(small), timed_query(big)  # warm the page cache for both
        base, comp = abba(lambda: timed_query(small), lambda: timed_query(big), a.pairs)
    mb, mc = statistics.median(base), statistics.median(comp)
    write("compact", {
        "what": "query over many small segments (baseline) vs the same store after gc --compact",
        "query": QUERY, "runs": a.runs, "segments_per_run": a.segments, "rows_per_segment": a.rows,
        "files_before": files, "segments_merged": rep["segments_merged"], "build_s": round(build_s, 2),
        "compact_s": round(compact_s, 3), "identical_answers": same,
        "baseline_query_s": {"median": mb, "ci95": bootstrap_ci(base)},
        "compacted_query_s": {"median": mc, "ci95": bootstrap_ci(comp)},
        "ratio_baseline_over_compacted": round(mb / mc, 2), "pairs": a.pairs,
    })


if __name__ == "__main__":
    main()
