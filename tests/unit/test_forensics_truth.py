"""Peers' guard rules on hand-checkable series, the realistic labelled generator, and the
quick labelled benchmark (bench/forensics_truth.py) with the goals of issue 18 item 9.

The goal tests state what the forensics must achieve on realistic and real logs; the
benchmark's JSON (`reports/bench/forensics_truth.json`) has the full numbers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from k2repro.forensics.peers import (
    llm_foundry_fires,
    megatron_fires,
    olmo_core_fires,
    peer_episodes,
    run_peers,
)
from k2repro.forensics.realistic import LN_VOCAB, VISIBLE_SIGMA, Curve, sample_points
from k2repro.forensics.realistic_categories import CATEGORIES, category_logs

REPO = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_forensics_truth", REPO / "bench" / "forensics_truth.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_forensics_truth", mod)
    spec.loader.exec_module(mod)
    return mod


def _alternating(n: int, level: float = 2.0, amp: float = 0.01, every: int = 1) -> tuple[np.ndarray, np.ndarray]:
    s = np.arange(every, n * every + 1, every, dtype=np.int64)
    return s, level + amp * (-1.0) ** np.arange(s.size)


# ----------------------------------------------------------------------------- OLMo-core

def test_olmo_core_fires_on_a_jump_up_and_down_once_active():
    s, x = _alternating(200)
    x[s == 100] = 1.0   # two-sided: a drop of 100 sigma
    x[s == 150] = 3.0
    assert olmo_core_fires(s, x).tolist() == [100, 150]


def test_olmo_core_is_inactive_before_64_values():
    s, x = _alternating(200)
    x[s == 30] = 3.0
    assert olmo_core_fires(s, x).tolist() == []
    s, x = _alternating(200)
    x[s == 63] = 3.0
    assert olmo_core_fires(s, x).tolist() == []
    s, x = _alternating(200)
    x[s == 64] = 3.0
    assert olmo_core_fires(s, x).tolist() == [64]


def test_olmo_core_nan_poisons_its_window_for_128_steps():
    s, x = _alternating(300)
    x[s == 120] = np.nan
    fired = olmo_core_fires(s, x).tolist()
    assert fired == list(range(120, 249))  # the NaN leaves the window [s-128, s) at s = 249
    eps = peer_episodes(s, x, fired, "olmo_core")
    assert [(e.onset_step, e.end_step, e.peak_step, e.n_fired) for e in eps] == [(120, 248, 120, 129)]


def test_olmo_core_window_is_in_steps_on_sparse_logs():
    s, x = _alternating(200, every=10)
    x[s == 1500] = 3.0
    assert olmo_core_fires(s, x).tolist() == [1500]
    # a 128-step window over points 1,000 steps apart holds none: nothing can be judged
    s, x = _alternating(100, every=1000)
    x[s == 50_000] = 30.0
    assert olmo_core_fires(s, x).tolist() == []


# ----------------------------------------------------------------------------- llm-foundry

def test_llm_foundry_fires_on_the_fifth_consecutive_outlier_step():
    s = np.arange(1, 401, dtype=np.int64)
    x = np.ones(400)
    x[(s >= 150) & (s <= 153)] = 2.5     # 4 steps: tolerated (patience 4)
    x[(s >= 200) & (s <= 204)] = 2.5     # 5 steps: fires on the 5th
    x[(s >= 250) & (s <= 255)] = 2.5     # 6 steps: fires on the 5th and 6th
    assert llm_foundry_fires(s, x).tolist() == [204, 254, 255]


def test_llm_foundry_is_blind_while_a_nan_is_in_its_window():
    s = np.arange(1, 401, dtype=np.int64)
    x = np.ones(400)
    x[s == 150] = np.nan
    x[(s >= 200) & (s <= 204)] = 2.5     # the window [100, 200) holds the NaN: np.mean is NaN
    x[(s >= 260) & (s <= 264)] = 2.5     # [160, 260) does not
    assert llm_foundry_fires(s, x).tolist() == [264]


def test_llm_foundry_needs_a_full_100_step_window():
    s = np.arange(1, 401, dtype=np.int64)
    x = np.ones(400)
    x[(s >= 50) & (s <= 54)] = 2.5
    assert llm_foundry_fires(s, x).tolist() == []


def test_llm_foundry_consecutive_means_steps_on_sampled_logs():
    s = np.arange(2, 801, 2, dtype=np.int64)
    x = np.ones(s.size)
    x[np.isin(s, [200, 202, 204])] = 2.5    # 3 points spanning 5 steps
    x[np.isin(s, [300, 302])] = 2.5         # 2 points spanning 3 steps
    assert llm_foundry_fires(s, x).tolist() == [204]


def test_llm_foundry_high_loss_rule():
    s = np.arange(1, 301, dtype=np.int64)
    assert llm_foundry_fires(s, np.full(300, 11.0)).tolist() == list(range(201, 301))
    assert llm_foundry_fires(s, np.full(300, 11.0), loss_cap=None).tolist() == []


# ----------------------------------------------------------------------------- Megatron-LM

def test_megatron_fires_at_ten_times_the_max_of_the_first_100_steps():
    s = np.arange(1, 301, dtype=np.int64)
    x = np.full(300, 3.0)
    x[0] = 10.4
    x[s == 200] = 103.0
    x[s == 250] = 104.0
    x[s == 280] = np.nan
    assert megatron_fires(s, x).tolist() == [250, 280]
    assert megatron_fires(s, x, nonfinite=False).tolist() == [250]


# ----------------------------------------------------------------------------- episodes

def test_peer_episodes_merge_consecutive_firings():
    s = np.arange(1, 51, dtype=np.int64)
    x = np.ones(50)
    x[s == 6] = 5.0
    eps = peer_episodes(s, x, [5, 6, 7, 20, 40, 41], "p")
    assert [(e.onset_step, e.end_step, e.peak_step, e.n_fired) for e in eps] == [
        (5, 7, 6, 3), (20, 20, 20, 1), (40, 41, 40, 2)]
    s = np.arange(10, 501, 10, dtype=np.int64)
    x = np.ones(s.size)
    # adjacent logged points 10 steps apart are one episode, though 10 > merge_gap
    eps = peer_episodes(s, x, [100, 110, 300], "p")
    assert [(e.onset_step, e.end_step) for e in eps] == [(100, 110), (300, 300)]


def test_run_peers_watches_grad_norm_for_olmo_core_only():
    s, loss = _alternating(400)
    g = 1.0 + 0.01 * (-1.0) ** np.arange(400)
    g[s == 300] = 20.0
    out = run_peers({"loss": (s, loss), "grad_norm": (s, g)})
    assert [(e.signal, e.onset_step) for e in out["olmo_core"]] == [("grad_norm", 300)]
    assert out["llm_foundry"] == [] and out["megatron"] == []


def test_peer_rules_refuse_unsorted_steps():
    with pytest.raises(ValueError, match="increasing"):
        olmo_core_fires([3, 2, 1], [1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------- generator

def test_generator_is_deterministic_and_labels_are_consistent():
    for cat in CATEGORIES:
        a, b = category_logs(cat, seed=3, quick=True), category_logs(cat, seed=3, quick=True)
        for la, lb in zip(a, b, strict=True):
            assert la.labels() == lb.labels()
            for ra, rb in zip(la.runs, lb.runs, strict=True):
                np.testing.assert_array_equal(ra.loss, rb.loss)
        for log in a:
            if cat.startswith("clean"):
                assert log.spikes == []
            for r in log.runs:
                assert np.all(np.diff(r.steps) > 0) and r.steps[0] >= 1
                assert r.clean.shape == r.steps.shape and np.all(r.clean > 0)
            for sp in log.spikes:
                r = log.run(sp.run)
                assert sp.start_step <= sp.onset_step <= sp.peak_step <= sp.end_step
                assert r.steps[0] <= sp.onset_step
                assert sp.cls in ("transient", "slow", "persistent", "divergence")
                assert sp.severity == ("benign" if sp.cls in ("transient", "slow")
                                       and "restart" not in sp.reason else "malignant")
                if sp.cls == "transient" and sp.kind != "grad_burst" and sp.kind != "nan":
                    assert sp.end_step - sp.onset_step <= 50
                if sp.visible and sp.signal == "loss" and sp.kind != "nan":
                    inside = (r.steps >= sp.onset_step) & (r.steps <= sp.end_step)
                    exc = (r.loss[inside] - r.clean[inside]) / r.sigma[inside]
                    assert (~np.isfinite(r.loss[inside])).any() or exc.max() >= VISIBLE_SIGMA


def test_generated_curve_starts_at_ln_vocab_stalls_in_plateaus_and_its_noise_shrinks():
    s, clean, sigma, grad = Curve(n_steps=20_000, warmup=1000, drift_amp=0.0,
                                  plateaus=((8000, 1000),)).dense()
    assert abs(clean[0] - LN_VOCAB) < 0.05 and clean[-1] < 3.0
    assert np.all(np.diff(clean) <= 0)                        # no drift: never rises
    plateau = (s >= 8000) & (s < 9000)
    assert np.ptp(clean[plateau]) == 0.0 and clean[s == 9500][0] < clean[s == 8500][0]
    assert sigma[-1] < 0.5 * sigma[0] and np.all(np.diff(sigma) <= 0)
    assert np.all(np.diff(grad) <= 0) and grad[-1] > 0


def test_restart_branch_resumes_before_the_spike_and_does_not_spike():
    for log in category_logs("restart", seed=0, quick=True):
        sp = log.spikes[0]
        # a second spike, if any, is on the branch, after run-a stopped
        assert all(x.run == "run-b" and x.onset_step > log.run("run-a").steps[-1] for x in log.spikes[1:])
        a, b = log.run("run-a"), log.run("run-b")
        assert sp.run == "run-a" and sp.severity == "malignant"
        assert b.resumed_from == "run-a" and b.resumed_from_step < sp.start_step
        assert a.steps[-1] < b.steps[-1]
        # on the branch, the spike's steps are within the noise of the clean level
        on = (b.steps >= sp.onset_step) & (b.steps <= a.steps[-1])
        assert on.sum() > 50
        assert np.max(np.abs(b.loss[on] - b.clean[on]) / b.sigma[on]) < 6
        # and on run-a they are not
        on_a = (a.steps >= sp.onset_step)
        assert np.max((a.loss[on_a] - a.clean[on_a]) / a.sigma[on_a]) > 10


def test_wandb_sampling_keeps_k_points_and_their_envelope():
    rng = np.random.default_rng(0)
    kept, bucket = sample_points(240_000, "wandb:10000", rng)
    assert kept.size == 10_000 and kept[0] == 1 and bucket is not None
    assert np.all(np.diff(kept) >= 23) and np.all(np.diff(kept) <= 25)
    log = category_logs("clean_sampled", seed=0, quick=True)[0]
    r = log.runs[0]
    assert log.sampling.startswith("wandb") and r.loss_min is not None
    ok = np.isfinite(r.loss)
    assert np.all(r.loss_min[ok] <= r.loss[ok]) and np.all(r.loss[ok] <= r.loss_max[ok])


def test_peers_fire_where_they_should_on_generated_spikes():
    """OLMo-core's 6-sigma rule sees every single-step data spike (10-40 sigma) at its onset;
    Megatron's 10x-max rule and llm-foundry's 5-step rule see none of them."""
    for log in category_logs("data_spikes", seed=0, quick=True):
        r = log.runs[0]
        out = run_peers({"loss": (r.steps, r.loss), "grad_norm": (r.steps, r.grad_norm)})
        loss_onsets = [e.onset_step for e in out["olmo_core"] if e.signal == "loss"]
        for sp in log.spikes:
            assert any(abs(o - sp.onset_step) <= 2 for o in loss_onsets), (log.name, sp)
        assert out["megatron"] == [] and out["llm_foundry"] == []


def test_every_real_log_is_attributed_and_labelled_with_a_reason():
    folder = REPO / "tests" / "data" / "real-logs"
    csvs = sorted(p.name for p in folder.glob("*.csv"))
    assert csvs, "the real public logs are shipped with the tests"
    sources = (folder / "SOURCES.md").read_text()
    assert "MIT License" in sources
    labels = _bench().real_labels()
    for name in csvs:
        assert f"`{name}`" in sources, name
        assert name in labels, name
    why = json.loads((folder / "labels.json").read_text())["files"]
    assert all(len(why[n]["why"]) > 80 for n in csvs)


# ----------------------------------------------------------------------------- scoring

def test_scoring_counts_found_missed_extra_and_false_positives():
    b = _bench()
    pts = np.arange(1, 1001, dtype=np.int64)
    truths = [b.Truth(100, 110, "loss", "transient", "benign"),
              b.Truth(500, 900, "loss", "slow", "benign"),
              b.Truth(700, 700, "loss", "transient", "benign", visible=False)]
    found = [b.Found(102, 108, "loss", "transient", "benign", 2.0),   # found, 2 points late
             b.Found(503, 600, "loss", "slow", "malignant", -1.0),   # 3 points late: extra
             b.Found(300, 300, "loss", "transient", "benign", 2.0)]  # on normal loss
    t = b.score_run(pts, truths, found, clean=lambda s: (2.0, 0.01), with_baselines=True)
    assert (t.n_true, t.invisible, t.found, t.extra, t.fp_normal) == (2, 1, 1, 1, 1)
    assert t.onset_err_points == [2] and t.severity_right == 1
    assert t.baselines_nonpositive == 1 and t.baselines_implausible == 0
    s = t.summary(True)
    assert s["recall"] == 0.5 and s["precision"] == 0.5 and s["f1"] == 0.5


# ----------------------------------------------------------------------------- the benchmark

@pytest.fixture(scope="module")
def quick_report():
    return _bench().run_benchmark(quick=True)


def test_benchmark_covers_every_category_and_the_real_logs(quick_report):
    cats = quick_report["categories"]
    assert set(cats) == set(CATEGORIES) | {"real"}
    for c in CATEGORIES:
        n = cats[c]["k2repro"]["n_true"]
        assert (n == 0) == c.startswith("clean"), c
    assert cats["real"]["k2repro"]["n_true"] == 0
    # what was scored is what was generated: every W&B CSV imported back to the same points
    # (steps, logged NaNs, restart branches)
    assert quick_report["import_mismatches"] == []
    assert quick_report["logs"]["real"] and all(r["analysed"] >= 1 for r in quick_report["logs"]["real"])
    # the peers are scored on the same logs: OLMo-core's 6-sigma rule sees the data spikes
    assert cats["data_spikes"]["olmo_core"]["recall"] == 1.0
    assert cats["data_spikes"]["megatron"]["found"] == 0


def test_sparse_and_wandb_sampled_clean_curves_give_no_episode(quick_report):
    k = quick_report["categories"]["clean_sampled"]["k2repro"]
    assert (k["episodes"], k["fp_normal"]) == (0, 0), k["fp_examples"]
    assert {r["sampling"].split(":")[0] for r in quick_report["logs"]["clean_sampled"]} == {"wandb", "sparse"}


def test_goal_recall_with_onset_within_two_points(quick_report):
    k = quick_report["overall"]["k2repro"]
    assert k["recall"] >= 0.95, (k["recall"], k["missed_examples"])


def test_goal_no_episode_on_normal_loss(quick_report):
    k = quick_report["overall"]["k2repro"]
    assert k["fp_normal"] == 0, k["fp_examples"]


def test_goal_no_nonpositive_or_implausible_baseline(quick_report):
    k = quick_report["overall"]["k2repro"]
    assert (k["baselines_nonpositive"], k["baselines_implausible"]) == (0, 0)


def test_goal_severity_right(quick_report):
    k = quick_report["overall"]["k2repro"]
    assert k["severity_accuracy"] is not None and k["severity_accuracy"] >= 0.9


def test_goal_f1_at_least_each_peers_everywhere_and_higher_overall(quick_report):
    g = quick_report["goals"]["f1_vs_peers"]
    assert g["categories_where_a_peer_is_better"] == []
    ov = quick_report["overall"]
    for p in ("olmo_core", "llm_foundry", "megatron"):
        assert ov["k2repro"]["f1"] > ov[p]["f1"], (p, ov["k2repro"]["f1"], ov[p]["f1"])
    assert not math.isnan(ov["k2repro"]["f1"])
