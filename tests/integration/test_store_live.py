"""Live reads and concurrent writers, with real processes: `k2repro sql` while a run writes,
two runs writing into one store at once, and the store's DuckDB file for plain DuckDB users."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time

import duckdb

from k2repro.audit.store import open_store

WRITER = textwrap.dedent("""
    import sys, time
    from k2repro.audit.sink import AuditSink

    store, run_id, n_steps, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    sink = AuditSink(store, run_id, flush_every=10, heartbeat_s=0.5)
    sink.start({"name": run_id}, {"train": {"max_steps": n_steps}}, {"host": "x"}, [])
    for s0 in range(1, n_steps + 1, 10):
        steps = list(range(s0, s0 + 10))
        sink.log_steps({"step": steps, "loss": [float(s) for s in steps]})
        sink.log_layer_stats({"step": [s for s in steps for _ in range(3)],
                              "param": ["a", "b", "c"] * 10, "grad_norm": [1.0] * 30})
        sink.flush()
        time.sleep(pause)
    sink.close()
    print("done", flush=True)
""")


def _writer(store, run_id, n_steps, pause):
    return subprocess.Popen([sys.executable, "-c", WRITER, str(store), run_id, str(n_steps), str(pause)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def _k2_sql(store, query, *extra):
    return subprocess.run([sys.executable, "-m", "k2repro", "sql", query, "--store", str(store), "--json",
                           *extra], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_queries_while_a_run_writes_never_fail_and_never_go_back(tmp_path):
    import json

    proc = _writer(tmp_path, "live", 400, 0.05)  # ~2 s of writing
    seen: list[int] = []
    cli_calls = 0
    try:
        with open_store(tmp_path) as st:
            while proc.poll() is None:
                hi, n, d = st.execute("SELECT coalesce(max(step), 0), count(*), count(DISTINCT step) "
                                      "FROM steps").fetchone()
                assert n == d == hi  # never a duplicate or a gap, whatever moment we read
                seen.append(hi)
                if cli_calls < 4:  # and through the real CLI in another process
                    res = _k2_sql(tmp_path, "SELECT coalesce(max(step), 0) AS m FROM steps")
                    assert res.returncode == 0, res.stderr
                    seen.append(json.loads(res.stdout)[0]["m"])
                    cli_calls += 1
                time.sleep(0.02)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert cli_calls >= 1 and len(seen) >= 5
    assert seen == sorted(seen)  # max(step) never decreases
    assert 0 < len(set(seen))
    res = _k2_sql(tmp_path, "SELECT max(step) AS m, count(*) AS n FROM steps")
    assert json.loads(res.stdout) == [{"m": 400, "n": 400}]


def test_two_runs_write_into_one_store_at_once(tmp_path):
    procs = [_writer(tmp_path, f"run{i}", 300, 0.005) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with open_store(tmp_path) as st:
        assert st.execute("SELECT run_id, count(*), count(DISTINCT step), max(step) FROM steps "
                          "GROUP BY run_id ORDER BY run_id").fetchall() == [("run0", 300, 300, 300),
                                                                            ("run1", 300, 300, 300)]
        assert st.execute("SELECT run_id, count(*) FROM layer_stats GROUP BY run_id ORDER BY run_id"
                          ).fetchall() == [("run0", 900), ("run1", 900)]
        assert st.execute("SELECT run_id, status FROM runs ORDER BY run_id").fetchall() == [
            ("run0", "completed"), ("run1", "completed")]


def test_duckdb_database_file_sees_the_same_tables(tmp_path):
    p = _writer(tmp_path / "store", "r1", 50, 0.0)
    assert p.wait(timeout=60) == 0
    db = tmp_path / "store" / "k2repro.duckdb"
    assert db.exists()
    with open_store(tmp_path / "store") as st:
        want = {t: st.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in st.tables()}
        want_cols = st.execute("SELECT table_name, column_name, data_type FROM information_schema.columns "
                               "ORDER BY ALL").fetchall()
    # plain duckdb.connect, read-only, relative globs resolved through file_search_path
    con = duckdb.connect(str(db), read_only=True, config={"file_search_path": str(tmp_path / "store")})
    got = {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in want}
    got_cols = con.execute("SELECT table_name, column_name, data_type FROM information_schema.columns "
                           "WHERE table_name <> 'k2repro_meta' ORDER BY ALL").fetchall()
    assert got == want and want["steps"] == 50 and want["runs"] == 1
    assert got_cols == want_cols
    assert con.execute("SELECT status FROM runs").fetchone()[0] == "completed"
    con.close()
    # from inside the store folder, no setting is needed
    res = subprocess.run([sys.executable, "-c", "import duckdb; c = duckdb.connect('k2repro.duckdb', "
                          "read_only=True); print(c.execute('SELECT count(*) FROM steps').fetchone()[0])"],
                         cwd=tmp_path / "store", capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "50", res.stderr
    cli = shutil.which("duckdb")
    if cli:  # the duckdb CLI, where installed
        res = subprocess.run([cli, "-readonly", "-csv", "k2repro.duckdb", "SELECT count(*) FROM steps"],
                             cwd=tmp_path / "store", capture_output=True, text=True, timeout=60)
        assert res.stdout.strip().splitlines()[-1] == "50", res.stderr
