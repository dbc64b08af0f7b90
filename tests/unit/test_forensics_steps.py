"""Forensics on logs shaped like real ones: step-aware windows on sparse and irregular
sampling, honest baselines, no episode inside the noise band, classes from durations in
steps, severity from evidence (a restart branch, imported and stitched by the real CLI), and
grad-norm episodes. Each series is built here so that the truth is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import k2repro
from k2repro.audit.writer import write_run_tables
from k2repro.forensics.analyze import ForensicsParams, analyze_run
from k2repro.forensics.episodes import find_episodes
from tests.conftest import k2

N = 240_000  # iterations, like a 65B run's first stage


def clean_loss(steps: np.ndarray, seed: int = 0) -> np.ndarray:
    """A pretraining loss: fast early fall, slow decline, noise that shrinks over training."""
    rng = np.random.default_rng(seed)
    s = steps.astype(np.float64)
    level = 1.6 + 8.0 * np.exp(-s / 800.0) + 0.6 * np.exp(-s / 40_000.0)
    noise = 0.02 + 0.08 * np.exp(-s / 5_000.0)
    return level + rng.normal(0.0, 1.0, s.size) * noise


def wandb_sample(n_steps: int, k: int, seed: int = 0, dense: tuple[tuple[int, int], ...] = ()) -> np.ndarray:
    """W&B-style down-sampling: k points spread over the run (random, sorted, first and last
    kept), plus every step inside the `dense` ranges (a panel zoomed around an incident)."""
    rng = np.random.default_rng(seed)
    pts = set(rng.choice(np.arange(1, n_steps + 1), size=k, replace=False).tolist()) | {1, n_steps}
    for a, b in dense:
        pts |= set(range(a, b + 1))
    return np.array(sorted(pts), dtype=np.int64)


def add_spike(steps: np.ndarray, x: np.ndarray, onset: int, height: float, decay: float) -> np.ndarray:
    """A spike of `height` x the level at onset, decaying exponentially (time constant in steps)."""
    y = x.copy()
    d = steps - onset
    on = d >= 0
    y[on] += height * x[on] * np.exp(-d[on] / decay)
    return y


@pytest.mark.parametrize("seed", range(3))
def test_sparse_sampling_of_a_clean_curve_gives_no_spike(seed: int) -> None:
    steps = wandb_sample(N, 10_000, seed)
    eps = find_episodes(steps, clean_loss(steps, seed))
    assert eps == [], [(e.onset_step, e.cls, e.reason) for e in eps]


def test_a_fixed_interval_log_of_a_clean_curve_gives_no_spike() -> None:
    steps = np.arange(4, 176_701, 4)  # a public 3B run's interval
    eps = find_episodes(steps, clean_loss(steps, 7))
    assert eps == [], [(e.onset_step, e.reason) for e in eps]


@pytest.mark.parametrize("dip", [0.03, -0.03])
def test_a_gap_in_the_log_is_not_extrapolated_over(dip: float) -> None:
    """Every step logged, then 1,500 steps missing (a crash, an export hole): the trend of the
    last points before the gap must not be projected across it (it once gave z = 214 on a
    normal loss). The last 8 points before the gap sit `dip` below the 8 before them, well
    within the noise of the loss, a trend that means nothing 1,500 steps later."""
    steps = np.concatenate([np.arange(1, 14_263), np.arange(15_783, 18_000)])
    x = 2.6 + np.random.default_rng(0).normal(0.0, 0.025, steps.size)
    gap = int(np.searchsorted(steps, 15_783))
    x[gap - 8: gap] -= dip
    eps = find_episodes(steps, x)
    assert eps == [], [(e.onset_step, e.cls, e.max_z, e.reason) for e in eps]


def test_a_real_spike_then_normal_loss_one_episode_with_an_honest_baseline() -> None:
    """The 65B case: a 3x spike at 120k recovering over ~3,000 steps, sampled sparsely with a
    dense burst around it. One episode, its baseline the pre-spike level, none after it."""
    steps = wandb_sample(N, 10_000, 1, dense=((119_800, 121_500),))
    base = clean_loss(steps, 1)
    x = add_spike(steps, base, 120_000, 2.0, 800.0)
    eps = find_episodes(steps, x)
    assert len(eps) == 1, [(e.onset_step, e.baseline, e.reason) for e in eps]
    e = eps[0]
    true_level = float(np.median(base[(steps >= 119_800) & (steps < 120_000)]))
    assert abs(e.onset_step - 120_000) <= 2
    assert e.baseline > 0 and abs(e.baseline - true_level) / true_level < 0.03
    assert e.magnitude == pytest.approx(e.peak_value / e.baseline)
    assert e.excess == pytest.approx(e.peak_value - e.baseline)
    assert e.cls == "persistent" and e.severity == "malignant", e.reason  # ~3,700 steps > 1,000
    assert "not back within" in e.reason or "longer than slow_horizon" in e.reason


def test_no_non_positive_baseline_on_a_spike_branch_series() -> None:
    """420 points, dense around three spikes and a point per ~1,000 steps elsewhere (the
    spike-branch export): every episode's baseline is positive and within the curve's range."""
    dense = ((60_000, 60_150), (150_000, 150_150), (200_000, 200_120))
    sparse = np.arange(1_000, N + 1, 1_000)
    steps = np.array(sorted(set(sparse.tolist()) | {s for a, b in dense for s in range(a, b + 1)}))
    x = clean_loss(steps, 3)
    for onset, h in ((60_010, 1.5), (150_020, 0.8), (200_005, 3.0)):
        x = add_spike(steps, x, onset, h, 25.0)
    eps = find_episodes(steps, x)
    assert len(eps) == 3, [(e.onset_step, e.baseline) for e in eps]
    for e in eps:
        assert 1.5 < e.baseline < 3.0, (e.onset_step, e.baseline)
        assert e.magnitude > 1.5
    assert [abs(e.onset_step - o) <= 2 for e, o in zip(eps, (60_010, 150_020, 200_005), strict=True)] == [True] * 3


def test_nothing_is_opened_inside_the_noise_band() -> None:
    """A bump of 0.5% of the level is several sigma on a smooth curve, but inside the band."""
    steps = np.arange(1_000, 500_001, 1_000)
    x = 2.0 + 1.0 * np.exp(-steps / 100_000.0) + np.random.default_rng(4).normal(0, 0.0005, steps.size)
    x[200] += 0.01  # 0.4% of the level, ~20 sigma
    assert find_episodes(steps, x) == []
    x[300] += 0.2  # 8%: a spike
    eps = find_episodes(steps, x)
    assert [e.onset_step for e in eps] == [int(steps[300])]
    assert eps[0].severity == "benign" and eps[0].cls == "transient"


def test_a_one_point_blip_on_a_sparse_log_is_transient_and_says_the_resolution() -> None:
    steps = np.arange(833, 833 * 400, 833)
    x = clean_loss(steps, 5)
    x[250] *= 1.8
    (e,) = find_episodes(steps, x)
    assert e.cls == "transient" and e.severity == "benign"
    assert e.duration_steps == 1 and e.resolution_steps == 833
    assert "next logged point 833 steps later" in e.reason


def test_the_same_spike_gets_the_same_class_at_every_sampling() -> None:
    full = np.arange(1, 20_001)
    for every, in ((1,), (5,), (20,)):
        steps = full[::every]
        x = add_spike(steps, clean_loss(steps, 6), 10_000, 1.0, 150.0)  # back in ~500 steps
        eps = find_episodes(steps, x)
        assert len(eps) == 1, (every, [(e.onset_step, e.reason) for e in eps])
        assert eps[0].cls == "slow" and eps[0].severity == "benign", (every, eps[0].reason)
        assert abs(eps[0].onset_step - 10_000) <= 2 * every


def _write(root: Path, rid: str, steps: np.ndarray, loss: np.ndarray, grad: np.ndarray | None = None,
           parent: str | None = None, resumed: int | None = None) -> None:
    cols = {"step": steps, "loss": loss}
    if grad is not None:
        cols["grad_norm"] = grad
    write_run_tables(root, rid, {
        "runs": {"name": [rid], "source": ["import:csv"], "parent_run_id": [parent],
                 "resumed_from_step": [resumed]},
        "steps": cols})


def test_grad_norm_burst_that_the_loss_does_not_show_is_its_own_episode(tmp_path: Path) -> None:
    steps = np.arange(1, 3_001)
    loss = clean_loss(steps, 8)
    rng = np.random.default_rng(8)
    grad = 0.3 + 0.02 * rng.standard_normal(steps.size)
    grad[2_000:2_004] = 3.0  # a burst the loss never shows
    loss2 = add_spike(steps, loss, 2_500, 1.0, 5.0)
    grad[2_499:2_503] = 2.5  # and one that comes with a loss spike
    _write(tmp_path, "g", steps, loss2, grad)
    res = analyze_run(k2repro.open_store(tmp_path), "g")
    by = {(sp.episode.signal, sp.episode.onset_step // 10) for sp in res.spikes}
    assert ("grad_norm", 200) in by and ("loss", 250) in by, by
    g = next(sp.episode for sp in res.spikes if sp.episode.signal == "grad_norm")
    assert "grad_norm burst; the loss did not spike" in g.reason
    lo = next(sp.episode for sp in res.spikes if sp.episode.signal == "loss")
    assert any(n.startswith("grad_norm spiked too") for n in lo.notes)
    only_loss = analyze_run(k2repro.open_store(tmp_path), "g", ForensicsParams(episode_signals=("loss",)))
    assert {sp.episode.signal for sp in only_loss.spikes} == {"loss"}


def _wandb_csv(path: Path, runs: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """A W&B chart export: one Step column, one value column per run (empty where unlogged)."""
    allsteps = sorted({int(s) for st, _ in runs.values() for s in st})
    names = list(runs)
    lines = ['"Step",' + ",".join(f'"{n} - train/loss"' for n in names)]
    vals = {n: dict(zip(st.tolist(), v.tolist(), strict=True)) for n, (st, v) in runs.items()}
    for s in allsteps:
        lines.append(f'"{s}",' + ",".join(f'"{vals[n][s]}"' if s in vals[n] else '""' for n in names))
    path.write_text("\n".join(lines) + "\n")


def test_a_restart_branch_is_stitched_and_makes_the_spike_malignant(tmp_path: Path) -> None:
    """A run that spiked at 6,000 and its restart from step 5,900 (the same steps again,
    without the spike), exported together: imported and linked by the real CLI, the spike is
    malignant with the restart as its reason; the restarted branch has no spike."""
    steps = np.arange(10, 8_001, 10)
    base = clean_loss(steps, 9)
    spiky = add_spike(steps, base, 6_000, 1.2, 40.0)
    rsteps = steps[steps > 5_900]
    rng = np.random.default_rng(10)
    restart = base[steps > 5_900] + rng.normal(0, 0.01, rsteps.size)
    csv = tmp_path / "k2.csv"
    _wandb_csv(csv, {"k2-65b": (steps[steps <= 7_000], spiky[steps <= 7_000]),
                     "k2-65b restart": (rsteps, restart)})
    store = tmp_path / "store"
    r = k2("import", "wandb-csv", str(csv), "--store", str(store), "--json")
    assert r.returncode == 0, r.stderr
    runs = {row["name"].split("/")[-1]: row for row in json.loads(r.stdout)["runs"]}
    main, branch = runs["k2-65b"], runs["k2-65b restart"]
    assert branch["parent_run_id"] == main["run_id"] and branch["resumed_from_step"] == 5_900
    out = k2("forensics", main["run_id"], "--store", str(store), "--out", str(tmp_path / "rep"), "--json",
             "--no-html")
    assert out.returncode == 0, out.stderr
    obj = json.loads(out.stdout)
    (sp,) = [s for s in obj["spikes"] if s["signal"] == "loss"]
    assert abs(sp["onset_step"] - 6_000) <= 20 and sp["severity"] == "malignant"
    assert sp["reason"].startswith("malignant: training was restarted from step 5900, 100 steps before onset")
    assert "the restarted run did not spike" in sp["reason"]
    assert obj["restarts"][0]["run_id"] == branch["run_id"]
    md = (tmp_path / "rep" / main["run_id"] / "forensics.md").read_text()
    assert "What matters first" in md and "training was restarted from step 5900" in md
    child = json.loads(k2("forensics", branch["run_id"], "--store", str(store), "--out", str(tmp_path / "rep"),
                          "--json", "--no-html").stdout)
    assert child["spikes"] == [], child["spikes"]
    assert len(child["segments"]) == 2  # read as the logical run: the main run up to 5,900, then the branch
    rows = k2("sql", f"SELECT signal, reason, baseline, excess FROM spikes WHERE run_id = '{main['run_id']}'",
              "--store", str(store), "--json")
    assert rows.returncode == 0, rows.stderr
    got = json.loads(rows.stdout)
    got = got if isinstance(got, list) else got.get("rows", got)
    assert got[0]["signal"] == "loss" and got[0]["reason"].startswith("malignant: training was restarted")
    assert got[0]["baseline"] > 0


def test_many_near_threshold_blips_are_grouped_not_n_sections(tmp_path: Path) -> None:
    steps = np.arange(4, 40_001, 4)
    x = clean_loss(steps, 11)
    rng = np.random.default_rng(11)
    big = int(np.searchsorted(steps, 30_000))
    blips = rng.choice(np.arange(2_500, big - 500, 50), size=12, replace=False)
    for b in blips:
        x[b] += 0.2  # ~8 sigma late in training: single-point blips

    x = add_spike(steps, x, int(steps[big]), 4.0, 2_000.0)  # the one that matters
    _write(tmp_path, "b", steps, x)
    res = analyze_run(k2repro.open_store(tmp_path), "b")
    from k2repro.forensics.report import to_json, to_markdown

    obj = to_json(res)
    minor = [s for s in obj["spikes"] if s["minor"]]
    assert len(minor) >= 5, [(s["onset_step"], s["max_z"]) for s in obj["spikes"]]
    first = obj["spikes"][obj["ranked"][0] - 1]
    assert abs(first["onset_step"] - 30_000) <= 8 and first["severity"] == "malignant"
    md = to_markdown(res, obj)
    assert f"## Minor blips ({len(minor)})" in md
    assert md.count("## Spike ") == len(obj["spikes"]) - len(minor)
    assert "## Sampling" in md and "logged points over steps 4..40000" in md


def test_on_a_log_of_every_step_the_step_windows_are_the_guards_point_windows() -> None:
    """The online guard sees every step and counts points; forensics counts steps. On a log
    with every step they are the same rule (after the first windows fill)."""
    from k2repro.core.spike import RobustZ
    from k2repro.forensics.detect import _robust_z_steps, robust_z

    steps = np.arange(1, 3_001)
    x = add_spike(steps, clean_loss(steps, 12), 1_500, 0.8, 5.0)
    p = RobustZ()
    z_pts = robust_z(x, p).scores
    z_steps = _robust_z_steps(x, steps, p)[0]
    warm = p.long_window + p.short_window
    assert np.allclose(z_pts[warm:], z_steps[warm:], equal_nan=True)
    assert np.array_equal(robust_z(x, p).flags[warm:], (np.nan_to_num(z_steps, nan=-np.inf) >= p.threshold)[warm:])


def test_peers_rules_are_shown_beside_k2repros_episodes(tmp_path: Path) -> None:
    """A 5x spike lasting 20 steps: OLMo-core's 6-sigma rule and llm-foundry's 2x-for-5-steps
    rule fire inside k2repro's episode, Megatron-LM's 10x rule does not; on a clean stretch
    none fires; the report has the side-by-side table."""
    steps = np.arange(1, 3_001)
    x = clean_loss(steps, 13)
    x[2_000:2_020] = 5.0 * x[2_000:2_020]
    _write(tmp_path, "p", steps, x)
    res = analyze_run(k2repro.open_store(tmp_path), "p")
    (ep,) = [sp.episode for sp in res.spikes if sp.episode.signal == "loss"]
    assert abs(ep.onset_step - 2_001) <= 2
    assert res.peers["olmo_core"]["k2repro_episodes_matched"] == 1
    assert res.peers["llm_foundry"]["k2repro_episodes_matched"] == 1
    assert res.peers["megatron"]["n_fired"] == 0
    assert any("olmo_core's guard would have fired here" in n for n in ep.notes)
    from k2repro.forensics.report import to_json, to_markdown

    obj = to_json(res)
    assert set(obj["peers"]) == {"olmo_core", "llm_foundry", "megatron"}
    assert "## Peers' rules on this run" in to_markdown(res, obj)
