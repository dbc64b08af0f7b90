"""Lineage (resume/rollback/replay chains stitched into one logical run) and hparams holding
every leaf of the resolved config."""

from __future__ import annotations

import pytest

from k2repro.audit.hparams import hparam_rows, parse_hparam
from k2repro.audit.sink import AuditSink
from k2repro.audit.store import open_store
from k2repro.audit.writer import write_run_tables
from k2repro.config.load import flatten, load_config, to_dict


def _run(root, run_id, steps, parent=None, resumed=None, source="train"):
    write_run_tables(root, run_id, {
        "runs": {"name": ["chain"], "parent_run_id": [parent], "resumed_from_step": [resumed],
                 "source": [source]},
        "steps": {"step": list(steps), "loss": [float(s) + (0.5 if source == "replay" else 0.0) for s in steps]},
    })


def test_lineage_follows_parents_and_stitches_steps(tmp_path):
    _run(tmp_path, "a", range(1, 58))                          # crashed at 57, last checkpoint 50
    _run(tmp_path, "b", range(51, 91), parent="a", resumed=50)  # resumed, crashed at 90 (ckpt 80)
    _run(tmp_path, "c", range(81, 121), parent="b", resumed=80)
    _run(tmp_path, "r", range(61, 71), parent="b", resumed=60, source="replay")  # a replay of b
    _run(tmp_path, "z", range(1, 11))                           # an unrelated run
    with open_store(tmp_path) as st:
        lin = dict(((r, (root, d)) for r, root, d in st.execute(
            "SELECT run_id, lineage_root, depth FROM lineage").fetchall()))
        assert lin == {"a": ("a", 0), "b": ("a", 1), "c": ("a", 2), "r": ("a", 2), "z": ("z", 0)}
        rows = st.execute("SELECT step, run_id FROM lineage_steps WHERE lineage_root = 'a' ORDER BY step"
                          ).fetchall()
        assert [s for s, _ in rows] == list(range(1, 121))  # one logical run, each step once
        owner = dict(rows)
        assert owner[50] == "a" and owner[51] == "b" and owner[80] == "b" and owner[81] == "c"
        assert st.execute("SELECT count(*) FROM lineage_steps WHERE run_id = 'r'").fetchone()[0] == 0


@pytest.mark.timeout(60)
def test_one_walker_for_chains_and_logical_runs(tmp_path):
    """Issue 19: `chain` (batch, replay: every parent, across a replay) and `logical_chain`
    (the release bundle: ancestors not across a replay, then the single continuation, with the
    step each launch is kept up to) walk parents with the same walker, `ancestors`. A cycle of
    parents (only a forged import can make one) ends both walks instead of looping for ever."""
    from k2repro.audit import lineage

    _run(tmp_path, "a", range(1, 58))
    _run(tmp_path, "b", range(51, 91), parent="a", resumed=50)
    _run(tmp_path, "r", range(61, 71), parent="b", resumed=60, source="replay")
    _run(tmp_path, "c", range(81, 121), parent="b", resumed=80)
    _run(tmp_path, "x", range(1, 5), parent="y", resumed=2)  # x and y name each other
    _run(tmp_path, "y", range(1, 5), parent="x", resumed=2)
    with open_store(tmp_path) as st:
        assert [r["run_id"] for r in lineage.chain(st, "r")] == ["a", "b", "r"]
        assert [(r["run_id"], r["cut"]) for r in lineage.logical_chain(st, "a")] == [("a", 50), ("b", 80), ("c", None)]
        assert [r["run_id"] for r in lineage.logical_chain(st, "c")] == ["a", "b", "c"]
        assert [r["run_id"] for r in lineage.logical_chain(st, "r")] == ["r"]  # a replay is not the run
        assert [r["run_id"] for r in lineage.chain(st, "x")] == ["y", "x"]
        assert [r["run_id"] for r in lineage.logical_chain(st, "x")] == ["y", "x"]


def test_hparams_hold_every_leaf_of_the_resolved_config(tmp_path):
    cfg = to_dict(load_config(["+run.tags.team=audit", "train.skip_steps=[3,7]"]))
    flat = flatten(cfg)
    rows = hparam_rows(cfg)
    assert rows["key"] == list(flat)
    sink = AuditSink(tmp_path, "cfg-run")
    sink.start({"name": "cfg"}, cfg, {}, [])
    sink.close()
    with open_store(tmp_path) as st:
        assert st.hparams("cfg-run") == {k: (v if v != {} else {}) for k, v in flat.items()}
        types = dict(st.execute("SELECT key, value_type FROM hparams").fetchall())
    assert types["optim.lr"] == "float" and types["train.max_steps"] == "int"
    assert types["train.skip_steps"] == "list" and types["run.tags.team"] == "str"
    assert parse_hparam("1e-08", "float") == flat["optim.eps"]
