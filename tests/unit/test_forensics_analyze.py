"""analyze_run over synthetic runs written into a real store (the audit store's writer and
`open_store`): ground truth of bad batches, an lr spike and a NaN; classes; precursors;
layer and data attribution; a loss-only import."""

from __future__ import annotations

from pathlib import Path

import pytest

import k2repro
from k2repro.forensics.analyze import ForensicsParams, analyze_run
from k2repro.forensics.synthetic import InjectedSpike, SyntheticRun, write_run

BAD = (60, 250, 520)
LR = 380
NAN = 700

RUNS = {
    "gt": SyntheticRun(run_id="gt", n_steps=760, seed=1, spikes=(
        *(InjectedSpike("bad_batch", s) for s in BAD), InjectedSpike("lr_spike", LR, size=50.0),
        InjectedSpike("nan", NAN))),
    "clean": SyntheticRun(run_id="clean", n_steps=760, seed=1),
    "plateau": SyntheticRun(run_id="plateau", n_steps=700, seed=2,
                            spikes=(InjectedSpike("plateau", 300, size=0.5),)),
    "slow": SyntheticRun(run_id="slow", n_steps=900, seed=3,
                         spikes=(InjectedSpike("slow", 300, size=1.0, decay=60.0),)),
    "lead": SyntheticRun(run_id="lead", n_steps=600, seed=4,
                         spikes=(InjectedSpike("grad_lead", 300, size=0.8, lead=2),)),
    "rollback": SyntheticRun(run_id="rollback", n_steps=500, seed=5,
                             spikes=(InjectedSpike("bad_batch", 200),),
                             extra_events=({"step": 201, "kind": "rollback", "detail": {"to_step": 150}},)),
    "sparse": SyntheticRun(run_id="sparse", n_steps=900, seed=6, layer_every=10,
                           spikes=(InjectedSpike("bad_batch", 500),)),
    "lossonly": SyntheticRun(run_id="lossonly", n_steps=500, seed=7, loss_only=True,
                             spikes=(InjectedSpike("bump", 200, size=0.8),)),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    for spec in RUNS.values():
        write_run(root, spec)
    return root


@pytest.fixture(scope="module")
def results(store: Path) -> dict:
    s = k2repro.open_store(store)
    return {rid: analyze_run(s, rid) for rid in RUNS}


def near(spikes, step: int, tol: int = 2):
    hits = [sp for sp in spikes if abs(sp.episode.onset_step - step) <= tol]
    assert len(hits) == 1, (step, [sp.episode.onset_step for sp in spikes])
    return hits[0]


def test_ground_truth_every_injected_spike_found(results) -> None:
    r = results["gt"]
    for s in (*BAD, LR + 1):  # an lr spike shows in the loss of the step after it
        near(r.spikes, s)
    assert len(r.spikes) == len(BAD) + 2
    assert results["clean"].spikes == []


def test_bad_batches_rank_the_injected_samples_on_top(results) -> None:
    r = results["gt"]
    injected = {f["step"]: set(f["detail"]["sample_ids"]) for f in r.faults
                if f["detail"].get("kind") == "bad_batch"}
    for s in BAD:
        sp = near(r.spikes, s)
        assert sp.data.verdict == "data", sp.data.reason
        assert sp.data.step == s
        k = len(injected[s])
        top = [x["sample_id"] for x in sp.data.samples[:k]]
        precision = len(set(top) & injected[s]) / k
        assert precision >= 0.9, (s, top, injected[s])
        assert set(sp.top_samples) == injected[s]
        assert all(x.get("injected") for x in sp.data.samples[:k])
        assert sp.episode.cls == "transient" and sp.episode.severity == "benign"
        # the synthetic bad batch hits the first third of the tensors hardest
        assert sp.top_layer in ("tok_embeddings.weight", "layers.0.attention.wqkv.weight")


def test_lr_spike_is_not_blamed_on_data(results) -> None:
    sp = near(results["gt"].spikes, LR + 1)
    assert sp.data.verdict != "data"
    assert sp.top_samples == []
    # the update ratio (and the lr itself) moved one step before the loss
    assert sp.lead is not None and sp.lead.signal in ("update_ratio", "lr")
    assert sp.lead.lead_steps == 1
    assert {c.signal for c in sp.precursors if c.lead_steps == 1} >= {"update_ratio", "lr"}


def test_nan_is_a_malignant_divergence(results) -> None:
    sp = near(results["gt"].spikes, NAN)
    assert sp.episode.cls == "divergence" and sp.episode.severity == "malignant"
    assert sp.episode.nonfinite
    assert sp.row()["magnitude"] == float("inf")


def test_plateau_is_persistent(results) -> None:
    (sp,) = results["plateau"].spikes
    assert abs(sp.episode.onset_step - 300) <= 2
    assert sp.episode.cls == "persistent" and sp.episode.severity == "malignant"
    assert not sp.episode.recovered


def test_slow_recovery_is_slow_and_benign(results) -> None:
    (sp,) = results["slow"].spikes
    e = sp.episode
    assert e.cls == "slow" and e.severity == "benign"
    assert 50 < e.recovery_steps <= 1000
    assert e.magnitude == pytest.approx(e.peak_value / e.baseline)
    assert e.magnitude > 1.2


def test_precursor_order_grad_norm_two_steps_before_loss(results) -> None:
    (sp,) = results["lead"].spikes
    assert abs(sp.episode.onset_step - 300) <= 2
    assert sp.lead.signal == "grad_norm"
    assert sp.lead.lead_steps == sp.episode.onset_step - 298
    assert sp.precursors[0].signal in ("grad_norm",) or sp.precursors[0].signal.startswith("layer_grad_norm")
    loss = [c for c in sp.precursors if c.signal == "loss"][0]
    assert loss.lead_steps == 0
    assert sp.layers.first_to_cross["step"] == 298


def test_a_rollback_makes_the_episode_malignant(results) -> None:
    (sp,) = results["rollback"].spikes
    assert sp.episode.cls == "transient"
    assert sp.episode.severity == "malignant"
    assert [e["kind"] for e in sp.interventions] == ["rollback"]


def test_sparse_layer_stats_still_attribute(results) -> None:
    (sp,) = results["sparse"].spikes
    assert sp.layers.interval == 10
    assert sp.top_layer in ("tok_embeddings.weight", "layers.0.attention.wqkv.weight")
    assert sp.data.verdict == "data"


def test_loss_only_import_gets_what_it_can_and_says_what_it_cannot(results) -> None:
    r = results["lossonly"]
    (sp,) = r.spikes
    assert abs(sp.episode.onset_step - 200) <= 2
    assert sp.episode.cls == "transient"
    text = "\n".join(r.impossible)
    for what in ("grad_norm", "logz_mean", "layer_stats", "sample_stats"):
        assert what in text, text
    assert sp.layers is None and sp.data is None
    assert sp.lead.signal == "loss"


def test_missing_run_is_bad_input(store: Path) -> None:
    from k2repro.errors import BadInputError

    with pytest.raises(BadInputError, match="no run 'nope'"):
        analyze_run(k2repro.open_store(store), "nope")


def test_threshold_is_a_parameter(store: Path) -> None:
    from dataclasses import replace

    s = k2repro.open_store(store)
    strict = analyze_run(s, "gt", replace(ForensicsParams(), rule=replace(ForensicsParams().rule, threshold=1e9)))
    # only the non-finite detector is left
    assert [sp.episode.cls for sp in strict.spikes] == ["divergence"]
    assert strict.detectors["robust_z"]["n_flagged"] == 0
    assert strict.detectors["nonfinite"]["n_flagged"] == 760 - NAN + 1


def test_unlogged_loss_is_not_a_nan(tmp_path: Path) -> None:
    """An import that logs the loss every other step: the gaps are NULL, not NaN, and must not
    read as a divergence."""
    from k2repro.forensics.synthetic import generate, write_tables

    spec = SyntheticRun(run_id="gaps", n_steps=400, seed=8, spikes=(InjectedSpike("bump", 201, size=0.8),))
    st = generate(spec)["steps"]
    loss = [None if i % 2 else float(v) for i, v in enumerate(st["loss"])]
    write_tables(tmp_path, "gaps", {"runs": {"run_id": ["gaps"], "source": ["import:csv"]},
                                    "steps": {"step": st["step"], "loss": loss}})
    r = analyze_run(k2repro.open_store(tmp_path), "gaps")
    assert [(sp.episode.onset_step, sp.episode.cls) for sp in r.spikes] == [(201, "transient")]
    assert any("200 rows have no loss" in n for n in r.notes), r.notes


def test_loss_max_opens_an_episode_only_with_the_loss_behind_it(tmp_path: Path) -> None:
    """A bad batch in a small batch: 4 sigma on the loss (below the threshold of 6) but far out
    on loss_max: found. A loss_max outlier with a flat loss (one noisy sample): not a spike."""
    import numpy as np

    from k2repro.forensics.synthetic import write_tables

    rng = np.random.default_rng(9)
    n = 400
    loss = 4.0 + rng.normal(0, 0.1, n)
    loss_max = loss + 1.5 + rng.normal(0, 0.1, n)
    loss[199] += 0.45      # step 200: ~4 sigma on the loss ...
    loss_max[199] += 4.0   # ... and ~40 on loss_max
    loss_max[299] += 4.0   # step 300: loss_max alone
    write_tables(tmp_path, "lm", {"runs": {"run_id": ["lm"]},
                                  "steps": {"step": np.arange(1, n + 1), "loss": loss, "loss_max": loss_max}})
    r = analyze_run(k2repro.open_store(tmp_path), "lm")
    assert r.detectors["robust_z"]["n_flagged"] == 0
    assert set(r.detectors["loss_max:robust_z"]["flagged_steps"]) == {200, 300}
    assert [sp.episode.onset_step for sp in r.spikes] == [200]
    assert r.spikes[0].detectors == ["loss_max:robust_z"]


def test_analyze_run_leaves_its_inputs_as_they_were(store: Path) -> None:
    """Issue 19: analyze_run changes nothing it is given. The store's connection keeps its own
    parquet_metadata_cache setting (forensics turns it on only while it reads), the params are
    equal afterwards, and two calls on the same connection give the same spikes."""
    s = k2repro.open_store(store)
    setting = "SELECT current_setting('parquet_metadata_cache')"
    assert s.con.execute(setting).fetchone()[0] is False
    params = ForensicsParams(workers=1)
    kept = repr(params)
    first = analyze_run(s, "gt", params)
    assert s.con.execute(setting).fetchone()[0] is False, "analyze_run left a setting changed on the caller's connection"
    assert repr(params) == kept
    s.con.execute("SET parquet_metadata_cache = true")
    again = analyze_run(s, "gt", params)
    assert s.con.execute(setting).fetchone()[0] is True
    assert repr([sp.row() for sp in again.spikes]) == repr([sp.row() for sp in first.spikes])  # NaN != NaN
    assert first.spikes[0] is not again.spikes[0] and first.notes == again.notes
