"""The detection rule of importers/stitch.py on parsed runs (no store): which names share a
stem, and how runs are placed by their steps."""

from __future__ import annotations

import pyarrow as pa
import pytest

from k2repro.errors import BadInputError
from k2repro.importers.parsed import ImportedRun
from k2repro.importers.stitch import plan, related, stem


@pytest.mark.parametrize(("name", "want"), [
    ("OLMo-7B-run-002", "olmo-7b"), ("OLMo-7B-run-038", "olmo-7b"), ("65b restart", "65b"),
    ("65b-restart-2", "65b"), ("llama_resumed", "llama"), ("job (3)", "job"), ("seg_12", ""),
    ("gpt-x-002-restart", "gpt-x"), ("k2-stage1", "k2-stage1"), ("llama-7b", "llama-7b"),
])
def test_stem(name, want):
    assert stem(name) == want


def test_related():
    assert related("65b", "65b-spike-branch") and related("olmo-7b", "olmo-7b")
    assert not related("65b", "65bx") and not related("k2-stage1", "k2-stage2") and not related("", "a")


def run(label: str, steps: list[int]) -> ImportedRun:
    return ImportedRun("wandb-csv", "x.csv", "0" * 64, source_run=label, steps=pa.array(steps, pa.int64()))


def test_placement_forks_and_continuations():
    runs = [run("m", [10, 20, 30, 40, 50, 60]), run("m-restart", [35, 45, 55, 65]),
            run("m-restart-2", [50, 60, 70]), run("m-3", [80, 90]), run("other", [25, 35])]
    got = [(lk.child, lk.parent, lk.resumed_from_step, lk.relation) for lk in plan(runs)]
    # m-restart forks m at 30; m-restart-2 starts inside both and forks the later-started one
    # (m-restart, at 45); m-3 starts after all ended: continues the one that ended last
    assert got == [(1, 0, 30, "fork"), (2, 1, 45, "fork"), (3, 2, 70, "continuation")]
    assert plan(runs, "none") == []
    forced = [(lk.child, lk.parent, lk.resumed_from_step) for lk in plan(runs, "stitch")]
    assert (4, 0, 20) in forced and len(forced) == 4


def test_same_first_step_left_apart_or_refused():
    runs = [run("a-1", [1, 2, 3]), run("a-2", [1, 2])]
    assert plan(runs) == []
    with pytest.raises(BadInputError, match="all start at step 1"):
        plan(runs, "stitch")
