"""Issue 23's findings on the tools side (eval, diff, forensics, runs, config, callback), one
test per finding, on small stores written by the real sink or the synthetic run writer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from k2repro.audit.sink import AuditSink
from k2repro.audit.store import open_store
from k2repro.errors import BadInputError
from k2repro.forensics.attribute import DataParams, rank_step_samples
from k2repro.tools.diff import diff_runs, render_md, render_text
from tests.conftest import tiny_overrides


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
    import json
    import subprocess
    import sys

    store = tmp_path / "store"
    # one process for both launches (one torch import): packed at 32, train.seq_len=64 is a data
    # error found after the config loads; train.seq_len=16 trains on half of every window
    script = ("import contextlib, io, json, sys\n"
              "from k2repro.cli.main import main\n"
              "res = []\n"
              "for argv in json.loads(sys.argv[1]):\n"
              "    out, err = io.StringIO(), io.StringIO()\n"
              "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
              "        rc = main(['train', *argv])\n"
              "    res.append([rc, out.getvalue(), err.getvalue()])\n"
              "print('RESULT ' + json.dumps(res))\n")
    launches = [tiny_overrides(packed_dir, store, **{"train.seq_len": 64}),
                tiny_overrides(packed_dir, store, **{"train.seq_len": 16, "train.max_steps": 2})]
    p = subprocess.run([sys.executable, "-c", script, json.dumps(launches)], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    (rc, out, err), (rc2, out2, err2) = json.loads(p.stdout.split("RESULT ", 1)[1])
    assert rc == 2 and "train.seq_len" in err and "run_id=" not in out, (out, err)
    assert rc2 == 0 and "run_id=" in out2, err2
    warns = [ln for ln in err2.splitlines() if "train.seq_len=16" in ln]
    assert len(warns) == 1 and "17 of 33" in warns[0], err2
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
    # (data.id_field, issue 22, is as close to the typo; the suggestion names both)
    assert "Could not override 'data.txt_field'" in err and "did you mean data.text_field or data.id_field?" in err
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
    import json

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
    # batch works, with less: it says so in one line on stderr, and --json stays one object
    assert main(["batch", "hf-mine", "--step", "2", "--store", str(store), "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["step"] == 2
    assert len(cap.err.strip().splitlines()) == 1 and "`batch` shows only the sample ids" in cap.err, cap.err


# -- item 13: eval and forensics show their phases on stderr; --json stays clean


def test_forensics_shows_its_phases_on_stderr_and_keeps_json_clean(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    import json

    from k2repro.cli.main import main
    from k2repro.forensics.synthetic import InjectedSpike, SyntheticRun, write_run

    write_run(tmp_path / "s", SyntheticRun(run_id="phases", n_steps=200, seed=3,
                                           spikes=(InjectedSpike("bad_batch", 120),)))
    assert main(["forensics", "phases", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "o"),
                 "--json", "--no-html", "--no-spike-rows"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["run_id"] == "phases"
    err = cap.err
    assert "forensics phases: detecting episodes" in err
    assert "forensics phases: 200 steps read, 1 episode(s) analysed" in err
    assert "forensics phases: writing reports to" in err


def test_progress_is_plain_lines_off_a_terminal_and_a_live_bar_on_one() -> None:
    import io

    from k2repro.progress import Progress

    plain = io.StringIO()
    with Progress("eval r", stream=plain) as p:
        p.total(2)
        p("loading weights")
        p.advance()
        p.note("step 1 done")
    assert plain.getvalue().splitlines() == ["eval r: loading weights", "step 1 done"]
    tty = io.StringIO()
    with Progress("eval r", stream=tty, fancy=True) as p:
        assert p.fancy
        p.total(2)
        p("loading weights")
        p.advance()
        p.note("step 1 done")
    assert "step 1 done" in tty.getvalue() and "\x1b[" in tty.getvalue()  # rich drew on the terminal


# -- item 9: forensics shows (and measures) what the model trained on, not the displaced sample


def test_a_replaced_sample_shows_the_decoded_tokens_the_model_trained_on(tmp_path: Path) -> None:
    import json

    import k2repro
    from k2repro.data.dedup import dedup
    from k2repro.data.pack import pack, sample_text
    from k2repro.data.packed import PackedDataset
    from k2repro.data.prepare import prepare
    from k2repro.data.tokenizer import decode, load_tokenizer, train_tokenizer
    from k2repro.forensics.analyze import analyze_run
    from k2repro.forensics.report import write_reports
    from k2repro.forensics.synthetic import InjectedSpike, SyntheticRun, write_run
    from k2repro.forensics.textfeat import token_features
    from k2repro.train.faults import inject_bad_batch
    from tests.conftest import REPO

    w = tmp_path / "work"
    prepare(REPO / "data" / "sample", w / "prepared", max_docs=30, val_fraction=0.1)
    dedup(w / "prepared", w / "dedup")
    train_tokenizer(w / "dedup", w / "tokenizer", vocab_size=300, min_frequency=2)
    pack(w / "dedup", w / "tokenizer", w / "packed", seq_len=32)
    ds = PackedDataset(w / "packed", "train")
    write_run(tmp_path / "s", SyntheticRun(
        run_id="inj", n_steps=200, seed=5, batch=8, sample_id_mod=len(ds),
        extra_hparams={"data.packed_dir": str(w / "packed")}, spikes=(InjectedSpike("bad_batch", 120),)))
    with k2repro.open_store(tmp_path / "s") as s:
        res = analyze_run(s, "inj")
        d = json.loads(s.events("inj", "fault_injected")["detail"].iloc[0])
    sp = [x for x in res.spikes if x.data and x.data.verdict == "data"][0]
    assert sp.data.step == 120
    # what the trainer fed the model at step 120: its own injection applied to the packed batch
    ids = [((120 - 1) * 8 + j) % len(ds) for j in range(8)]  # the synthetic run's batch at step 120
    trained = inject_bad_batch(ds.get(ids), np.arange(8), np.array(d["positions"]), 5, d["data_position"],
                               ds.vocab_size, d["bad_batch_kind"])
    tok = load_tokenizer(w / "tokenizer")
    replaced = [x for x in sp.data.samples if x.get("injected")]
    assert replaced and len(replaced) == len(d["sample_ids"])
    for smp in replaced:
        row = trained[d["positions"][d["sample_ids"].index(smp["sample_id"])]]
        assert smp.get("replaced") is True
        assert smp["text"] == decode(tok, row).strip("\ufffd")[: len(smp["text"])]
        original = "\n".join(x["snippet"] for x in sample_text(w / "packed", "train", smp["sample_id"]))
        assert smp["text"] != original[: len(smp["text"])]
        assert {k: smp["features"][k] for k in token_features(row)} == token_features(row)
    html = write_reports(res, tmp_path / "out")["html"].read_text(encoding="utf-8")
    assert "what the model trained on" in html and "the original sample; the fault replaced it" not in html


# -- item 16: `make bench` installs the peers and stops loudly when one does not import


def test_bench_installs_its_peers_and_a_missing_peer_stops_the_logger_comparison(monkeypatch, capsys) -> None:  # noqa: ANN001
    import re
    import sys

    from tests.conftest import REPO

    make = (REPO / "Makefile").read_text()
    recipe = re.search(r"^bench: (.+)$", make, re.M)
    assert recipe, "no bench target"
    stamp = recipe.group(1).split()[0]
    rule = re.search(rf"^{re.escape(stamp)}:.*\n((?:\t.*\n)+)", make, re.M)
    assert rule and "pip install" in rule.group(1) and "bench]" in rule.group(1), rule
    from bench import logger_throughput as lt

    monkeypatch.setitem(sys.modules, "wandb", None)  # what an install without the extra looks like
    assert lt.check_peers(["wandb_offline"]) == 1
    err = capsys.readouterr().err
    assert "peer 'wandb_offline' cannot run (wandb: ModuleNotFoundError" in err and "bench extra" in err


def test_a_params_file_with_an_unknown_key_names_the_closest_one(tmp_path: Path) -> None:
    # what `dvc exp run -S data.txt_field=content` leaves in params.yaml
    from k2repro.config.load import load_params_file
    from k2repro.errors import ConfigError

    (tmp_path / "params.yaml").write_text("data:\n  txt_field: content\n")
    with pytest.raises(ConfigError, match=r"did you mean data\.text_field or data\.id_field\?; keys of data: name, source"):
        load_params_file(tmp_path / "params.yaml")
