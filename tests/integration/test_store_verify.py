"""`k2repro verify-store` finds what queries do not: a flipped byte inside a data page (DuckDB
returns the changed value without a word; the page checksum names the file) and a deleted
segment (a hole in the rank's segment numbers). Real files, the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from k2repro.audit import sink as sink_mod
from k2repro.audit.sink import AuditSink
from tests.conftest import k2

SUM = "SELECT sum(grad_norm) AS s FROM layer_stats"


@pytest.fixture()
def store(tmp_path: Path, monkeypatch) -> Path:  # noqa: ANN001
    monkeypatch.setattr(sink_mod, "ROLL_FLUSHES", 2)  # a new segment every 2 flushes
    root = tmp_path / "store"
    sink = AuditSink(root, "run-v")
    sink.start({"name": "v", "world_size": 1}, {"a": 1}, {"host": "h"}, [])
    rng = np.random.default_rng(0)
    for f in range(6):  # random doubles: snappy stores them as literals, so a flip decodes fine
        sink.log_layer_stats({"step": np.repeat(np.arange(10) + 10 * f, 30), "param": [f"p{j}" for j in range(30)] * 10,
                              "grad_norm": rng.random(300)})
        sink.flush(wait=True)
    sink.close()
    return root


def _verify(store: Path) -> tuple[int, dict, str]:
    r = k2("verify-store", "--store", str(store), "--json")
    return r.returncode, json.loads(r.stdout), r.stderr


def test_an_intact_store_verifies(store: Path) -> None:
    rc, out, _ = _verify(store)
    assert rc == 0 and out["ok"] and out["runs"][0]["segments"] == 8
    assert out["runs"][0]["problems"] == [] and out["runs"][0]["unchecked"] == []


def test_a_flipped_byte_that_sql_misses_is_named(store: Path) -> None:
    before = json.loads(k2("sql", SUM, "--store", str(store), "--json").stdout)[0]["s"]
    seg = sorted((store / "run-v" / "layer_stats").glob("*.parquet"))[1]
    col = pq.ParquetFile(seg).metadata.row_group(0).column(3)
    assert col.path_in_schema == "grad_norm"
    data = bytearray(seg.read_bytes())
    data[col.data_page_offset + col.total_compressed_size // 2] ^= 0x40
    seg.write_bytes(bytes(data))
    after = k2("sql", SUM, "--store", str(store), "--json")
    assert after.returncode == 0, after.stderr  # the gap this command closes: a silent change
    assert json.loads(after.stdout)[0]["s"] != before
    rc, out, err = _verify(store)
    assert rc == 1 and not out["ok"]
    problems = out["runs"][0]["problems"]
    assert len(problems) == 1 and seg.name in problems[0] and "CRC" in problems[0]
    assert len(err.strip().splitlines()) == 1 and seg.name in err


def test_a_deleted_segment_is_named(store: Path) -> None:
    segs = sorted((store / "run-v" / "layer_stats").glob("*.parquet"))
    segs[0].unlink()
    rc, out, err = _verify(store)
    assert rc == 1
    assert out["runs"][0]["problems"] == [
        f"rank 0: segment {segs[0].name} is missing (its numbers run to 7 with this one absent)"]
    text = k2("verify-store", "--store", str(store))
    assert text.returncode == 1 and f"segment {segs[0].name} is missing" in text.stdout


def test_a_deleted_newest_segment_is_named_and_a_killed_rank_is_not_claimed(store: Path) -> None:
    """close() records the rank's last segment number in its heartbeat file, so deleting the
    newest segment (here the end marker) is found; without that record (a rank killed before
    close) verify-store says what it could not check instead of calling it fine."""
    newest = max((store / "run-v").glob("*/r0-*.parquet"), key=lambda p: p.name)
    assert newest.parent.name == "run_end"
    newest.unlink()
    rc, out, _ = _verify(store)
    assert rc == 1 and out["runs"][0]["problems"] == [
        f"rank 0: segment {newest.name} is missing (its numbers run to 7 with this one absent)"]
    hb = store / "run-v" / "_heartbeat" / "r0.json"
    hb.write_text(json.dumps({k: v for k, v in json.loads(hb.read_text()).items() if k != "last_seq"}))
    rc, out, _ = _verify(store)
    assert rc == 0 and out["runs"][0]["unchecked"] and "newest segment" in out["runs"][0]["unchecked"][0]


def test_bad_input_exits_2(store: Path, tmp_path: Path) -> None:
    for args in (["--store", str(tmp_path / "nothing")], ["--store", str(store), "--run", "no-such-run"]):
        r = k2("verify-store", *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
