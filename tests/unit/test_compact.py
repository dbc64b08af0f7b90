"""Compaction's pieces on real files: merged segments hold exactly the rows of the small ones
(per writer, in write order, floats bit for bit), large segments and other writers' files
stay, checkpoint folders inside the `checkpoints` table folder survive the swap as the same
files, a segment appended while the new folder is built is not lost, a segment in flight
makes the table wait, and segments of different schema versions are not merged together."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from k2repro.audit import compact as C
from k2repro.audit.schema import arrow_schema


def _seg(d: Path, name: str, steps: list[int], version: bytes | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    t = pa.table({"run_id": ["r"] * len(steps), "step": steps, "loss": [s / 3 for s in steps]})
    if version is not None:
        t = t.replace_schema_metadata({b"k2repro.schema_version": version})
    pq.write_table(t, d / name)
    return d / name


def _rows(d: Path) -> list:
    return sorted((r["step"], r["loss"]) for f in d.glob("*.parquet") for r in pq.read_table(f).to_pylist())


def test_merge_per_writer_keeps_rows_and_large_files(tmp_path) -> None:  # noqa: ANN001
    d = tmp_path / "run" / "steps"
    for i in range(5):
        _seg(d, f"r0-{i:08d}.parquet", [10 * i + k for k in range(3)])
        _seg(d, f"r1-{i:08d}.parquet", [1000 + i])
    big = _seg(d, "x-big.parquet", list(range(5000, 5100)))
    before = _rows(d)
    plan = C.plan_run(tmp_path / "run", small_bytes=big.stat().st_size)
    assert [(p["writer"], p["segments"]) for p in plan] == [("r0", 5), ("r1", 5)]
    out = C.compact_run(tmp_path / "run", small_bytes=big.stat().st_size)
    assert out["segments_before"] == 11 and out["segments_after"] == 3
    names = sorted(f.name for f in d.glob("*.parquet"))
    assert "x-big.parquet" in names and sum(n.startswith("r0-c") for n in names) == 1
    assert _rows(d) == before
    merged = pq.read_table(next(d.glob("r0-c*.parquet")))
    assert merged.column("step").to_pylist() == [10 * i + k for i in range(5) for k in range(3)]  # write order
    assert not list(d.parent.glob(".*"))


def test_a_killed_runs_full_disk_reserves_go(tmp_path) -> None:  # noqa: ANN001
    run = tmp_path / "run"
    _seg(run / "steps", "r0-00000000.parquet", [1, 2])
    for r in (0, 1):
        (run / f".reserve-r{r}").write_bytes(os.urandom(100))
    out = C.compact_run(run)
    assert out["reserves_removed"] == 2 and not list(run.glob(".reserve-*"))
    assert _rows(run / "steps") == [(1, 1 / 3), (2, 2 / 3)]


def test_checkpoint_folders_survive_the_swap(tmp_path) -> None:  # noqa: ANN001
    d = tmp_path / "run" / "checkpoints"
    for i in range(3):
        _seg(d, f"r0-{i:08d}.parquet", [i])
    ck = d / "step_00000002"
    ck.mkdir()
    (ck / "__0_0.distcp").write_bytes(os.urandom(1000))
    (ck / ".metadata").write_bytes(b"meta")
    inode = (ck / "__0_0.distcp").stat().st_ino
    data = (ck / "__0_0.distcp").read_bytes()
    C.compact_run(tmp_path / "run")
    assert (ck / "__0_0.distcp").read_bytes() == data and (ck / ".metadata").read_bytes() == b"meta"
    assert (ck / "__0_0.distcp").stat().st_ino == inode  # hard links: the same file, not a copy
    assert len(list(d.glob("*.parquet"))) == 1


def test_segment_appended_during_build_is_kept(tmp_path) -> None:  # noqa: ANN001
    d = tmp_path / "run" / "events"
    for i in range(3):
        _seg(d, f"x-{i:03d}.parquet", [i])

    def build(new: Path) -> list[str]:
        names = C._merge_into(new, d, C.SMALL_BYTES)
        _seg(d, "x-999-late.parquet", [999])  # another process appends meanwhile
        return names

    C.swap_table_dir(d, build)
    assert _rows(d) == [(s, s / 3) for s in (0, 1, 2, 999)]


def test_in_flight_segment_and_mixed_versions(tmp_path) -> None:  # noqa: ANN001
    d = tmp_path / "run" / "steps"
    for i in range(3):
        _seg(d, f"r0-{i:08d}.parquet", [i], b"1")
    (d / ".r0-00000003.parquet.tmp").write_bytes(b"partial")
    out = C.compact_run(tmp_path / "run")
    assert out["skipped_busy"] == ["steps"] and len(list(d.glob("*.parquet"))) == 3
    (d / ".r0-00000003.parquet.tmp").unlink()
    _seg(d, "r0-00000003.parquet", [3], b"0")  # an older segment: not merged with newer ones
    _seg(d, "r0-00000004.parquet", [4], b"0")
    C.compact_run(tmp_path / "run")
    versions = sorted((pq.read_schema(f).metadata or {}).get(b"k2repro.schema_version")
                      for f in d.glob("*.parquet"))
    assert versions == [b"0", b"1"] and len(_rows(d)) == 5


def test_offline_swap_and_explicit_schema_survive(tmp_path) -> None:  # noqa: ANN001
    from k2repro.audit.writer import to_arrow, write_segment

    d = tmp_path / "run" / "steps"
    for i in range(4):
        write_segment(d, f"r0-{i:08d}.parquet", to_arrow("steps", {"step": [i], "loss": [i / 7]}, "r"))
    C.compact_run(tmp_path / "run", offline=True)
    (f,) = d.glob("*.parquet")
    t = pq.read_table(f)
    assert t.schema.remove_metadata() == arrow_schema("steps").remove_metadata()
    assert t.column("loss").to_pylist() == [i / 7 for i in range(4)]
    assert C.exchange_supported(tmp_path)


def test_new_names_are_never_reused() -> None:
    names = {C.new_segment_name("r3-00000001.parquet") for _ in range(200)}
    assert len(names) == 200 and all(n.startswith("r3-c") and n.endswith(".parquet") for n in names)
