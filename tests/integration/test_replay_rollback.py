"""Replay and batch across a guard rollback (world size 1): the rollback's child run starts from
its parent's checkpoint with data positions deferred; `replay` finds that starting state
through the lineage and reproduces the child bit for bit, and `batch` recomputes the child's
ids with the deferral, as the trainer drew them."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import k2, tiny_overrides
from tests.integration.test_replay import run_id_of

BAD = 45


def test_replay_and_batch_of_a_rollback_child(packed_dir: Path, tmp_path: Path) -> None:
    import k2repro
    from k2repro.tools.batch import batch_lookup

    store = tmp_path / "store"
    r = k2("train", *tiny_overrides(packed_dir, store, **{
        "train.max_steps": 60, "audit.flush_every": 5, "ckpt.interval": 20,
        "faults.bad_batch_steps": [BAD], "guard.action": "rollback"}), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    parent = run_id_of(r)
    with k2repro.open_store(store) as s:
        runs = s.runs()
        child = runs[runs["parent_run_id"] == parent].iloc[0]["run_id"]
        assert int(s.run(child)["resumed_from_step"]) == 40
        deferred = s.hparams(child)["train.defer_positions"]
        assert deferred == [41, 42, 43, 44, 45]
        for step in (41, 50, 58):
            b = batch_lookup(s, child, step, text=False)
            assert b["deferred"] == deferred and b["agree"] is True and b["batch_hash_agrees"] is True, step
        assert batch_lookup(s, parent, 42, text=False)["deferred"] == []
        assert batch_lookup(s, parent, 42, text=False)["agree"] is True

    p = k2("replay", child, "--from-step", "41", "--to-step", "50", "--store", str(store), "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    assert rep["start_step"] == 40 and rep["checkpoint_run_id"] == parent  # the parent's checkpoint
    assert rep["bit_exact"] is True and rep["steps_compared"] == 10
