"""A damaged segment is named, not a traceback: `k2repro sql`/`runs` exit 2 with the file."""

from __future__ import annotations

from pathlib import Path

from k2repro.audit.sink import AuditSink
from tests.conftest import k2


def test_truncated_segment_is_named(tmp_path: Path) -> None:
    store = tmp_path / "store"
    sink = AuditSink(store, "r1")
    sink.start({"name": "x", "world_size": 1}, {"a": 1}, {"host": "h"}, [])
    sink.log_steps({"step": [1, 2], "loss": [1.0, 2.0]})
    sink.close("completed")
    seg = next(store.glob("r1/steps/*.parquet"))
    data = seg.read_bytes()
    seg.write_bytes(data[: len(data) // 2])
    for args in (["sql", "SELECT count(*) FROM steps"], ["runs"]):
        r = k2(*args, "--store", str(store))
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and seg.name in lines[0] and "Traceback" not in r.stderr
