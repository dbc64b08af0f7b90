"""Schema versions: a store whose runs were written by an older version is read right and
upgraded by `k2repro gc --migrate` (markers and segments restamped, results unchanged); a
migration that changes a column's meaning is refused for reading until it ran, then applied
segment by segment; a newer store is refused with a clear message (queries, writers, gc)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from k2repro.audit import schema as S
from k2repro.audit.migrate import migrate_store
from k2repro.audit.versions import (
    META_KEY,
    Migration,
    NeedsMigration,
    SchemaTooNew,
    check_store,
)
from tests.conftest import k2

Q = "SELECT run_id, step, loss, grad_norm FROM steps ORDER BY run_id, step"


def _store(root: Path) -> Path:
    from k2repro.audit.writer import append_table, write_run_tables

    for rid in ("a", "b"):
        write_run_tables(root, rid, {"runs": {"name": [rid]},
                                     "steps": {"step": [1, 2], "loss": [2.5, 2.25], "grad_norm": [1.0, 0.5]}})
        append_table(root, rid, "steps", {"step": [3], "loss": [2.0], "grad_norm": [0.25]})
    return root


def _fake_version(run_dir: Path, version: int | None) -> None:
    """Rewrite a run folder as if an older (or newer) k2repro wrote it."""
    marker = json.loads((run_dir / "_run.json").read_text())
    if version is None:
        marker.pop("schema_version")
    else:
        marker["schema_version"] = version
    (run_dir / "_run.json").write_text(json.dumps(marker))
    for seg in run_dir.glob("*/*.parquet"):
        t = pq.read_table(seg)
        meta = dict(t.schema.metadata or {})
        if version is None:
            meta.pop(META_KEY, None)
        else:
            meta[META_KEY] = str(version).encode()
        pq.write_table(t.replace_schema_metadata(meta), seg)


def _seg_versions(root: Path) -> set:
    return {(pq.read_schema(f).metadata or {}).get(META_KEY) for f in root.glob("*/*/*.parquet")
            if f.parent.parent.name != "_k2repro"}


def test_older_store_is_read_right_then_upgraded(tmp_path) -> None:  # noqa: ANN001
    from k2repro.audit.store import open_store

    root = _store(tmp_path / "s")
    with open_store(root) as s:
        before = s.execute(Q).fetchall()
    _fake_version(root / "a", None)  # version 0: written before versions were recorded
    _fake_version(root / "b", 0)
    (root / "_k2repro/schema/VERSION").write_text("0 oldhash\n")
    assert sorted(check_store(root)) == [0]
    with open_store(root) as s:  # read-compatible: read as is, same answers
        assert s.execute(Q).fetchall() == before
    dry = json.loads(k2("gc", "--store", str(root), "--migrate", "--dry-run", "--json").stdout)
    assert sorted(Path(p["run_dir"]).name for p in dry["plan"]) == ["a", "b"]
    assert _seg_versions(root) == {None, b"0"}  # the dry run changed nothing
    r = k2("gc", "--store", str(root), "--migrate", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["migrated"]) == 2
    for rid in ("a", "b"):
        marker = json.loads((root / rid / "_run.json").read_text())
        assert marker["schema_version"] == S.SCHEMA_VERSION and marker["migrated_from"] == 0
    assert _seg_versions(root) == {str(S.SCHEMA_VERSION).encode()}
    assert (root / "_k2repro/schema/VERSION").read_text().split()[0] == str(S.SCHEMA_VERSION)
    with open_store(root) as s:
        assert s.execute(Q).fetchall() == before
    again = json.loads(k2("gc", "--store", str(root), "--migrate", "--json").stdout)
    assert again["plan"] == [] and again["migrated"] == []


def _halve_loss(table: str, t: pa.Table) -> pa.Table:
    """A step that changes a column's meaning: 'loss' used to be stored summed over 2 ranks."""
    if table != "steps":
        return t
    i = t.schema.get_field_index("loss")
    return t.set_column(i, t.schema.field(i), pc.divide(t.column("loss"), 2.0))


def test_meaning_change_is_refused_until_migrated(tmp_path) -> None:  # noqa: ANN001
    from k2repro.audit.store import open_store

    root = _store(tmp_path / "s")
    with open_store(root) as s:
        before = s.execute(Q).fetchall()
    one = S.SCHEMA_VERSION
    migs = {one: Migration(one, "loss was the sum over 2 ranks", read_compatible=False, transform=_halve_loss)}
    with pytest.raises(NeedsMigration, match="gc --migrate"):
        check_store(root, migs, current=one + 1)
    out = migrate_store(root, migrations=migs, target=one + 1)
    assert [m["segments"] for m in out["migrated"]] == [4, 4]  # runs, 2 x steps, run_end
    assert sorted(check_store(root, migs, current=one + 1)) == [one + 1]
    assert _seg_versions(root) == {str(one + 1).encode()}
    with open_store(root, check_version=False) as s:
        after = s.execute(Q).fetchall()
    assert [(r, st, loss * 2, g) for r, st, loss, g in after] == before
    # run again: every segment already carries the new version, nothing is halved twice
    assert migrate_store(root, migrations=migs, target=one + 1)["plan"] == []
    with open_store(root, check_version=False) as s:
        assert s.execute(Q).fetchall() == after


def test_newer_store_is_refused_everywhere(tmp_path) -> None:  # noqa: ANN001
    from k2repro.audit.sink import AuditSink
    from k2repro.audit.store import open_store

    root = _store(tmp_path / "s")
    _fake_version(root / "b", S.SCHEMA_VERSION + 1)
    with pytest.raises(SchemaTooNew, match="newer than this k2repro"):
        open_store(root)
    r = k2("sql", "--store", str(root), "SELECT count(*) FROM steps")
    assert r.returncode == 2 and "upgrade k2repro" in r.stderr and r.stderr.count("\n") == 1
    r = k2("gc", "--store", str(root), "--migrate")
    assert r.returncode == 2 and "newer" in r.stderr
    r = k2("gc", "--store", str(root), "--run", "a")
    assert r.returncode == 2 and (root / "a").is_dir()
    # a newer store stamp: writers refuse too, and the stamp is left as it is
    root2 = _store(tmp_path / "s2")
    stamp = f"{S.SCHEMA_VERSION + 1} futurehash\n"
    (root2 / "_k2repro/schema/VERSION").write_text(stamp)
    with pytest.raises(SchemaTooNew):
        open_store(root2)
    sink = AuditSink(root2, "c")
    with pytest.raises(Exception, match="newer k2repro"):
        sink.start({"name": "c"}, {}, {}, [])
    assert (root2 / "_k2repro/schema/VERSION").read_text() == stamp
    assert not (root2 / "c").exists()
