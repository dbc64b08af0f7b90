"""Issue 24 #6: a compaction killed (real SIGKILL) at any point between its renames never
hides a table. The swap is journaled before its first rename; the next open of the store (any
query) or the next gc finishes or rolls it back, so queries return every row, verify-store
passes, and a rerun of gc compacts what is left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from k2repro.audit import compact as C
from k2repro.audit import sink as sink_mod
from k2repro.audit.sink import AuditSink
from k2repro.audit.swaps import pending_swaps
from tests.conftest import k2

COUNT = "SELECT (SELECT count(*) FROM layer_stats) AS n, (SELECT sum(step) FROM layer_stats) AS s"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A finished run with 4 small layer_stats segments (compaction merges them)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(sink_mod, "ROLL_FLUSHES", 1)
    try:
        root = tmp_path_factory.mktemp("tpl") / "store"
        sink = AuditSink(root, "run-c")
        sink.start({"name": "c", "world_size": 1}, {"a": 1}, {"host": "h"}, [])
        for f in range(4):
            sink.log_layer_stats({"step": np.repeat(np.arange(5) + 5 * f, 4), "param": [f"p{j}" for j in range(4)] * 5,
                                  "grad_norm": np.arange(20, dtype=float)})
            sink.flush(wait=True)
        sink.close()
    finally:
        mp.undo()
    return root


def _copy(template: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(template, dst)
    return dst


def _query(store: Path) -> dict:
    r = k2("sql", COUNT, "--store", str(store), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]


def _kill_at(store: Path, point: str, offline: bool) -> None:
    """Start a real `k2repro gc --compact`, wait until it reports the fault point, SIGKILL it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **{C.FAULT_ENV: f"{point}:60"})
    args = [sys.executable, "-m", "k2repro", "gc", "--compact", "--store", str(store)] + (["--offline"] if offline else [])
    p = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        line = p.stderr.readline()
        assert f"swap fault point {point} reached" in line, line + p.stderr.read()
        p.send_signal(signal.SIGKILL)
        assert p.wait(timeout=30) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize(("point", "offline"), [("renamed-old", True), ("journaled", True),
                                                 ("exchanged", False)])
def test_a_killed_compaction_is_finished_or_rolled_back(template: Path, tmp_path: Path, point: str,
                                                        offline: bool) -> None:
    store = _copy(template, tmp_path / "store")
    before = {"n": 80, "s": 4 * sum(range(20))}
    _kill_at(store, point, offline)
    run = store / "run-c"
    journals = pending_swaps(store)
    assert journals, "the swap left no journal"
    table = json.loads(journals[0].read_text())["table"]
    if point == "renamed-old":  # the moment the issue found: the table folder is gone
        assert not (run / table).exists() and list(run.glob(f".{table}.old-*"))
    assert _query(store) == before  # the open finished or rolled back the swap first
    assert not pending_swaps(store)
    assert (run / table).is_dir() and not list(run.glob(f".{table}.*"))
    if point == "renamed-old":  # and a rerun of gc compacts what is left
        r = k2("gc", "--compact", "--store", str(store), "--json")
        assert r.returncode == 0, r.stderr
        assert _query(store) == before
        assert len(list((run / "layer_stats").glob("*.parquet"))) == 1
    v = k2("verify-store", "--store", str(store), "--json")
    assert v.returncode == 0, v.stdout + v.stderr


def test_gc_restores_a_table_hidden_by_an_older_interrupted_compaction(template: Path, tmp_path: Path) -> None:
    """A store left by a k2repro without the journal: verify-store names the hidden folder
    and gc puts it back."""
    store = _copy(template, tmp_path / "store")
    before = _query(store)
    run = store / "run-c"
    os.rename(run / "layer_stats", run / ".layer_stats.old-1234abcd")
    v = k2("verify-store", "--store", str(store))
    assert v.returncode == 1 and ".layer_stats.old-1234abcd" in v.stderr
    r = k2("gc", "--compact", "--store", str(store))
    assert r.returncode == 0, r.stderr
    assert _query(store) == before
