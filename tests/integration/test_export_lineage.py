"""A lineage chain exports as one logical run: a resumed child's steps replace its parent's
after the resume point, a replay of the parent is not part of it, every launch's own rows
ship too, and the imported chain reads the same through the store's `lineage_steps` view.
The chain is written with the store's writer (no training: the stitching is the subject)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from k2repro.errors import BadInputError


def _chain_store(root):  # noqa: ANN001, ANN202
    from k2repro.audit.writer import write_run_tables

    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def run(rid, parent, resumed, source, steps, ckpts, start):  # noqa: ANN001, ANN202
        write_run_tables(root, rid, {
            "runs": {"name": ["chain"], "parent_run_id": [parent], "resumed_from_step": [resumed],
                     "source": [source], "started_at": [t0 + timedelta(hours=start)], "world_size": [1],
                     "config_json": [json.dumps({"train": {"seed": 1}})]},
            "steps": {"step": steps, "loss": [10.0 - s / 7 + (0.5 if rid == "P" else 0) for s in steps],
                      "grad_norm": [1.0] * len(steps)},
            "sample_stats": {"step": [s for s in steps for _ in range(2)], "rank": [0, 1] * len(steps),
                             "sample_id": [100 * s + k for s in steps for k in (0, 1)]},
            "checkpoints": {"step": ckpts, "path": [f"/nowhere/{rid}/step_{c}" for c in ckpts]},
            "evals": {"step": ckpts, "metric": ["val/loss"] * len(ckpts), "value": [float(c) for c in ckpts]},
        })

    run("P", None, None, "train", list(range(1, 11)), [5, 10], 0)
    run("C", "P", 5, "train", list(range(6, 13)), [8, 12], 1)       # resumed from P's step 5
    run("X", "P", 5, "replay", list(range(6, 9)), [], 2)            # a replay of P: not in the run


@pytest.fixture(scope="module")
def chain_bundle(tmp_path_factory) -> dict:
    from k2repro.bundle.export import export_run

    root = tmp_path_factory.mktemp("lineage")
    store = root / "store"
    _chain_store(store)
    bundle = root / "bundle"
    info = export_run(store, "C", bundle, checkpoints="none", with_samples=True, data=False, reports_dir=None)
    return {"store": store, "bundle": bundle, "info": info, "root": root}


def test_chain_is_one_logical_run(chain_bundle) -> None:  # noqa: ANN001
    b, info = chain_bundle["bundle"], chain_bundle["info"]
    assert [r["run_id"] for r in info["run"]["chain"]] == ["P", "C"]
    assert [r["cut"] for r in info["run"]["chain"]] == [5, None]
    steps = pq.read_table(b / "logical/steps.parquet").to_pydict()
    assert steps["step"] == list(range(1, 13))
    assert steps["run_id"] == ["P"] * 5 + ["C"] * 7
    assert steps["loss"][:5] == [10.0 - s / 7 + 0.5 for s in range(1, 6)]
    assert steps["loss"][5:] == [10.0 - s / 7 for s in range(6, 13)]
    ck = pq.read_table(b / "logical/checkpoints.parquet").to_pydict()
    assert list(zip(ck["step"], ck["run_id"])) == [(5, "P"), (8, "C"), (12, "C")]  # P's 10 superseded
    ev = pq.read_table(b / "logical/evals.parquet").to_pydict()
    assert ev["step"] == [5, 8, 12]
    # every launch's own rows ship (P's superseded steps 6..10 too), the replay's do not
    assert pq.read_table(b / "tables/P/steps/r0-00000000.parquet").num_rows == 10
    assert not (b / "tables" / "X").exists()
    order = pq.read_table(b / "data/order.parquet").to_pydict()  # no data shipped: from sample_stats
    assert info["data_order"]["source"] == "sample_stats"
    assert order["sample_id"][:2] == [100, 101] and order["step"][-1] == 12 and order["run_id"][-1] == "C"
    assert len(order["step"]) == 24
    assert (b / "configs" / "P.yaml").is_file() and (b / "configs" / "C.yaml").is_file()
    assert "2 launches" in (b / "README.md").read_text() or "P -> C" in (b / "README.md").read_text()


def test_export_from_the_root_follows_the_child(chain_bundle, tmp_path) -> None:  # noqa: ANN001
    from k2repro.bundle.export import export_run

    info = export_run(chain_bundle["store"], "P", tmp_path / "b2", checkpoints="none", data=False, reports_dir=None)
    assert [r["run_id"] for r in info["run"]["chain"]] == ["P", "C"]


def test_ambiguous_continuation_and_existing_out_are_refused(chain_bundle, tmp_path) -> None:  # noqa: ANN001
    from k2repro.audit.writer import write_run_tables
    from k2repro.bundle.export import export_run

    with pytest.raises(BadInputError, match="already exists"):
        export_run(chain_bundle["store"], "C", chain_bundle["bundle"], data=False)
    store = tmp_path / "s"
    _chain_store(store)
    write_run_tables(store, "C2", {"runs": {"name": ["chain"], "parent_run_id": ["P"], "resumed_from_step": [5],
                                            "source": ["train"]}})
    with pytest.raises(BadInputError, match="several continuations"):
        export_run(store, "P", tmp_path / "b3", data=False)
    assert not (tmp_path / "b3").exists() and not list(tmp_path.glob(".b3*"))


def test_imported_chain_reads_the_same_lineage(chain_bundle, tmp_path) -> None:  # noqa: ANN001
    from k2repro.audit.store import open_store
    from k2repro.bundle.importer import import_bundle

    out = import_bundle(chain_bundle["bundle"], tmp_path / "store")
    assert out["run_ids"] == ["P", "C"]
    with open_store(tmp_path / "store") as s:
        rows = s.execute("SELECT step, run_id, loss FROM lineage_steps ORDER BY step").fetchall()
        assert s.execute("SELECT count(*) FROM runs WHERE status = 'completed'").fetchone()[0] == 2
    logical = pq.read_table(chain_bundle["bundle"] / "logical/steps.parquet").to_pydict()
    assert rows == list(zip(logical["step"], logical["run_id"], logical["loss"]))


def test_gc_removes_an_import_whole(chain_bundle, tmp_path) -> None:  # noqa: ANN001
    from k2repro.bundle.importer import import_bundle
    from k2repro.tools.gc import apply_gc, plan_gc

    store = tmp_path / "store"
    folder = Path(import_bundle(chain_bundle["bundle"], store)["folder"])
    only_child = plan_gc(store, ["C"])
    assert only_child.paths() == [str(folder / "C")]  # P stays, and with it the import's data
    plan = plan_gc(store, ["P", "C"])
    assert plan.paths() == [str(folder)]
    apply_gc(plan)
    assert not folder.exists() and not list(store.glob("bundle-*"))
