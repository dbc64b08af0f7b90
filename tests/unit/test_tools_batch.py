"""`tools.batch` honours deferred data positions (a guard rollback's child run) when it
recomputes a step's ids, orders logged ids by batch position, and flags fault-injected
samples; the stores are written by the real AuditSink over a real packed corpus."""

from __future__ import annotations

from pathlib import Path

from k2repro.audit.sink import AuditSink
from k2repro.audit.store import open_store
from k2repro.data.loader import StepSampler, batch_hash
from k2repro.data.packed import PackedDataset
from k2repro.tools.batch import batch_lookup
from tests.conftest import make_packed

SEED, GB, MAX = 11, 8, 12


def _run(store: Path, packed: Path, run_id: str, steps: range, deferred: list[int], parent: str | None = None,
         resumed_from: int | None = None, config_defer: list[int] | None = None) -> None:
    """Sample ids logged as the trainer's sampler gives them with `deferred` in force (its
    config recording `config_defer`, default the same), batch positions shuffled."""
    sampler = StepSampler(SEED, len(PackedDataset(packed)), GB, MAX)
    sampler.deferred = deferred
    sink = AuditSink(store, run_id, world_size=2)
    hp = {"train.seed": SEED, "train.global_batch_size": GB, "train.max_steps": MAX,
          "train.defer_positions": deferred if config_defer is None else config_defer, "data.packed_dir": str(packed)}
    manifest = [{"artifact": a["artifact"], "path": str(packed / a["path"]), "sha256": a["sha256"]}
                for a in PackedDataset(packed).artifacts()]
    sink.start({"name": run_id, "world_size": 2, "parent_run_id": parent, "resumed_from_step": resumed_from},
               hp, {}, manifest)
    for step in steps:
        ids = [int(x) for x in sampler.ids(step)]
        sink.log_steps({"step": [step], "loss": [1.0], "batch_hash": [batch_hash(ids)]})
        order = list(range(GB))[::-1]  # logged out of order: batch_pos puts them back
        sink.log_samples({"step": [step] * GB, "rank": [p // 4 for p in order], "sample_id": [ids[p] for p in order],
                          "loss": [float(p) for p in order], "n_tokens": [32] * GB, "batch_pos": order})
    sink.log_event("fault_injected", step=steps[-1], detail={"kind": "bad_batch", "positions": [2, 6]})
    sink.flush()
    sink.close()


def test_recompute_honours_deferrals(tmp_path: Path) -> None:
    packed = make_packed(tmp_path / "packed")
    store = tmp_path / "store"
    _run(store, packed, "parent", range(1, 7), [])
    # the guard rolled back to step 4 and deferred positions 5 and 6 to the end
    _run(store, packed, "child", range(5, 9), [5, 6], parent="parent", resumed_from=4)
    # a plain resume of the child: the deferral comes with the checkpoint, not the config
    _run(store, packed, "grandchild", range(7, 9), [5, 6], parent="child", resumed_from=6, config_defer=[])
    with open_store(store) as s:
        before = batch_lookup(s, "parent", 5)
        after = batch_lookup(s, "child", 7)
        inherited = batch_lookup(s, "grandchild", 8, text=False)
        fault = batch_lookup(s, "child", 8, text=False)
    assert before["deferred"] == [] and before["agree"] is True and before["batch_hash_agrees"] is True
    assert after["deferred"] == [5, 6] and after["agree"] is True and after["batch_hash_agrees"] is True
    assert inherited["deferred"] == [5, 6] and inherited["agree"] is True
    plain = StepSampler(SEED, len(PackedDataset(packed)), GB, MAX)
    assert after["recomputed_ids"] != [int(x) for x in plain.ids(7)]  # the deferral matters
    assert [x["loss"] for x in after["samples"]] == [float(p) for p in range(GB)]
    assert [x["rank"] for x in after["samples"]] == [0] * 4 + [1] * 4
    assert [x["batch_pos"] for x in fault["samples"] if x["injected"]] == [2, 6]
    assert not any(x["injected"] for x in after["samples"])
    assert any("no text" in n for n in after["notes"])  # the synthetic corpus has no tokenizer
    assert after["samples"][0]["docs"] and after["samples"][0]["docs"][0]["doc_id"].startswith("synthetic/")
