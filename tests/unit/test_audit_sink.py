"""AuditSink in-process: rows written and read back, lifecycle, back-pressure, writer failure,
whole-run writes."""

from __future__ import annotations

import json
import os
import time

import pyarrow as pa
import pytest

from k2repro.audit import sink as sink_mod
from k2repro.audit.hparams import hparam_rows, parse_hparam
from k2repro.audit.sink import AuditSink, AuditWriteError
from k2repro.audit.store import open_store
from k2repro.audit.writer import append_table, write_run_tables
from k2repro.errors import BadInputError

HP = {"optim": {"lr": 0.003, "eps": 1e-08, "clip_grad": 1.0}, "train": {"max_steps": 20,
      "skip_steps": [3, 4], "resume": "", "deterministic": True}, "run": {"tags": {}}, "x": None}


def _start(sink, **run):
    sink.start({"name": "t", "config_hash": "h", **run}, HP, {"host": "h1", "cpu.count": "2"},
               [{"artifact": "packed", "path": "d/train.bin", "sha256": "ab" * 32, "n_tokens": 10}])


def test_sink_writes_and_reads_back(tmp_path):
    sink = AuditSink(tmp_path, "run-a", flush_every=5, heartbeat_s=0.2)
    _start(sink)
    for s0 in (1, 6, 11):
        steps = list(range(s0, s0 + 5))
        sink.log_steps({"step": steps, "loss": [1.0 / s for s in steps], "lr": [0.1] * 5,
                        "skipped": [False] * 5, "batch_hash": [f"h{s}" for s in steps]})
        sink.log_layer_stats({"step": [s0, s0], "param": ["w", "b"], "grad_norm": [3.0, 4.0]})
        sink.log_samples({"step": [s0] * 2, "sample_id": [10 * s0, 10 * s0 + 1], "loss": [0.5, 1.5],
                          "n_tokens": [7, 9]})
        sink.log_metrics({"step": [s0], "name": ["custom/x"], "value": [0.25]})
        sink.log_event("spike", step=s0, severity="warning", detail={"z": 3.5})
        sink.flush()
    sink.log_checkpoint({"step": 15, "path": "ck/15", "bytes": 100, "save_s": 0.5})
    sink.flush(wait=True)
    with open_store(tmp_path) as st:
        assert st.run("run-a")["status"] == "running"
    sink.close()
    with open_store(tmp_path) as st:
        run = st.run("run-a")
        assert run["status"] == "completed" and run["ended_at"] is not None and run["name"] == "t"
        df = st.steps("run-a")
        assert df["step"].tolist() == list(range(1, 16))
        assert df["loss"].tolist() == [1.0 / s for s in range(1, 16)]
        assert df["grad_norm"].isna().all()
        assert st.execute("SELECT count(*) FROM layer_stats").fetchone()[0] == 6
        samples = st.sample_stats("run-a")
        assert len(samples) == 6 and set(samples["rank"]) == {0}
        assert st.checkpoints("run-a")["path"].tolist() == ["ck/15"]
        kinds = st.events("run-a")["kind"].tolist()
        assert kinds[0] == "start" and kinds.count("spike") == 3 and kinds[-1] == "end"
        assert st.hparams("run-a") == {"optim.lr": 0.003, "optim.eps": 1e-08, "optim.clip_grad": 1.0,
                                       "train.max_steps": 20, "train.skip_steps": [3, 4], "train.resume": "",
                                       "train.deterministic": True, "run.tags": {}, "x": None}
        assert st.env("run-a") == {"host": "h1", "cpu.count": "2"}
        assert st.execute("SELECT n_tokens FROM data_manifest").fetchone()[0] == 10
        assert st.execute("SELECT value FROM metrics").fetchall() == [(0.25,)] * 3
        assert st.resolve_run_id("run") == "run-a" and st.resolve_run_id("t") == "run-a"
        with pytest.raises(BadInputError):
            st.steps("nope")
    # no temp file left behind, segments named by rank
    files = [p.name for p in (tmp_path / "run-a").rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith(".tmp")]
    assert all(f.startswith("r0-") for f in files if f.endswith(".parquet"))


def test_hparams_exact_round_trip():
    rows = hparam_rows({"a": {"f": 0.1 + 0.2, "tiny": 5e-324, "big": 2**62, "s": "0.1"}})
    back = {k: parse_hparam(v, t) for k, v, t in zip(rows["key"], rows["value"], rows["value_type"],
                                                    strict=True)}
    assert back == {"a.f": 0.1 + 0.2, "a.tiny": 5e-324, "a.big": 2**62, "a.s": "0.1"}
    assert rows["value_type"] == ["float", "float", "int", "str"]


def test_unknown_column_fails_at_the_call(tmp_path):
    sink = AuditSink(tmp_path, "run-b")
    _start(sink)
    with pytest.raises(ValueError, match="unknown column"):
        sink.log_steps({"step": [1], "losss": [1.0]})
    with pytest.raises(ValueError, match="differ in length"):
        sink.log_steps({"step": [1, 2], "loss": [1.0]})
    sink.close()


def test_failed_run_records_traceback(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with AuditSink(tmp_path, "run-c") as sink:
            _start(sink)
            sink.log_steps({"step": [1], "loss": [2.0]})
            sink.flush()
            _ = 1 / 0
    with open_store(tmp_path) as st:
        run = st.run("run-c")
        assert run["status"] == "failed" and "ZeroDivisionError" in run["error"]
        detail = st.events("run-c", kind="error")["detail"].iloc[0]
        assert "Traceback" in json.loads(detail)["error"]
        assert st.steps("run-c")["step"].tolist() == [1]


def test_duplicate_run_id_is_refused(tmp_path):
    sink = AuditSink(tmp_path, "run-d")
    _start(sink)
    sink.close()
    with pytest.raises(BadInputError, match="already exists"):
        _start(AuditSink(tmp_path, "run-d"))


def test_backpressure_blocks_then_records_a_warning(tmp_path):
    def slow(table, path):
        time.sleep(0.05)

    sink = AuditSink(tmp_path, "run-e", queue_size=1, on_write=slow)
    _start(sink)
    t0 = time.perf_counter()
    for s in range(1, 9):
        sink.log_steps({"step": [s], "loss": [1.0]})
        sink.flush()
    assert time.perf_counter() - t0 < 5
    sink.close()
    assert sink.backpressure_s > 0
    with open_store(tmp_path) as st:
        assert st.steps("run-e")["step"].tolist() == list(range(1, 9))
        assert len(st.events("run-e", kind="audit_backpressure")) >= 1
        assert st.run("run-e")["status"] == "completed"


def test_merged_flushes_keep_numpy_and_list_columns_exact(tmp_path):
    """A writer that falls behind merges queued flushes: numpy columns (what the trainer hands
    over) and plain lists, a column some flushes lack, all land exactly, in order."""
    import threading

    import numpy as np

    hold = threading.Event()
    hold.set()

    def slow(table, path):  # the writer waits here until the test has queued more flushes
        hold.wait(10)

    sink = AuditSink(tmp_path, "run-m", on_write=slow)
    _start(sink)
    hold.clear()
    merged = []
    real_merge = sink._merge
    sink._merge = lambda items: merged.append(len(items)) or real_merge(items)

    def flush(step, ids, loss, n_tokens=None, as_numpy=True):
        cols = {"step": [step] * len(ids), "sample_id": ids, "loss": loss}
        if n_tokens is not None:
            cols["n_tokens"] = n_tokens
        sink.log_samples({k: np.array(v) for k, v in cols.items()} if as_numpy else cols)
        sink.flush()

    # each group: the first flush keeps the (slow) writer busy while the next two queue up
    flush(1, [1], [0.5])
    flush(2, [2, 3], [1.5, 2.5])
    flush(3, [4], [3.5])
    hold.set()
    sink.flush(wait=True)
    hold.clear()
    flush(4, [5], [4.5], as_numpy=False)
    flush(5, [6], [5.5], n_tokens=[64], as_numpy=False)
    flush(6, [7, 8], [6.5, 7.5])
    hold.set()
    sink.close()
    assert sum(merged) >= 6 and max(merged) >= 2, merged
    with open_store(tmp_path) as st:
        df = st.sql("SELECT step, sample_id, loss, n_tokens FROM sample_stats WHERE run_id = 'run-m' "
                    "ORDER BY sample_id")
    assert df["sample_id"].tolist() == list(range(1, 9))
    assert df["step"].tolist() == [1, 2, 2, 3, 4, 5, 6, 6]
    assert df["loss"].tolist() == [0.5 + i for i in range(8)]
    assert df["n_tokens"].isna().tolist() == [True] * 5 + [False] + [True] * 2
    assert df["n_tokens"].tolist()[5] == 64


def test_writer_failure_surfaces_instead_of_blocking(tmp_path):
    def boom(table, path):
        if table == "steps":
            raise OSError(28, "No space left on device")

    sink = AuditSink(tmp_path, "run-f", queue_size=2, on_write=boom)
    _start(sink)
    sink.log_steps({"step": [1], "loss": [1.0]})
    with pytest.raises(AuditWriteError, match="No space left"):
        sink.flush(wait=True)
    with pytest.raises(AuditWriteError):
        sink.log_steps({"step": [2], "loss": [1.0]})
    with pytest.raises(AuditWriteError):
        sink.close()
    with open_store(tmp_path) as st:
        run = st.run("run-f")
        assert run["status"] == "failed" and "audit writer failed" in run["error"]


def _du(root) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


@pytest.mark.parametrize("headroom_kb", [4, 64])
def test_a_full_disk_still_leaves_room_for_the_end_marker(tmp_path, headroom_kb):
    """A disk quota over the store (every byte counts, the reserve file too): the writer dies of
    ENOSPC mid-run, and the run still reads `failed` with the reason, because deleting the
    reserve makes room for the end marker. Without the reserve the marker did not fit and
    the run read `crashed` (found by scripts/fault_campaign.py on a 6 MB tmpfs)."""
    import errno

    quota = {"bytes": None}

    def disk(table, tmp):  # called with the finished temp file, before its rename
        if quota["bytes"] is not None and _du(tmp_path) > quota["bytes"]:
            tmp.unlink()
            raise OSError(errno.ENOSPC, "No space left on device")

    sink = AuditSink(tmp_path, "run-d", on_write=disk)
    _start(sink)
    assert (sink.run_dir / ".reserve-r0").stat().st_size == sink_mod.RESERVE_BYTES
    quota["bytes"] = _du(tmp_path) + headroom_kb * 1024  # the disk fills a few flushes in
    with pytest.raises(AuditWriteError, match="No space left"):
        for s0 in range(0, 100_000, 50):
            sink.log_layer_stats({"step": [s0 + i for i in range(50) for _ in range(40)],
                                  "param": [f"layers.{j}.w" for _ in range(50) for j in range(40)],
                                  "grad_norm": [float(s0 + i) for i in range(2000)]})
            sink.flush(wait=True)
    quota["bytes"] = _du(tmp_path)  # and the disk stays full: not a byte free (without the reserve)
    with pytest.raises(AuditWriteError):
        sink.close("failed", "Traceback: OSError: [Errno 28] No space left on device")
    assert not (sink.run_dir / ".reserve-r0").exists()
    assert _du(tmp_path) <= quota["bytes"], "the end marker fitted in the reserve's room"
    with open_store(tmp_path) as st:
        run = st.run("run-d")
        assert run["status"] == "failed"
        assert "No space left" in run["error"]
        layer = st.sql("SELECT step, count(*) c FROM layer_stats WHERE run_id = 'run-d' GROUP BY step")
    assert (layer["c"] == 40).all(), "flushed rows intact"


def test_write_run_tables_is_atomic_and_complete(tmp_path):
    tables = {
        "runs": pa.table({"name": ["imported"], "source": ["import:csv"]}),
        "steps": pa.table({"step": pa.array([1, 2, 3], pa.int64()), "loss": [3.0, 2.0, 1.0]}),
        "hparams": {"key": ["optim.lr"], "value": ["0.1"], "value_type": ["float"]},
    }
    path = write_run_tables(tmp_path, "imp-1", tables)
    assert path == tmp_path / "imp-1" and (path / "_run.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".k2tmp")]
    with open_store(tmp_path) as st:
        assert st.run("imp-1")["status"] == "completed"
        assert st.steps("imp-1")["loss"].tolist() == [3.0, 2.0, 1.0]
    with pytest.raises(BadInputError, match="already exists"):
        write_run_tables(tmp_path, "imp-1", tables)
    with pytest.raises(ValueError, match="unknown audit table"):
        write_run_tables(tmp_path, "imp-2", {**tables, "stepz": {}})
    assert not (tmp_path / "imp-2").exists()
    # a staging folder (dot name) is invisible to queries, even with complete segments in it
    stage = tmp_path / ".k2tmp-imp-3-x" / "steps"
    stage.mkdir(parents=True)
    os.link(next((tmp_path / "imp-1" / "steps").iterdir()), stage / "r0-00000000.parquet")
    with open_store(tmp_path) as st:
        assert st.execute("SELECT count(*) FROM steps").fetchone()[0] == 3
    # append a segment from another folder of the same store (a forensics stage)
    append_table(tmp_path / "forensics", "imp-1", "spikes",
                 {"onset_step": [2], "peak_step": [2], "end_step": [3], "class": ["transient"]})
    with open_store(tmp_path) as st:
        assert st.execute("SELECT run_id, class FROM spikes").fetchall() == [("imp-1", "transient")]


def test_open_segment_rolls_over(tmp_path, monkeypatch):
    import k2repro.audit.sink as sink_mod

    monkeypatch.setattr(sink_mod, "ROLL_FLUSHES", 3)
    sink = AuditSink(tmp_path, "run-g")
    _start(sink)
    for s in range(1, 11):
        sink.log_steps({"step": [s], "loss": [float(s)]})
        sink.flush(wait=True)  # one write per flush
    sink.close()
    files = sorted(p.name for p in (tmp_path / "run-g" / "steps").glob("*.parquet"))
    assert len(files) == 4  # 3 + 3 + 3 + 1 writes
    with open_store(tmp_path) as st:
        assert st.steps("run-g")["step"].tolist() == list(range(1, 11))

