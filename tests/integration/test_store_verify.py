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
        f"layer_stats/{segs[0].name}: missing (its checksum is recorded, the file is gone)"]
    text = k2("verify-store", "--store", str(store))
    assert text.returncode == 1 and f"layer_stats/{segs[0].name}: missing" in text.stdout


def test_a_deleted_newest_segment_is_named_and_a_killed_rank_is_not_claimed(store: Path) -> None:
    """close() records the rank's last segment number in its heartbeat file, so deleting the
    newest segment (here the end marker) is found; without that record (a rank killed before
    close) verify-store says what it could not check instead of calling it fine."""
    newest = max((store / "run-v").glob("*/r0-*.parquet"), key=lambda p: p.name)
    assert newest.parent.name == "run_end"
    data = newest.read_bytes()
    newest.unlink()
    rc, out, _ = _verify(store)
    assert rc == 1 and out["runs"][0]["problems"] == [
        f"run_end/{newest.name}: missing (its checksum is recorded, the file is gone)"]
    hb = store / "run-v" / "_heartbeat" / "r0.json"
    hb.write_text(json.dumps({k: v for k, v in json.loads(hb.read_text()).items() if k != "last_seq"}))
    rc, out, _ = _verify(store)  # without the heartbeat's count the manifest still names it
    assert rc == 1 and out["runs"][0]["problems"] == [
        f"run_end/{newest.name}: missing (its checksum is recorded, the file is gone)"]
    # a writer killed between recording and renaming leaves its temp file: in flight, not damage
    (newest.parent / f".{newest.name}.tmp").write_bytes(data)
    rc, out, _ = _verify(store)
    assert rc == 0, out
    assert any("newest segment" in u for u in out["runs"][0]["unchecked"])
    assert any("not renamed into place" in u for u in out["runs"][0]["unchecked"])


def test_every_byte_is_checked_against_the_recorded_checksum(store: Path) -> None:
    """Issue 24 #13: a flip in the footer's key-value metadata (no page CRC covers it), a
    truncated segment, a copied-in segment and a folder in place of a segment are all named."""
    run = store / "run-v"
    segs = sorted((run / "layer_stats").glob("*.parquet"))
    data = bytearray(segs[1].read_bytes())
    pos = bytes(data).rindex(b"k2repro.schema_version") + 2  # inside the footer's metadata key
    data[pos] ^= 0x01
    segs[1].write_bytes(bytes(data))
    segs[2].write_bytes(segs[2].read_bytes()[:-100])
    (run / "layer_stats" / "r0-00000099.parquet").write_bytes(segs[0].read_bytes())
    hp = next((run / "hparams").glob("*.parquet"))
    hp.unlink()
    hp.mkdir()
    rc, out, err = _verify(store)
    assert rc == 1
    probs = "\n".join(out["runs"][0]["problems"])
    assert f"layer_stats/{segs[1].name}: " in probs and "differs from the recorded checksum" in probs
    assert f"layer_stats/{segs[2].name}: " in probs
    assert "layer_stats/r0-00000099.parquet: no checksum recorded" in probs
    assert f"hparams/{hp.name}: not a segment file (a folder)" in probs
    assert len(err.strip().splitlines()) == 1


def test_a_store_without_manifests_still_verifies_and_says_so(store: Path) -> None:
    """Runs written before segment checksums existed: not failed, not claimed as checked."""
    import shutil

    shutil.rmtree(store / "run-v" / "_manifest")
    rc, out, _ = _verify(store)
    assert rc == 0 and out["ok"]
    assert out["runs"][0]["unchecked"] == [
        "no checksums recorded for 8 segment(s) (written before k2repro recorded segment checksums)"]


def test_bad_input_exits_2(store: Path, tmp_path: Path) -> None:
    for args in (["--store", str(tmp_path / "nothing")], ["--store", str(store), "--run", "no-such-run"]):
        r = k2("verify-store", *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_checkpoints_inside_the_store_are_checked(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """Issue 24 #13: the checkpoints a run keeps in its folder are store bytes too. A flipped
    byte in one passed verify-store (only a resume or verify-checkpoint found it); and a
    checkpoint whose manifest was rewritten to match the change disagrees with the sha256 the
    `checkpoints` table recorded."""
    import hashlib
    import shutil

    from tests.integration.bundle_fixture import real_bundle

    ex = real_bundle(tmp_path_factory)  # a real 2-rank run with checkpoints 4, 8, 12
    root = tmp_path / "store"
    shutil.copytree(ex["store"], root)
    rid = ex["rid"]
    ok = k2("verify-store", "--store", str(root), "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["runs"][0]["checkpoints"] == 3, ok.stdout + ok.stderr
    ck = root / rid / "checkpoints" / "step_00000008"
    f = sorted(ck.glob("*.distcp"))[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    bad = k2("verify-store", "--store", str(root))
    assert bad.returncode == 1 and f"step_00000008/{f.name} is corrupt" in bad.stderr, bad.stdout + bad.stderr
    manifest = json.loads((ck / "manifest.json").read_text())  # the forger also rewrites the manifest
    manifest["files"][f.name]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (ck / "manifest.json").write_text(json.dumps(manifest))
    forged = k2("verify-store", "--store", str(root))
    assert forged.returncode == 1 and "step_00000008/manifest.json: sha256 differs" in forged.stderr, forged.stderr
