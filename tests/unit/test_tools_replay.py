"""Replay's config for launch and its data check, without training: the stored config resumed
from the chosen state and stopped at B, process faults cleared, counterfactual overrides last;
data artefacts checked by sha256, a missing training shard refused, absent earlier-stage
artefacts skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from k2repro.audit.sink import AuditSink
from k2repro.audit.store import open_store
from k2repro.config.load import from_dict, to_dict
from k2repro.config.schema import RunConfig
from k2repro.errors import BadInputError
from k2repro.tools.replay import ReplayPlan, launch_config, verify_data
from tests.conftest import make_packed


def _plan(cfg: dict, start: int, ckpt: Path | None) -> ReplayPlan:
    return ReplayPlan(run_id="orig", store_root=Path("s"), from_step=start + 1, to_step=30, start_step=start,
                      checkpoint=ckpt, checkpoint_run_id="orig" if ckpt else None, world_size=2, nproc=2,
                      tolerance=0.0, config=cfg, threads="1")


def test_launch_config(tmp_path: Path) -> None:
    cfg = to_dict(RunConfig())
    cfg["train"]["resume"] = "some-old-run"
    cfg["faults"]["kill_step"] = 13
    cfg["faults"]["lr_spike_steps"] = [25]
    out = launch_config(_plan(cfg, 10, tmp_path / "step_00000010"), tmp_path / "out")
    assert out["train"]["resume"] == str((tmp_path / "step_00000010").resolve())
    assert out["train"]["stop_at_step"] == 30 and out["audit"]["store"] == str((tmp_path / "out").resolve())
    assert out["faults"]["kill_step"] == 0  # it killed the original at 13: not a number to reproduce
    assert out["faults"]["lr_spike_steps"] == [25]  # numeric faults stay
    assert out["ckpt"]["dir"] == "" and out["parallel"]["nproc"] == 2
    assert cfg["train"]["resume"] == "some-old-run"  # the plan's config is not modified
    from_dict(out)  # still fits the schema
    fresh = launch_config(_plan(cfg, 0, None), tmp_path / "out", checkpoints=False,
                          overrides={"train.skip_steps": [12]})
    assert fresh["train"]["resume"] == "" and fresh["ckpt"]["interval"] == 0
    assert fresh["train"]["skip_steps"] == [12]
    late = launch_config(_plan(cfg, 20, tmp_path / "c"), tmp_path / "out")
    assert late["faults"]["kill_step"] == 13  # outside the replayed range: untouched


def test_verify_data_names_what_changed(tmp_path: Path) -> None:
    packed = make_packed(tmp_path / "packed")
    from k2repro.data.packed import PackedDataset

    rows = [{"artifact": a["artifact"], "path": str(packed / a["path"]), "sha256": a["sha256"]}
            for a in PackedDataset(packed).artifacts()]
    rows.append({"artifact": "dedup/train", "path": "not-on-this-machine/dedup/train.jsonl", "sha256": "0" * 64})
    sink = AuditSink(tmp_path / "store", "r1")
    sink.start({"name": "r1"}, {}, {}, rows)
    sink.close()
    with open_store(tmp_path / "store") as s:
        checked = verify_data(s, "r1", str(packed))
        assert "packed/train.bin" in checked and "dedup/train" not in checked  # not on this machine
        docs = packed / "val.docs.parquet"
        docs.write_bytes(docs.read_bytes() + b"\0")
        with pytest.raises(BadInputError, match="packed/val.docs .*changed since run 'r1'"):
            verify_data(s, "r1", str(packed))
        docs.unlink()
        (packed / "train.bin").unlink()
        with pytest.raises(BadInputError, match="packed/train.bin of run 'r1' is missing"):
            verify_data(s, "r1", str(packed))


def test_text_report_names_the_divergence() -> None:
    from k2repro.cli.replay import render_text

    rep = {"run_id": "a", "replay_run_id": "b", "from_step": 21, "to_step": 30, "start_step": 20,
           "checkpoint": "ck/step_00000020", "replay_world_size": 2, "world_size": 2, "steps_compared": 10,
           "rerun_not_compared": [], "bit_exact": False, "tolerance": 0.0, "within_tolerance": False,
           "first_divergence_step": 26, "first_divergence_signal": "loss", "first_bitwise_divergence_step": 26,
           "first_bitwise_divergence_signal": "loss", "missing_steps": [], "max_abs_diff": 0.5,
           "max_rel_diff": 0.1, "exit_code": 1}
    text = render_text(rep)
    assert "first divergence: step 26 (loss)" in text and text.endswith("NOT REPRODUCED")
    assert "checkpoint of step 20 (ck/step_00000020)" in text
    ok = render_text({**rep, "bit_exact": True, "within_tolerance": True, "first_divergence_step": None,
                      "first_bitwise_divergence_step": None, "exit_code": 0})
    assert "bit-exact:    yes" in ok and ok.endswith("REPRODUCED") and "NOT" not in ok
