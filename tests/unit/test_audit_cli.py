"""`k2repro sql` / `k2repro runs`: allow-list by statement type, output formats, the sandbox,
and no torch import."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest

from k2repro.audit.readonly import check_read_only
from k2repro.audit.sink import AuditSink
from k2repro.errors import BadInputError


def k2(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "K2REPRO_STORE"}
    return subprocess.run([sys.executable, "-m", "k2repro", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env=dict(env, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "store"
    sink = AuditSink(root, "cli-run")
    sink.start({"name": "demo", "config_hash": "c0ffee"}, {"optim": {"lr": 0.5}}, {"host": "h"}, [])
    sink.log_steps({"step": [1, 2, 3], "loss": [3.0, float("nan"), 1.0], "batch_hash": ["a,b", "x", "y"]})
    sink.close()
    return root


@pytest.mark.parametrize("query, kind", [
    ("INSERT INTO steps VALUES (1)", "INSERT"),
    ("COPY (SELECT 1) TO 'out.csv'", "COPY"),
    ("ATTACH 'other.db'", "ATTACH"),
    ("CREATE TABLE t AS SELECT 1", "CREATE"),
    ("SET threads = 1", "SET"),
    ("INSTALL httpfs", "LOAD"),
    ("DROP VIEW steps", "DROP"),
    ("SELECT 1; DELETE FROM steps", "2: SELECT, DELETE"),
    ("EXPLAIN ANALYZE INSERT INTO t VALUES (1)", "INSERT"),
    ("PRAGMA enable_profiling", "PRAGMA enable_profiling"),
])
def test_refused_statements_name_their_type(query, kind):
    with pytest.raises(BadInputError, match=kind):
        check_read_only(query)


@pytest.mark.parametrize("query", [
    "SELECT 1", "WITH a AS (SELECT 1 AS x) SELECT * FROM a", "VALUES (1), (2)", "FROM steps",
    "DESCRIBE steps", "SHOW TABLES", "SUMMARIZE steps", "EXPLAIN SELECT * FROM steps",
    "PRAGMA table_info('steps')", "SELECT 1;",
])
def test_allowed_statements(query):
    check_read_only(query)


def test_cli_refuses_with_exit_2(store):
    for query, kind in [("INSERT INTO steps VALUES (1)", "INSERT"), ("SELECT 1; SELECT 2", "2: SELECT, SELECT")]:
        res = k2("sql", query, "--store", str(store))
        assert res.returncode == 2 and kind in res.stderr
        assert res.stderr.count("\n") == 1 and res.stdout == ""


def test_cli_formats_and_params(store):
    res = k2("sql", "SELECT step, loss, batch_hash FROM steps WHERE step >= ? ORDER BY step", "--param", "1",
             "--store", str(store), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == [{"step": 1, "loss": 3.0, "batch_hash": "a,b"},
                                      {"step": 2, "loss": "NaN", "batch_hash": "x"},
                                      {"step": 3, "loss": 1.0, "batch_hash": "y"}]
    res = k2("sql", "SELECT step, batch_hash FROM steps ORDER BY step", "--store", str(store), "--csv")
    assert list(csv.reader(io.StringIO(res.stdout))) == [["step", "batch_hash"], ["1", "a,b"], ["2", "x"],
                                                         ["3", "y"]]
    res = k2("sql", "SELECT step, loss FROM steps ORDER BY step", "--store", str(store))
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["step", "loss"] and lines[2].split() == ["1", "3.0"] and lines[-1] == "(3 rows)"
    res = k2("runs", "--store", str(store), "--json")
    rows = json.loads(res.stdout)
    assert [(r["run_id"], r["status"], r["last_step"], r["config_hash"]) for r in rows] == [
        ("cli-run", "completed", 3, "c0ffee")]
    res = k2("runs", "--store", str(store))
    assert "cli-run" in res.stdout and "completed" in res.stdout


def test_empty_and_missing_store_answer_zero_rows(tmp_path):
    for root in (tmp_path / "missing", tmp_path):
        res = k2("sql", "SELECT * FROM steps", "--store", str(root), "--json")
        assert res.returncode == 0 and json.loads(res.stdout) == []
    res = k2("runs", "--store", str(tmp_path), "--json")
    assert res.returncode == 0 and json.loads(res.stdout) == []
    # `runs` on a store that does not exist is bad input, not "no runs yet" (issue 23 item 12)
    res = k2("runs", "--store", str(tmp_path / "missing"), "--json")
    assert res.returncode == 2 and res.stdout == "" and "no store at" in res.stderr
    res = k2("runs", cwd=tmp_path)  # default store: ./runs (missing here)
    assert res.returncode == 2 and "no store at runs" in res.stderr
    assert not (tmp_path / "runs").exists()


def test_sandbox_blocks_files_outside_the_store(store, tmp_path):
    outside = tmp_path / "outside.csv"
    outside.write_text("a\n1\n")
    res = k2("sql", f"SELECT * FROM read_csv('{outside}')", "--store", str(store))
    assert res.returncode == 2 and "disabled by configuration" in res.stderr
    res = k2("sql", "SELECT current_setting('enable_external_access') AS v", "--store", str(store), "--json")
    assert json.loads(res.stdout) == [{"v": False}]


@pytest.mark.parametrize("argv", [["sql", "SELECT count(*) FROM runs"], ["runs"]])
def test_query_commands_do_not_import_torch(store, argv):
    code = ("import sys; from k2repro.cli.main import main; rc = main(sys.argv[1:]); "
            "bad = [m for m in ('torch', 'pandas', 'pyarrow') if m in sys.modules]; "
            "print('IMPORTED', bad); sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code, *argv, "--store", str(store)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "IMPORTED []" in res.stdout
