"""audit/runrow.py: one builder of the `runs` row for the trainer, the audit API and importers."""

from __future__ import annotations

import pytest

from k2repro.audit import schema as S
from k2repro.audit.runrow import RUN_COLUMNS, end_row, git_fields, runs_row


@pytest.mark.parametrize("dirty, want", [("true", True), ("True", True), ("false", False), ("False", False),
                                         ("absent", None), (None, None)])
def test_git_dirty_reads_the_same_whoever_wrote_the_fact(dirty: str | None, want: bool | None) -> None:
    facts = {"git.commit": "abc", **({"git.dirty": dirty} if dirty is not None else {})}
    assert git_fields(facts) == {"git_commit": "abc", "git_dirty": want}
    assert git_fields({"git.commit": "absent"})["git_commit"] is None


def test_a_live_row_and_an_import_row_have_every_column() -> None:
    live = runs_row({"name": "n", "config_hash": "h"}, store_path="s", world_size=2,
                    facts={"git.commit": "c", "git.dirty": "true"})
    imported = runs_row({"name": "n", "source": "import:wandb", "argv": ["k2repro", "import"]},
                        store_path="s", live=False)
    cols = [c.name for c in S.TABLES["runs"] if c.name != "run_id"]
    assert list(live) == list(imported) == cols == list(RUN_COLUMNS)
    assert live["git_dirty"] is True and live["pid"] and live["launcher"] and live["world_size"] == 2
    assert imported["pid"] is None and imported["host"] is None and imported["argv"] == '["k2repro", "import"]'
    assert live["schema_version"] == imported["schema_version"] == S.SCHEMA_VERSION
    with pytest.raises(ValueError, match="unknown column"):
        runs_row({"nmae": "typo"}, store_path="s")


def test_the_end_marker_is_one_row_per_rank() -> None:
    row = end_row(1, "failed", "boom")
    assert {k: v[0] for k, v in row.items() if k in ("rank", "status", "error")} == {
        "rank": 1, "status": "failed", "error": "boom"}
    assert set(row) == {c.name for c in S.TABLES["run_end"]} - {"run_id"}
