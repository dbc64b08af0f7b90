"""core/: the facts every layer shares, computed once (issue 19)."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from k2repro.core.atomic import atomic_dir, atomic_write_text
from k2repro.core.hashing import canonical_hash
from k2repro.core.ids import check_run_id, name_prefix, new_run_id
from k2repro.core.layout import step_dirname, step_of_dirname
from k2repro.errors import BadInputError


@pytest.mark.parametrize("name, prefix", [("_ablation", "ablation"), ("my run/1", "my-run-1"), ("", "run"),
                                          ("___", "run"), ("a" * 60, "a" * 40), ("k2-65b_v2", "k2-65b_v2")])
def test_every_run_name_gives_a_valid_run_id(name: str, prefix: str) -> None:
    rid = new_run_id(name, now=datetime(2026, 12, 4, 16, 0, tzinfo=timezone.utc))
    assert check_run_id(rid) == rid
    assert name_prefix(name) == prefix
    assert re.fullmatch(re.escape(prefix) + r"-20261204-160000-[0-9a-f]{8}", rid)


def test_run_ids_without_a_name_keep_the_bare_time_form() -> None:
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{8}", new_run_id())


def test_the_trainer_and_the_audit_api_name_runs_by_one_rule() -> None:
    from k2repro.audit.api import _resolve_run_id

    assert _resolve_run_id(None, "_ablation", 1).startswith("ablation-")
    with pytest.raises(BadInputError, match="invalid run id"):
        check_run_id("_ablation-1")


def test_the_config_hash_is_the_canonical_json_hash_of_before() -> None:
    # stored hashes are compared by replay, diff and bundles: the form must never change
    import hashlib

    obj = {"b": [1, 2.5], "a": {"x": None, "p": Path("p")}}
    old = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert canonical_hash(obj) == old


def test_checkpoint_folder_names_round_trip() -> None:
    assert step_dirname(200) == "step_00000200"
    assert step_of_dirname(step_dirname(1234567)) == 1234567
    assert step_of_dirname("step_x") is None and step_of_dirname("rank0.pt") is None


def test_an_atomic_dir_that_fails_leaves_the_old_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as d:
        (d / "f").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out) as d:
        (d / "f").write_text("half")
        raise RuntimeError("killed")
    assert (out / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder left behind
    atomic_write_text(tmp_path / "a" / "b.txt", "x")
    assert (tmp_path / "a" / "b.txt").read_text() == "x"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.txt"]


def test_an_atomic_dir_that_must_not_replace_refuses_an_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with atomic_dir(out, replace=False, tmp_prefix=".k2tmp-run-") as d:
        (d / "a").write_text("1")
    with pytest.raises(FileExistsError), atomic_dir(out, replace=False):
        pass
    with pytest.raises(FileExistsError), atomic_dir(tmp_path / "late", replace=False) as d:
        (tmp_path / "late").mkdir()  # another writer finished first
    assert (out / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late", "run"]
