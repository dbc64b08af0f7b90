"""`k2repro gc`: `--dry-run` lists exactly what the real call then removes (run folders at any
depth, folders other stages appended to, checkpoints under `ckpt.dir`), a running run is never
removed or compacted, selection by id, name pattern and age; `--compact` under a reader
process that queries in a loop: no errors and identical results, checkpoint folders kept."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.conftest import REPO, k2

OLD = datetime.now(timezone.utc) - timedelta(days=10)


def _finished(store: Path, rid: str, name: str, ended: datetime, config: dict | None = None) -> None:
    from k2repro.audit.writer import write_run_tables

    write_run_tables(store, rid, {
        "runs": {"name": [name], "started_at": [ended - timedelta(hours=1)],
                 "config_json": [json.dumps(config or {})]},
        "steps": {"step": [1, 2], "loss": [3.0, 2.5]},
        "run_end": {"rank": [0], "status": ["completed"], "ended_at": [ended]},
    })


@pytest.fixture()
def store(tmp_path) -> Path:
    from k2repro.audit.writer import append_table

    s = tmp_path / "store"
    ck = tmp_path / "ckpts"
    _finished(s, "old-a", "exp-a", OLD)
    _finished(s, "old-b", "exp-b", OLD, config={"ckpt": {"dir": str(ck)}})
    (ck / "old-b" / "checkpoints" / "step_00000002").mkdir(parents=True)
    (ck / "old-b" / "checkpoints" / "step_00000002" / "manifest.json").write_text('{"run_id": "old-b"}')
    _finished(s / "deep" / "er", "new-c", "exp-c", datetime.now(timezone.utc))
    _finished(s, "keep-d", "other", OLD)
    append_table(s / "forensics", "old-a", "spikes", {"onset_step": [2]})  # another stage's folder
    return s


def _json(*args: str) -> dict:
    r = k2(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_dry_run_lists_exactly_what_gc_removes(store, tmp_path) -> None:  # noqa: ANN001
    from k2repro.audit import start

    live = start(store, name="exp-live", run_id="live-e", heartbeat_s=0.5)  # running: never removed
    try:
        dry = _json("gc", "--store", str(store), "--name", "exp-*", "--dry-run")
        assert sorted(r["run_id"] for r in dry["remove"]) == ["new-c", "old-a", "old-b"]
        assert [k["run_id"] for k in dry["kept"]] == ["live-e"] and dry["kept"][0]["reason"] == "running"
        paths = sorted(dry["paths"])
        assert str(store / "forensics" / "old-a") in paths and str(tmp_path / "ckpts" / "old-b") in paths
        assert str(store / "deep" / "er" / "new-c") in paths
        assert all(Path(p).exists() for p in paths)  # nothing removed yet
        real = _json("gc", "--store", str(store), "--name", "exp-*")
        assert sorted(real["paths"]) == paths and real["removed_run_ids"] == [r["run_id"] for r in dry["remove"]]
        assert not any(Path(p).exists() for p in paths)
        assert (store / "live-e").is_dir() and (store / "keep-d").is_dir()
        assert not list(store.rglob(".k2gc-*"))
        left = _json("sql", "--store", str(store), "SELECT run_id FROM runs ORDER BY 1")
        assert [r["run_id"] for r in left] == ["keep-d", "live-e"]
    finally:
        live.close()


def test_selection_by_age_id_and_refusals(store) -> None:  # noqa: ANN001
    dry = _json("gc", "--store", str(store), "--older-than", "7d", "--dry-run")
    assert sorted(r["run_id"] for r in dry["remove"]) == ["keep-d", "old-a", "old-b"]
    both = _json("gc", "--store", str(store), "--older-than", "7d", "--name", "exp-*", "--dry-run")
    assert sorted(r["run_id"] for r in both["remove"]) == ["old-a", "old-b"]
    by_id = _json("gc", "--store", str(store), "--run", "keep-d", "new-c")
    assert sorted(by_id["removed_run_ids"]) == ["keep-d", "new-c"]
    assert not (store / "keep-d").exists()
    r = k2("gc", "--store", str(store))
    assert r.returncode == 2 and "--run ID, --name PATTERN or --older-than" in r.stderr
    r = k2("gc", "--store", str(store), "--older-than", "7 days")
    assert r.returncode == 2 and "--older-than" in r.stderr
    r = k2("gc", "--store", str(store), "--run", "no-such-run")
    assert r.returncode == 2 and "no-such-run" in r.stderr


READER = r"""
import json, sys, time
from pathlib import Path
from k2repro.audit.store import open_store
store, stop, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
# Exact answers only: a float sum depends on the order rows are added in, which the number of
# files (and DuckDB's threads) change, while the values stay the same; lists compare bit for bit.
QUERIES = [
    "SELECT run_id, count(*), list(loss ORDER BY step), sum(step), max(loss) FROM steps GROUP BY 1 ORDER BY 1",
    "SELECT run_id, step, loss FROM steps ORDER BY run_id, step",
    "SELECT run_id, kind, count(*) FROM events GROUP BY ALL ORDER BY ALL",
    "SELECT run_id, status FROM runs ORDER BY 1",
    "SELECT count(*), sum(step) FROM checkpoints",
]
with open_store(store) as s:
    want = [s.execute(q).fetchall() for q in QUERIES]
    Path(str(out) + ".ready").write_text("1")
    n = errors = wrong = 0
    msgs = []
    while not stop.exists():
        for q, w in zip(QUERIES, want):
            n += 1
            try:
                if s.execute(q).fetchall() != w:
                    wrong += 1
                    msgs.append("wrong: " + q)
            except Exception as exc:
                errors += 1
                msgs.append(str(exc)[:200])
    out.write_text(json.dumps({"queries": n, "errors": errors, "wrong": wrong, "msgs": msgs[:3],
                               "retries": s.retries}))
"""


def test_compaction_under_concurrent_queries(tmp_path) -> None:  # noqa: ANN001
    from k2repro.audit import start
    from k2repro.audit.writer import append_table

    store = tmp_path / "store"
    for i in range(8):
        rid = f"run-{i}"
        _finished(store, rid, f"r{i}", OLD)
        for j in range(12):
            append_table(store, rid, "steps", {"step": [10 + j], "loss": [j / 3 + i]})
            append_table(store, rid, "events", {"time": [OLD], "rank": [0], "kind": ["k"], "severity": ["info"]})
        ckdir = store / rid / "checkpoints" / "step_00000002"  # the trainer keeps checkpoints here too
        ckdir.mkdir(parents=True)
        (ckdir / "manifest.json").write_text(json.dumps({"run": rid}))
        for j in range(3):
            append_table(store, rid, "checkpoints", {"step": [j + 1], "path": [str(ckdir)]})
    live = start(store, name="live", run_id="live-run", heartbeat_s=0.5, flush_every=1)
    live.log_step(1, loss=1.0)
    live.flush(wait=True)
    live.log_step(2, loss=1.5)
    live.flush(wait=True)
    live_files = sorted(p.name for p in (store / "live-run" / "steps").iterdir())
    (tmp_path / "reader.py").write_text(READER)
    out, stop = tmp_path / "reader.json", tmp_path / "stop"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "reader.py"), str(store), str(stop), str(out)],
                            cwd=REPO)
    try:
        deadline = time.time() + 60
        while not Path(str(out) + ".ready").exists():
            assert proc.poll() is None and time.time() < deadline, "reader did not start"
            time.sleep(0.05)
        dry = _json("gc", "--store", str(store), "--compact", "--dry-run")
        assert {r["run_id"] for r in dry["runs"]} == {f"run-{i}" for i in range(8)}
        res = _json("gc", "--store", str(store), "--compact")
        time.sleep(0.3)
    finally:
        stop.write_text("1")
        proc.wait(timeout=60)
        live.close()
    got = json.loads(out.read_text())
    print("reader:", got)
    assert got["errors"] == 0 and got["wrong"] == 0, got
    assert got["queries"] >= 20, got
    assert [k["run_id"] for k in res["kept"]] == ["live-run"]
    assert res["segments_merged"] == dry["segments_merged"] == 8 * (12 + 12 + 3)
    for i in range(8):
        run = store / f"run-{i}"
        assert len(list((run / "steps").glob("*.parquet"))) == 2  # r0 (first write) + one merged x
        assert len(list((run / "events").glob("*.parquet"))) == 1
        assert len(list((run / "checkpoints").glob("*.parquet"))) == 1
        assert json.loads((run / "checkpoints" / "step_00000002" / "manifest.json").read_text()) == {"run": f"run-{i}"}
        assert not list(run.glob(".*swap*"))
    assert sorted(p.name for p in (store / "live-run" / "steps").iterdir()) == live_files
    again = _json("gc", "--store", str(store), "--compact")
    assert again["runs"] == []
