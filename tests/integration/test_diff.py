"""`k2repro diff` on real runs (world size 1, 30 steps): identical reruns show no difference once
volatile facts are set aside; a different seed parts from step 1 (other data); a different lr
shares every batch and step 1's loss, and parts at step 2; an lr spike at step 25 parts exactly
at step 26, the first forward pass after the spiked update."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import k2, tiny_overrides
from tests.integration.test_replay import k2_all, k2_without_torch, run_id_of


@pytest.fixture(scope="module")
def runs(packed_dir: Path, tmp_path_factory) -> dict:  # noqa: ANN001
    root = tmp_path_factory.mktemp("diff")
    out: dict = {"root": root, "store": root / "store", "store2": root / "store2"}
    cases = {
        "base": ({}, "store"),
        "rerun": ({}, "store2"),  # another store: its path is set aside
        "seed": ({"train.seed": 7}, "store"),
        "lr": ({"optim.lr": 0.002}, "store"),
        "spike": ({"faults.lr_spike_steps": [25]}, "store"),
    }
    # independent launches, at once; cwd outside the git checkout: git facts are the same for each
    procs = k2_all([["train", *tiny_overrides(packed_dir, out[store], **{"train.max_steps": 30, **extra})]
                    for extra, store in cases.values()], cwd=root)
    for name, r in zip(cases, procs):
        assert r.returncode == 0, r.stderr[-2000:]
        out[name] = run_id_of(r)
    return out


def _diff(runs: dict, a: str, b: str, *extra: str) -> dict:
    args = ["diff", runs[a], runs[b], "--store", str(runs["store"]), "--json", *extra]
    if b == "rerun":
        args += ["--store-b", str(runs["store2"])]
    r = k2(*args, cwd=runs["root"])
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_identical_reruns_show_no_difference(runs: dict, tmp_path: Path) -> None:
    d = _diff(runs, "base", "rerun", "--png", str(tmp_path / "d.png"))
    assert d["identical"] is True, d
    assert d["config"] == {"added": {}, "removed": {}, "changed": {}}
    assert all(v == {"added": {}, "removed": {}, "changed": {}} for v in d["env"].values()), d["env"]
    assert d["data"] == {"added": [], "removed": [], "changed": {}} and d["run"] == {}
    c = d["curves"]
    assert c["steps_common"] == 30 and c["batch_hash_compared"] == 30
    assert d["first_batch_divergence_step"] is None and d["first_loss_divergence_step"] is None
    assert d["first_loss_divergence_step_tol"] is None and c["loss_max_abs_diff"] == 0.0
    # what made them different was set aside, and says so
    assert "audit.store" in d["set_aside"]["hparams"] and "pid" in d["set_aside"]["env"]
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_different_seed_parts_from_step_1_on_other_data(runs: dict) -> None:
    d = _diff(runs, "base", "seed")
    assert d["config"]["changed"] == {"train.seed": [1234, 7]}
    assert not d["config"]["added"] and not d["config"]["removed"]
    assert d["first_batch_divergence_step"] == 1
    assert d["first_loss_divergence_step"] == 1
    assert d["run"] == {"config_hash": [d["run"]["config_hash"][0], d["run"]["config_hash"][1]]}


def test_different_lr_shares_data_and_step_1_loss(runs: dict) -> None:
    d = _diff(runs, "base", "lr")
    assert d["config"]["changed"] == {"optim.lr": [0.003, 0.002]}
    assert d["first_batch_divergence_step"] is None and d["curves"]["batch_hash_compared"] == 30
    assert d["first_loss_divergence_step"] == 2  # step 1's loss comes before any update
    assert d["curves"]["first_grad_norm_divergence_step"] == 2
    assert d["curves"]["loss_max_abs_diff"] > 0


def test_lr_spike_at_25_parts_exactly_at_26(runs: dict) -> None:
    d = _diff(runs, "base", "spike")
    assert d["config"]["changed"] == {"faults.lr_spike_steps": [[], [25]]}
    assert d["first_batch_divergence_step"] is None
    assert d["first_loss_divergence_step"] == 26
    assert d["first_loss_divergence_step_tol"] == 26  # a 50x lr is no rounding error
    assert d["curves"]["first_grad_norm_divergence_step"] == 26


def test_markdown_and_text_without_torch(runs: dict) -> None:
    proc = k2_without_torch("diff", runs["base"], runs["lr"], "--store", str(runs["store"]), "--md")
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = proc.stdout
    assert md.startswith("# Diff: ") and "## config" in md and "| changed | `optim.lr` | 0.003 | 0.002 |" in md
    assert "- first loss divergence (bitwise): 2" in md
    t = k2("diff", runs["base"], runs["spike"], "--store", str(runs["store"]), cwd=runs["root"])
    assert t.returncode == 0 and "first loss divergence (bitwise): 26" in t.stdout
    bad = k2("diff", runs["base"], "nope", "--store", str(runs["store"]), cwd=runs["root"])
    assert bad.returncode == 2 and "no run 'nope'" in bad.stderr
