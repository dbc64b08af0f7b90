"""Issue 24 #10: `k2repro sql` keeps DuckDB's temp folder private (the default `<cwd>/.tmp`
was readable through `read_text`), stops a query at `--timeout`, and answers a real SIGINT
with one line and exit 130 instead of a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import k2

LONG_QUERY = "SELECT sum(a.range * b.range) FROM range(1000000) a, range(1000000) b"


def test_the_cwd_temp_folder_is_not_readable(tmp_path: Path) -> None:
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "secret.txt").write_text("TOPSECRET-in-cwd-tmp")
    r = k2("sql", "SELECT content FROM read_text('.tmp/secret.txt')", "--store", str(tmp_path / "store"),
           cwd=tmp_path)
    assert r.returncode == 2 and "TOPSECRET" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_query_past_its_timeout_is_stopped(tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = k2("sql", LONG_QUERY, "--store", str(tmp_path / "store"), "--timeout", "1")
    assert r.returncode == 124, r.stderr
    assert "ran longer than 1 s" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 30


def test_sigint_stops_the_query_with_one_line_and_exit_130(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "k2repro", "sql", LONG_QUERY, "--store", str(tmp_path / "store")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(4)  # started and inside the query (it runs for minutes)
        assert p.poll() is None
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "interrupted (SIGINT)" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
