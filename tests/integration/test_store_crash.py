"""Crash safety with real processes: SIGKILL a writer mid-run (between flushes, and inside a
segment write), then open the store: the run is `crashed`, every flushed step is there exactly
once, no torn rows, no temp file read. Also the staleness rule alone (another host)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pytest

from k2repro.audit.sink import AuditSink
from k2repro.audit.store import open_store

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from k2repro.audit.sink import AuditSink

    store, run_id, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    segments = [0]

    def hook(table, tmp):
        segments[0] += 1
        if mode == "kill_in_write" and table == "steps" and segments[0] > 12:
            print("dying in write", tmp, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    sink = AuditSink(store, run_id, flush_every=5, heartbeat_s=0.2, on_write=hook)
    sink.start({"name": "crashy"}, {"train": {"max_steps": 10**6}}, {"host": "x"}, [])
    step = 0
    while True:
        steps = list(range(step + 1, step + 6))
        sink.log_steps({"step": steps, "loss": [1.0 / s for s in steps], "batch_hash": ["h"] * 5})
        sink.log_samples({"step": [s for s in steps for _ in range(4)],
                          "sample_id": [s * 4 + i for s in steps for i in range(4)],
                          "loss": [0.5] * 20, "n_tokens": [8] * 20})
        step += 5
        sink.flush(wait=(step % 50 == 0))
        if step % 50 == 0:
            print(f"durable {step}", flush=True)
        time.sleep(0.001)
""")


def _spawn(store: Path, run_id: str, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(store), run_id, mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def _check_consistent(store: Path, run_id: str, at_least: int) -> int:
    with open_store(store) as st:
        assert st.run(run_id)["status"] == "crashed"
        n, distinct, lo, hi = st.execute(
            "SELECT count(*), count(DISTINCT step), min(step), max(step) FROM steps WHERE run_id = ?",
            [run_id]).fetchone()
        assert n == distinct == hi and lo == 1  # 1..hi, each exactly once
        assert hi >= at_least and hi % 5 == 0  # whole flushes only
        bad = st.execute("SELECT count(*) FROM steps WHERE run_id = ? AND (loss IS NULL OR loss <> 1.0 / step)",
                         [run_id]).fetchone()[0]
        assert bad == 0  # no torn rows
        ns, nd = st.execute("SELECT count(*), count(DISTINCT (step, sample_id)) FROM sample_stats "
                            "WHERE run_id = ?", [run_id]).fetchone()
        assert ns == nd and ns % 20 == 0
    return hi


def test_sigkill_between_flushes(tmp_path):
    proc = _spawn(tmp_path, "killed", "loop")
    durable = 0
    try:
        for line in proc.stdout:
            if line.startswith("durable"):
                durable = int(line.split()[1])
                if durable >= 150:
                    break
        with open_store(tmp_path) as st:  # still alive: running
            assert st.run("killed")["status"] == "running"
        os.kill(proc.pid, signal.SIGKILL)
        # killed but not yet reaped (a zombie) counts as gone: crashed within moments
        deadline = time.time() + 5
        while True:
            with open_store(tmp_path) as st:
                status = st.run("killed")["status"]
            if status == "crashed" or time.time() > deadline:
                break
            time.sleep(0.05)
        assert status == "crashed"
    finally:
        proc.kill()
        proc.wait()
    assert durable >= 150, proc.stderr.read()
    _check_consistent(tmp_path, "killed", durable)


def test_sigkill_inside_a_segment_write_leaves_only_a_temp_file(tmp_path):
    proc = _spawn(tmp_path, "torn", "kill_in_write")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    tmp_files = list((tmp_path / "torn" / "steps").glob(".*.tmp"))
    assert len(tmp_files) == 1 and "dying in write" in out
    hi = _check_consistent(tmp_path, "torn", 5)
    # the temp file (the next version of the open segment) held newer rows, none of them visible
    con = duckdb.connect()
    tmp_max = con.execute(f"SELECT max(step) FROM read_parquet('{tmp_files[0]}')").fetchone()[0]
    assert tmp_max > hi


def test_stale_heartbeat_of_another_host_means_crashed(tmp_path):
    proc = _spawn(tmp_path, "remote", "loop")
    try:
        for line in proc.stdout:
            if line.startswith("durable"):
                break
    finally:
        proc.kill()
        proc.wait()
    # Pretend the writer lived on another machine: no pid check is possible, only staleness.
    hb = tmp_path / "remote" / "_heartbeat" / "r0.json"
    hb.write_text(json.dumps({**json.loads(hb.read_text()), "host": "another-host"}))
    with open_store(tmp_path) as st:
        assert st.run("remote")["status"] == "running"  # fresh heartbeat, process unknowable
    old = time.time() - 60
    os.utime(hb, (old, old))
    with open_store(tmp_path) as st:
        assert st.run("remote")["status"] == "crashed"
    # the DuckDB database file (no pid check at all) applies the same staleness rule
    con = duckdb.connect(str(tmp_path / "k2repro.duckdb"), read_only=True,
                         config={"file_search_path": str(tmp_path)})
    assert con.execute("SELECT status FROM runs WHERE run_id = 'remote'").fetchone()[0] == "crashed"
    con.close()


@pytest.mark.parametrize("n_ranks", [2])
def test_rank_local_writers_never_collide(tmp_path, n_ranks):
    sinks = [AuditSink(tmp_path, "multi", rank=r, world_size=n_ranks) for r in range(n_ranks)]
    for s in sinks:
        s.start({"name": "m"}, {"a": 1}, {"host": f"h{s.rank}"}, [])
    for s in sinks:
        s.log_samples({"step": [1, 1], "sample_id": [s.rank * 2, s.rank * 2 + 1], "loss": [1.0, 2.0]})
        s.flush()
    for s in sinks[::-1]:
        s.close()
    with open_store(tmp_path) as st:
        assert st.execute("SELECT rank, count(*) FROM sample_stats GROUP BY rank ORDER BY rank").fetchall() \
            == [(0, 2), (1, 2)]
        assert st.execute("SELECT count(DISTINCT rank) FROM env").fetchone()[0] == 2
        assert st.run("multi")["status"] == "completed"
