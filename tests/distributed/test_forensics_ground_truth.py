"""Issue 6's ground truth on real tiny 2-rank runs: bad batches at three steps, an lr spike and
a NaN are each found (onset within 2 steps), the bad batches' injected samples rank on top,
the lr spike is not blamed on data, the NaN is a divergence; a clean run has no spike."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import k2, make_packed, tiny_overrides

BAD = [60, 150, 230]
LR = 110
NAN = 280
SHAPE = {"parallel.nproc": 2, "train.max_steps": 300, "train.seq_len": 64, "model.max_seq_len": 128,
         "model.d_model": 64, "model.n_heads": 4, "model.n_kv_heads": 4, "model.ffn_dim": 172,
         "train.global_batch_size": 16, "train.micro_batch_size": 4, "audit.layer_stats_every": 1,
         "audit.flush_every": 25}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("gt")
    packed = make_packed(tmp / "packed", n_docs=600, seq_len=64)
    store = tmp / "store"
    out = {"store": store, "tmp": tmp}
    for name, extra in (("faulty", {"faults.bad_batch_steps": BAD, "faults.lr_spike_steps": [LR],
                                    "faults.nan_step": NAN}), ("clean", {})):
        r = k2("train", *tiny_overrides(packed, store, **{**SHAPE, **extra, "run.name": name}))
        assert r.returncode == 0, r.stderr[-2000:]
        rid = re.search(r"run_id=(\S+)", r.stdout).group(1)
        f = k2("forensics", rid, "--store", str(store), "--out", str(tmp / "rep"), "--json", "--no-html")
        assert f.returncode == 0, f.stderr[-2000:]
        out[name] = json.loads(f.stdout)
    return out


def _near(spikes: list[dict], step: int) -> dict | None:
    hits = [s for s in spikes if abs(s["onset_step"] - step) <= 2]
    return hits[0] if hits else None


def test_every_injected_spike_is_found(runs: dict) -> None:
    spikes = runs["faulty"]["spikes"]
    for step in [*BAD, LR + 1, NAN]:
        assert _near(spikes, step), (step, [s["onset_step"] for s in spikes])


def test_bad_batches_rank_the_injected_samples_on_top(runs: dict) -> None:
    events = runs["faulty"]["faults"]
    for step in BAD:
        sp = _near(runs["faulty"]["spikes"], step)
        injected = next(set(e["detail"]["sample_ids"]) for e in events
                        if e["step"] == step and e["detail"].get("kind") == "bad_batch")
        k = len(injected)
        top = [s["sample_id"] for s in sp["data"]["samples"][:k]]
        assert len(set(top) & injected) / k >= 0.9, (step, top, injected)
        assert sp["data"]["verdict"] == "data"


def test_lr_spike_is_not_blamed_on_data(runs: dict) -> None:
    sp = _near(runs["faulty"]["spikes"], LR + 1)
    assert (sp.get("data") or {}).get("verdict") != "data"


def test_nan_is_a_divergence(runs: dict) -> None:
    assert _near(runs["faulty"]["spikes"], NAN)["class"] == "divergence"


def test_clean_run_has_no_spike(runs: dict) -> None:
    assert runs["clean"]["spikes"] == []
