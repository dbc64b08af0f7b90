"""Issue 23's findings on the tools side (eval, diff, forensics, runs, config, callback), one
test per finding, on small stores written by the real sink or the synthetic run writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from k2repro.audit.sink import AuditSink
from k2repro.audit.store import open_store
from k2repro.errors import BadInputError
from k2repro.forensics.attribute import DataParams, rank_step_samples
from k2repro.tools.diff import diff_runs, render_md, render_text
from tests.conftest import k2, tiny_overrides


def _write(store: Path, run_id: str, source: str, hparams: dict, steps: dict, name: str | None = None,
           parent: str | None = None) -> None:
    sink = AuditSink(store, run_id)
    sink.start({"name": name or run_id, "source": source, "parent_run_id": parent}, hparams, {}, [])
    sink.log_steps(steps)
    sink.flush()
    sink.close()


# -- item 8: no "none" divergence for what cannot be compared; signed excess; top samples


def test_diff_does_not_claim_no_batch_divergence_when_hashes_cannot_be_compared(tmp_path: Path) -> None:
    steps = {"step": [1, 2, 3], "loss": [3.0, 2.5, 2.0], "grad_norm": [1.0, 1.0, 1.0]}
    _write(tmp_path, "hf-a", "api:transformers", {"trainer.learning_rate": 1e-3}, steps)
    _write(tmp_path, "hf-b", "api:transformers", {"trainer.learning_rate": 1e-3}, steps)
    with open_store(tmp_path) as s:
        d = diff_runs(s, "hf-a", s, "hf-b")
    assert any(x.startswith("batch_hash:") for x in d["cannot_compare"])
    for text in (render_text(d), render_md(d)):
        line = next(ln for ln in text.splitlines() if "first batch_hash divergence" in ln)
        assert "none" not in line and "not compared" in line, line
        # loss was compared on both sides: "none" is a finding there
        assert "first loss divergence (bitwise): none" in text


def test_top_samples_are_above_the_step_median_and_the_sign_is_printed_once() -> None:
    # a batch of 6 (smaller than top_n=10): 2 bad samples, 4 ordinary ones
    loss = np.array([9.0, 8.5, 3.0, 3.1, 2.9, 3.05])
    ss = pd.DataFrame({"step": 50, "sample_id": np.arange(6), "loss": loss})
    da = rank_step_samples(ss, typical=3.0, noise=0.05, p=DataParams())
    med = float(np.median(loss))
    assert da.samples, da
    assert all(s["loss"] > med or s["outlier"] for s in da.samples), da.samples
    assert {s["sample_id"] for s in da.samples[:2]} == {0, 1}
    from k2repro.forensics.report import _signed

    assert _signed(-0.7307) == "-0.7307" and _signed(0.5) == "+0.5"


# -- item 6: an exact name wins over a prefix; a replay or resumed child never steals the name


def test_name_beats_prefix_and_children_do_not_steal_their_parents_name(tmp_path: Path) -> None:
    steps = {"step": [1, 2], "loss": [3.0, 2.0]}
    parent = "mine-lr3e-3-20261204-050000-aaaaaa"
    _write(tmp_path, parent, "train", {}, steps, name="mine-lr3e-3")
    # a replay: its id starts with the parent's name
    _write(tmp_path, "mine-lr3e-3-replay-20261204-051000-bbbbbb", "replay", {}, steps,
           name="mine-lr3e-3-replay", parent=parent)
    # a resumed run keeps the name
    _write(tmp_path, "mine-lr3e-3-20261204-052000-cccccc", "train", {}, {"step": [3], "loss": [1.5]},
           name="mine-lr3e-3", parent=parent)
    with open_store(tmp_path) as s:
        assert s.resolve_run_id("mine-lr3e-3") == parent
        assert s.resolve_run_id("mine-lr3e-3-replay") == "mine-lr3e-3-replay-20261204-051000-bbbbbb"
        # the query helpers resolve names as the CLI does
        assert s.steps("mine-lr3e-3")["step"].tolist() == [1, 2]
        assert s.run("mine-lr3e-3")["run_id"] == parent
        with pytest.raises(BadInputError, match="ambiguous"):
            s.resolve_run_id("mine-lr3e-3-2026")


# -- item 12: no command is a usage error; a short train.seq_len is warned about and recorded


def test_no_command_prints_help_and_exits_2(capsys) -> None:  # noqa: ANN001
    from k2repro.cli.main import main

    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: k2repro" in err and "COMMAND" in err


def test_packed_window_note_says_what_a_short_seq_len_drops() -> None:
    from k2repro.config.load import packed_window_note

    assert packed_window_note(128, 128, "data/packed") is None
    note = packed_window_note(64, 128, "data/packed")
    assert note is not None and note["share_used"] == round(65 / 129, 4)
    assert "train.seq_len=64" in note["message"] and "65 of 129" in note["message"]


def test_short_seq_len_warns_once_and_is_recorded_and_errors_print_no_run_id(packed_dir: Path,
                                                                              tmp_path: Path) -> None:
    store = tmp_path / "store"
    # packed at 32: train.seq_len=64 is a data error found after the config loads
    r = k2("train", *tiny_overrides(packed_dir, store, **{"train.seq_len": 64}))
    assert r.returncode == 2 and "train.seq_len" in r.stderr
    assert "run_id=" not in r.stdout, r.stdout
    r = k2("train", *tiny_overrides(packed_dir, store, **{"train.seq_len": 16, "train.max_steps": 2}))
    assert r.returncode == 0, r.stderr
    warns = [ln for ln in r.stderr.splitlines() if "train.seq_len=16" in ln]
    assert len(warns) == 1 and "17 of 33" in warns[0], r.stderr
    with open_store(store) as s:
        rid = s.runs()["run_id"].iloc[0]
        ev = s.events(rid, "data_window_cut")
    assert len(ev) == 1 and '"packed_seq_len": 32' in ev["detail"].iloc[0]


# -- item 11: Hydra's whole message with the choices; --print-config / --cfg job


def test_config_errors_show_hydras_message_and_the_choices(capsys) -> None:  # noqa: ANN001
    from k2repro.cli.main import main

    assert main(["train", "data.txt_field=content"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Could not override 'data.txt_field'" in err and "did you mean data.text_field?" in err
    assert "+data.txt_field=content" in err  # Hydra's own hint survives
    assert main(["train", "model=tinyy"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "available options in 'model': 1b, k2_65b, small, tiny" in err and "did you mean model=tiny?" in err
    assert "Config search path" not in err


def test_print_config_prints_the_resolved_config_that_params_loads_back(capsys, tmp_path: Path) -> None:  # noqa: ANN001
    from k2repro.cli.main import main
    from k2repro.config.load import load_config, load_params_file

    for flag in (["--cfg", "job"], ["--print-config"]):
        assert main(["train", *flag, "model=small", "train.max_steps=7"]) == 0
        out = capsys.readouterr().out
        assert "max_steps: 7" in out and "name: small" in out and "run_id=" not in out
    (tmp_path / "p.yaml").write_text(out)
    assert load_params_file(tmp_path / "p.yaml") == load_config(["model=small", "train.max_steps=7"])
    assert main(["train", "--cfg", "hydra"]) == 2
    assert "only 'job' is supported" in capsys.readouterr().err


# -- item 7: eval (and replay) say at once, in one line, what they can do for an API run


def test_eval_and_replay_on_an_api_run_say_at_once_what_they_can_and_cannot_do(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from k2repro.audit import start
    from k2repro.cli.main import main

    store = tmp_path / "store"
    cfg = {"trainer": {"learning_rate": 1e-3, "output_dir": "out", **{f"opt_{i}": i for i in range(60)}},
           "model": {"hidden_size": 16}}
    with start(store, config=cfg, name="hf-mine", source="api:transformers", rank=0, world_size=1) as run:
        for step in (1, 2, 3):
            run.log_step(step, loss=3.0 / step)
            ck = tmp_path / "out" / f"checkpoint-{step}"
            ck.mkdir(parents=True)
            run.log_checkpoint(step, ck)
    for argv in (["eval", "hf-mine"], ["replay", "hf-mine", "--from-step", "1", "--to-step", "2"]):
        assert main([*argv, "--store", str(store)]) == 2
        err = capsys.readouterr().err.strip()
        if argv[0] == "eval":
            assert "its 3 recorded checkpoint(s) are that loop's own folders" in err, err
        assert len(err.splitlines()) == 1, err
        assert "recorded by another training loop through the audit API (api:transformers)" in err
        assert "can: runs, sql, diff, forensics, report; cannot: eval, replay" in err
        assert "config keys unknown" not in err and "ckpt.interval" not in err
