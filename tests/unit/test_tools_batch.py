"""`tools.batch` honours deferred data positions (guard rollbacks) when it recomputes a step's
ids, orders logged ids by batch position, and flags fault-injected samples; the stores are
written by the real AuditSink over a real packed corpus."""

from __future__ import annotations

from pathlib import Path

from k2repro.audit.sink import AuditSink
from k2repro.audit.store import open_store
from k2repro.data.loader import StepSampler, batch_hash
from k2repro.data.packed import PackedDataset
from k2repro.tools.batch import batch_lookup
from tests.conftest import make_packed

SEED, GB, MAX = 11, 8, 12


def _store(tmp_path: Path, packed: Path, rollback_at: int, deferred: list[int]) -> tuple[Path, StepSampler]:
    """A run of 8 steps whose guard rolled back to step `rollback_at`, deferring `deferred`;
    sample ids logged as the trainer's sampler would give them, batch positions shuffled."""
    n = len(PackedDataset(packed))
    sampler = StepSampler(SEED, n, GB, MAX)
    store = tmp_path / "store"
    sink = AuditSink(store, "rb", world_size=2)
    hp = {"train.seed": SEED, "train.global_batch_size": GB, "train.max_steps": MAX, "data.packed_dir": str(packed)}
    manifest = [{"artifact": a["artifact"], "path": str(packed / a["path"]), "sha256": a["sha256"]}
                for a in PackedDataset(packed).artifacts()]
    sink.start({"name": "rb", "world_size": 2}, hp, {}, manifest)
    sink.log_event("rollback", step=rollback_at, detail={"deferred": deferred})
    for step in range(1, 9):
        sampler.deferred = deferred if step > rollback_at else []
        ids = [int(x) for x in sampler.ids(step)]
        sink.log_steps({"step": [step], "loss": [1.0], "batch_hash": [batch_hash(ids)]})
        order = list(range(GB))[::-1]  # logged out of order: batch_pos puts them back
        sink.log_samples({"step": [step] * GB, "rank": [p // 4 for p in order], "sample_id": [ids[p] for p in order],
                          "loss": [float(p) for p in order], "n_tokens": [32] * GB, "batch_pos": order})
    sink.log_event("fault_injected", step=5, detail={"kind": "bad_batch", "positions": [2, 6], "sample_ids": []})
    sink.flush()
    sink.close()
    return store, sampler


def test_recompute_honours_deferrals(tmp_path: Path) -> None:
    packed = make_packed(tmp_path / "packed")
    store, sampler = _store(tmp_path, packed, rollback_at=4, deferred=[5, 6])
    with open_store(store) as s:
        before = batch_lookup(s, "rb", 3)
        after = batch_lookup(s, "rb", 7)
        fault = batch_lookup(s, "rb", 5, text=False)
    assert before["deferred"] == [] and before["agree"] is True and before["batch_hash_agrees"] is True
    assert after["deferred"] == [5, 6] and after["agree"] is True and after["batch_hash_agrees"] is True
    sampler.deferred = []
    assert after["recomputed_ids"] != [int(x) for x in sampler.ids(7)]  # the deferral matters
    assert [x["loss"] for x in after["samples"]] == [float(p) for p in range(GB)]
    assert [x["rank"] for x in after["samples"]] == [0] * 4 + [1] * 4
    assert [x["batch_pos"] for x in fault["samples"] if x["injected"]] == [2, 6]
    assert any("no text" in n for n in after["notes"])  # the synthetic corpus has no tokenizer
    assert after["samples"][0]["docs"] and after["samples"][0]["docs"][0]["doc_id"].startswith("synthetic/")
