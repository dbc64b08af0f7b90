"""`make bench`: every benchmark (bench/*.py), one subprocess each, going on past failures, then
reports/bench/summary.md (bench/summary.py) and reports/bench/run_all.json (what ran, with
which arguments, how long, the load before and after, which JSON files it wrote).

    .venv/bin/python bench/run_all.py [--only NAME ...] [--defaults] [--timeout 600] [--out DIR]

`--out DIR` sends the benchmarks' JSON files and run_all.json there (K2REPRO_BENCH_OUT) instead
of reports/bench, leaving the committed per-benchmark results alone; the summary still goes to
reports/bench/summary.md (`--summary FILE`) and says where its JSON files are.

`make bench` must finish in under 20 minutes on 2 cores. Benchmarks whose defaults take longer
run with the smaller arguments in ARGS (the reason is written into the summary); `--defaults`
runs every script with its own defaults instead.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench import summary  # noqa: E402
from bench._common import REPO, machine  # noqa: E402

OUT = REPO / "reports" / "bench"

NOT_BENCHES = {"__init__", "_common", "run_all", "summary"}

# name -> (arguments, why they differ from the script's defaults)
ARGS: dict[str, tuple[list[str], str]] = {
    "trainer_overhead": (["--pairs", "3"], "3 ABBA pairs instead of 5 (200 steps each, as by default)"),
    "audit_overhead": (["--pairs", "2", "--steps", "100"],
                       "2 pairs x 100 steps instead of 5 x 200: each pair is three 2-rank torchrun launches"),
    "audit_api": (["--pairs", "3"], "3 ABBA pairs instead of 5 (200 steps each, as by default)"),
    "replay": (["--window-s", "20", "--pairs", "2"],
               "a 20 s training window instead of 66 s (start-up is amortised over fewer steps, which "
               "works against the replay's ratio)"),
}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"load average {loadavg()}"


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def mtimes(out: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in out.glob("*.json")} if out.is_dir() else {}


def run_one(name: str, args: list[str], timeout: float, out: Path) -> dict:
    before = mtimes(out)
    rec: dict = {"name": name, "args": args, "load_before": loadavg()}
    t = time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", K2REPRO_BENCH_OUT=str(out))
    proc = subprocess.Popen([sys.executable, str(HERE / f"{name}.py"), *args], cwd=HERE.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    tail: list[str] = []
    fired = threading.Event()

    def stop() -> None:
        fired.set()
        kill_group(proc.pid)

    timer = threading.Timer(timeout, stop)
    timer.start()
    assert proc.stdout is not None
    for line in proc.stdout:  # progress, as it comes
        print(f"  {name}: {line.rstrip()}", flush=True)
        tail = (tail + [line.rstrip()])[-20:]
    proc.wait()
    timer.cancel()
    timed_out = fired.is_set()
    kill_group(proc.pid)  # whatever it left behind (its own session)
    after = mtimes(out)
    rec.update(rc=proc.returncode, timed_out=timed_out, seconds=round(time.time() - t, 1), load_after=loadavg(),
               wrote=sorted(n for n, m in after.items() if before.get(n) != m and n != summary.RUN_ALL),
               tail=next((ln for ln in reversed(tail) if ln.strip()), "")[:300])
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="run only these benchmarks (script names without .py)")
    ap.add_argument("--defaults", action="store_true", help="every script with its own defaults")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per benchmark before it is stopped")
    ap.add_argument("--out", default=str(OUT), help="folder for the JSON files (default reports/bench)")
    ap.add_argument("--summary", default=str(OUT / "summary.md"), help="the summary page to write")
    a = ap.parse_args(argv)
    names = sorted(p.stem for p in HERE.glob("*.py") if p.stem not in NOT_BENCHES)
    if a.only:
        unknown = set(a.only) - set(names)
        if unknown:
            ap.error(f"unknown benchmark(s) {sorted(unknown)}; known: {', '.join(names)}")
        names = [n for n in names if n in a.only]
    if "logger_throughput" in names:  # fail before 20 minutes of benchmarks, not after
        chk = subprocess.run([sys.executable, str(HERE / "logger_throughput.py"), "--check-peers"], cwd=HERE.parent)
        if chk.returncode != 0:
            print("make bench: a peer logger is missing (see above): the logger comparison cannot be "
                  "reproduced; nothing was run", file=sys.stderr, flush=True)
            return 1
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
           "load_before": loadavg(), "uptime_before": uptime(), "benches": []}
    print(f"make bench: {len(names)} benchmarks: {', '.join(names)}\n{res['uptime_before']}", flush=True)
    for name in names:
        args, reason = ([], None) if a.defaults else ARGS.get(name, ([], None))
        print(f"== {name} {' '.join(args)}", flush=True)
        rec = run_one(name, args, a.timeout, out)
        if reason:
            rec["reason"] = reason
        res["benches"].append(rec)
        print(f"== {name}: exit {rec['rc']} in {rec['seconds']:.0f} s, wrote {rec['wrote'] or 'nothing'}", flush=True)
    res.update(wall_s=round(time.time() - t0, 1), load_after=loadavg(), uptime_after=uptime())
    res["command"] = "make bench" if argv is None and len(sys.argv) == 1 else \
        "python bench/run_all.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / summary.RUN_ALL).write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    summary.main(["--dir", str(out), "--out", a.summary])
    failed = [b["name"] for b in res["benches"] if b["rc"] != 0]
    print(f"make bench: {len(names) - len(failed)}/{len(names)} ran cleanly in {res['wall_s'] / 60:.1f} min"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
