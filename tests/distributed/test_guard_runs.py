"""The spike guard in real training runs (issue 6, item 9): skip equals a planned skip bit for
bit (2 ranks: every rank must take the same decision without a host sync), rollback defers
the data window and replays exactly, abort exits 3."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import k2repro
from tests.conftest import k2, tiny_overrides

BAD = 45
COMMON = {"train.max_steps": 60, "audit.flush_every": 5}


def _train(packed: Path, store: Path, **extra: object) -> tuple[str, object]:
    r = k2("train", *tiny_overrides(packed, store, **{**COMMON, **extra}))
    m = re.search(r"run_id=(\S+)", r.stdout)
    assert m, r.stdout + r.stderr
    return m.group(1), r


def _final_params(ckpt: Path, tmp: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{ckpt.parent.parent.name}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    return {k: v for k, v in torch.load(out, weights_only=False)["model"].items()}


def bits(v) -> np.ndarray:  # noqa: ANN001
    return np.asarray(v, dtype=np.float64).view(np.int64)


@pytest.fixture(scope="module")
def skip_pair(packed_dir: Path, tmp_path_factory) -> dict:
    store = tmp_path_factory.mktemp("guard2")
    s, rs = _train(packed_dir, store, **{"parallel.nproc": 2, "faults.bad_batch_steps": [BAD],
                                        "guard.action": "skip", "ckpt.interval": 60})
    r, rr = _train(packed_dir, store, **{"parallel.nproc": 2, "train.skip_steps": [BAD],
                                        "guard.action": "skip", "ckpt.interval": 60})
    assert rs.returncode == 0 and rr.returncode == 0, rs.stderr[-2000:] + rr.stderr[-2000:]
    return {"store": store, "S": s, "R": r}


def test_guard_skip_equals_planned_skip_bitwise(skip_pair: dict, tmp_path: Path) -> None:
    store = skip_pair["store"]
    with k2repro.open_store(store) as st:
        s = st.steps(skip_pair["S"]).set_index("step")
        r = st.steps(skip_pair["R"]).set_index("step")
        ev = st.events(skip_pair["S"])
    assert bool(s.loc[BAD, "skipped"]) and bool(r.loc[BAD, "skipped"])
    assert not s["skipped"].drop(BAD).any(), "only the bad batch's update is skipped"
    assert s.loc[BAD, "loss"] > s.loc[BAD - 5:BAD - 1, "loss"].max() + 0.3, "the injected batch spikes the loss"
    after = list(range(BAD + 1, 61))
    assert np.array_equal(bits(s.loc[after, "loss"]), bits(r.loc[after, "loss"]))
    assert np.array_equal(bits(s.loc[after, "grad_norm"]), bits(r.loc[after, "grad_norm"]))
    kinds = list(ev["kind"])
    assert "spike" in kinds and "skip" in kinds and "fault_injected" in kinds
    ps = _final_params(store / skip_pair["S"] / "checkpoints" / "step_00000060", tmp_path)
    pr = _final_params(store / skip_pair["R"] / "checkpoints" / "step_00000060", tmp_path)
    assert ps.keys() == pr.keys() and all(torch.equal(ps[k], pr[k]) for k in ps)


def test_guard_rollback_defers_the_window_and_replays(packed_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "rb"
    first, proc = _train(packed_dir, store, **{"faults.bad_batch_steps": [BAD], "guard.action": "rollback",
                                               "ckpt.interval": 20})
    assert proc.returncode == 0, proc.stderr[-2000:]
    with k2repro.open_store(store) as st:
        runs = st.sql("SELECT run_id, parent_run_id, resumed_from_step, status, config_json FROM runs")
        child = runs[runs["parent_run_id"] == first].iloc[0]
        assert int(child["resumed_from_step"]) == 40 and child["status"] == "completed"
        rb = st.events(first, "rollback")
        detail = json.loads(rb["detail"].iloc[0])
        assert detail["to_step"] == 40 and detail["deferred"] == [41, 42, 43, 44, 45]
        cs = st.steps(child["run_id"]).set_index("step")
        assert list(cs.index) == list(range(41, 61))
        assert not cs["skipped"].any(), "the deferred bad data does not come back in this run"
        assert len(st.events(child["run_id"], "fault_injected")) == 0
    cfg = json.loads(child["config_json"])
    assert cfg["train"]["defer_positions"] == [41, 42, 43, 44, 45] and cfg["train"]["resume"].endswith("step_00000040")
    # Replaying the child from its recorded config gives the same steps bit for bit.
    import yaml

    params = tmp_path / "child.yaml"
    cfg["audit"]["store"] = str(tmp_path / "replay")
    params.write_text(yaml.safe_dump(cfg))
    r = k2("train", "--params", str(params))
    assert r.returncode == 0, r.stderr[-2000:]
    rid = re.search(r"run_id=(\S+)", r.stdout).group(1)
    with k2repro.open_store(tmp_path / "replay") as st:
        rs = st.steps(rid).set_index("step")
    assert np.array_equal(bits(rs["loss"]), bits(cs["loss"]))


def test_guard_abort_exits_3(packed_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "ab"
    rid, proc = _train(packed_dir, store, **{"faults.bad_batch_steps": [BAD], "guard.action": "abort",
                                             "train.max_steps": 50})
    assert proc.returncode == 3, proc.stderr[-2000:]
    with k2repro.open_store(store) as st:
        assert st.run(rid)["status"] == "failed"
        assert len(st.events(rid, "spike")) >= 1
        assert "GuardAbort" in " ".join(st.events(rid, "error")["detail"])


def test_guard_log_records_the_spike_without_touching_training(packed_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "lg"
    rid, proc = _train(packed_dir, store, **{"faults.bad_batch_steps": [BAD]})  # guard.action=log
    assert proc.returncode == 0, proc.stderr[-2000:]
    with k2repro.open_store(store) as st:
        spikes = st.events(rid, "spike")
        assert list(spikes["step"]) == [BAD]
        assert not st.steps(rid)["skipped"].any()
