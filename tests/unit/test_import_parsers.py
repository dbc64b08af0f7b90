"""Importers' parsers on fixtures written by the tests: what each source yields (steps,
metrics, hparams, events), and the one error (file + line) for malformed input."""

from __future__ import annotations

import json
import math

import pytest

from k2repro.errors import BadInputError
from k2repro.importers import generic, megatron_log, tensorboard, wandb_csv
from k2repro.importers.names import NameMap
from k2repro.importers.wandb_csv import StepAxis
from tests.integration.import_fixtures import (
    loss_curve,
    megatron_line,
    tb_event,
    tf_record,
    write_generic_csv,
    write_generic_jsonl,
    write_megatron_log,
    write_tb_file,
    write_wandb_csv,
)

NAMES = NameMap.build()


def col(run, name):
    return run.columns[name].to_pylist()


def steps(run):
    return run.steps.to_pylist()


# ----------------------------------------------------------------------------- name table

def test_name_map_defaults_and_both_map_orders():
    assert NAMES.target("lm loss") == ("loss", 1.0)
    assert NAMES.target("Grad-Norm") == ("grad_norm", 1.0)
    assert NAMES.target("learning-rate") == ("lr", 1.0)
    assert NAMES.target("loss-scale") == ("loss_scale", 1.0)
    assert NAMES.target("elapsed time per iteration (ms)") == ("step_time_s", 1e-3)
    assert NAMES.target("something/else") == ("something/else", 1.0)
    m = NameMap.build(["step=iter,loss=train/custom", "my-gn=grad_norm", "noise="])
    assert m.target("iter") == ("step", 1.0)            # TARGET=SOURCE (generic CSV form)
    assert m.target("train/custom") == ("loss", 1.0)
    assert m.target("my-gn") == ("grad_norm", 1.0)      # SOURCE=TARGET (W&B old=new form)
    assert m.target("noise") == (None, 1.0)             # dropped
    assert m.user_pairs() == {"iter": "step", "train/custom": "loss", "my-gn": "grad_norm", "noise": None}
    with pytest.raises(BadInputError, match="--map"):
        NameMap.build(["nonsense"])


# ----------------------------------------------------------------------------- W&B

def test_wandb_two_runs_envelope_and_sampling(tmp_path):
    p = tmp_path / "export.csv"
    truth = write_wandb_csv(p)
    runs = {r.source_run: r for r in wandb_csv.read(p, NAMES, StepAxis())}
    assert set(runs) == {"k2-stage1", "k2-stage2"}
    a, b = runs["k2-stage1"], runs["k2-stage2"]
    assert steps(a) == list(range(1, 121))
    assert col(a, "loss") == [truth["a"][s] for s in range(1, 121)]   # exact float64 round trip
    assert col(a, "lr") == [3e-4] * 120 and "grad_norm" in a.columns
    # empty cells: stage2 has points only where it logged
    assert steps(b) == sorted(truth["b"]) and col(b, "loss") == [truth["b"][s] for s in sorted(truth["b"])]
    # the envelope is kept as metrics series, unmapped metrics under their own name
    lo = b.metrics["loss__MIN"][1].to_pylist()
    assert lo == pytest.approx([truth["b"][s] - 0.05 for s in sorted(truth["b"])])
    assert b.metrics["loss__MAX"][0].to_pylist() == sorted(truth["b"])
    # stage1's envelope equals its value everywhere: it says nothing and is not stored
    assert set(a.metrics) == {"throughput/weird"} and "throughput/weird__MAX" in b.metrics
    assert a.hparams["import.sampled"] is False and a.hparams["import.step_interval"] == 1
    assert b.hparams["import.sampled"] is True and "__MIN < __MAX" in b.hparams["import.sampled_reason"]
    assert [e["kind"] for e in b.events] == ["import_sampled"] and not a.events
    assert a.content_sha256 == b.content_sha256 and a.hparams["import.source_run"] == "k2-stage1"


def test_wandb_run_selection_and_step_units(tmp_path):
    p = tmp_path / "export.csv"
    write_wandb_csv(p)
    only = wandb_csv.read(p, NAMES, StepAxis(), select_run="k2-stage2")
    assert [r.source_run for r in only] == ["k2-stage2"]
    with pytest.raises(BadInputError, match="no run 'nope'.*k2-stage1, k2-stage2"):
        wandb_csv.read(p, NAMES, StepAxis(), select_run="nope")
    # a step axis counting tokens: 8 samples x 4 tokens per step
    q = tmp_path / "tokens.csv"
    q.write_text('"Step","r - lm loss"\n32,3.0\n64,2.5\n96,2.25\n')
    r = wandb_csv.read(q, NAMES, StepAxis(unit="token", global_batch=8, seq_len=4))[0]
    assert steps(r) == [1, 2, 3] and col(r, "loss") == [3.0, 2.5, 2.25]
    assert r.hparams["import.step_divisor"] == 32.0
    r = wandb_csv.read(q, NAMES, StepAxis(unit="sample", global_batch=32))[0]
    assert steps(r) == [1, 2, 3]
    r = wandb_csv.read(q, NAMES, StepAxis(divisor=16, offset=-1))[0]
    assert steps(r) == [1, 3, 5]
    with pytest.raises(BadInputError, match=r"tokens\.csv:2: Step 32 is not a whole number \(step axis / 24\)"):
        wandb_csv.read(q, NAMES, StepAxis(divisor=24))
    with pytest.raises(BadInputError, match="needs --global-batch and --seq-len"):
        wandb_csv.read(q, NAMES, StepAxis(unit="token", global_batch=8))
    z = tmp_path / "zero.csv"
    z.write_text('"Step","r - loss"\n0,3.0\n1,2.0\n')
    with pytest.raises(BadInputError, match=r"zero\.csv:2: Step 0: steps are numbered from 1"):
        wandb_csv.read(z, NAMES, StepAxis())
    assert steps(wandb_csv.read(z, NAMES, StepAxis(offset=1))[0]) == [1, 2]


@pytest.mark.parametrize("text,line,what", [
    ('"Step","loss"\n1,2\n', 1, "wrong header: column 'loss' is not '<run> - <metric>'"),
    ('"Step","r - loss"\n1,2\n2,abc\n', 3, "'abc' is not a number"),
    ('"Step","r - loss","r - lr"\n1,2,3\n2,3\n3,4,5\n', 3, "expected 3 fields, found 2"),
    ('"Step","r - loss"\n1,2\n3,2\n2,2\n', 4, "Step goes back (3 then 2)"),
    ('"Step","r - loss"\n1,2\n1,2\n', 3, "Step repeats"),
    ('', 1, "the file is empty"),
])
def test_wandb_malformed(tmp_path, text, line, what):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(BadInputError) as ei:
        wandb_csv.read(p, NAMES, StepAxis())
    assert str(ei.value).startswith(f"{p}:{line}: ") and what in str(ei.value)


# ----------------------------------------------------------------------------- Megatron-LM

def test_megatron_log_spike_skip_restart(tmp_path):
    p = tmp_path / "train.log"
    truth = write_megatron_log(p)
    (run,) = megatron_log.read(p, NAMES)
    assert steps(run) == list(range(1, 121))
    loss = dict(zip(steps(run), col(run, "loss"), strict=True))
    assert loss[truth["skip_at"]] is None                        # Megatron prints no loss then
    for s, v in truth["loss"].items():
        assert loss[s] == pytest.approx(v, rel=1e-6)             # printed with 7 digits
    assert loss[truth["spike_at"]] > loss[truth["spike_at"] - 1] + 2.5
    # the restart keeps the later values (they differ by +0.001 in the fixture)
    assert loss[98] == pytest.approx(truth["loss"][98], rel=1e-6)
    skipped = dict(zip(steps(run), col(run, "skipped"), strict=True))
    assert [s for s, v in skipped.items() if v] == [truth["skip_at"]]
    kinds = [(e["kind"], e["step"]) for e in run.events]
    assert ("skip", 50) in kinds and ("restart", 96) in kinds
    rs = next(e for e in run.events if e["kind"] == "restart")
    assert rs["detail"]["replaced_steps"] == 5 and rs["detail"]["previous_last_step"] == 100
    assert rs["detail"]["changed_args"] == ["load"]
    # units and columns
    assert col(run, "step_time_s")[0] == pytest.approx(1.2355)
    assert col(run, "n_samples")[0] == 8 and col(run, "tokens")[0] == 8 * 2048
    assert run.metrics["loss_scale"][1].to_pylist()[49] == 32768.0
    assert run.metrics["consumed_samples"][1].to_pylist()[:2] == [8.0, 16.0]
    # the arguments block (the later one after the restart), typed
    h = run.hparams
    assert h["args.seq_length"] == 2048 and h["args.fp16"] is True and h["args.load"] == "/ckpt"
    assert h["args.data_path"] == ["/data/a", "/data/b"] and h["args.lr"] == 0.0003
    assert run.world_size == 8 and h["import.restarts"] == 1
    # timestamps -> steps.time and the run's start; validation lines -> evals
    assert run.started_at == pytest.approx(1704110403.0)
    assert ("val/loss" in {m for _, m, _ in run.evals}) and (25, "val/ppl") in {(s, m) for s, m, _ in run.evals}


@pytest.mark.parametrize("prefix", ["", "2024-03-05T10:11:12.123Z ", "[rank0]: 2024-03-05 10:11:12,5 | "])
def test_megatron_prefixes_and_noise(tmp_path, prefix):
    lines = ["some other output", "iteration is a word here too",
             prefix + megatron_line(1, 3, 3.0),
             "WARNING: interleaved", prefix + megatron_line(2, 3, 2.5), prefix + megatron_line(3, 3, 2.0)]
    p = tmp_path / "a.log"
    p.write_text("\n".join(lines))
    (run,) = megatron_log.read(p, NAMES)
    assert steps(run) == [1, 2, 3] and col(run, "loss") == [3.0, 2.5, 2.0]
    if prefix:
        assert run.started_at is not None and math.isclose(run.started_at % 60, 12.0, abs_tol=0.6)
    else:
        assert "time" not in run.columns and not run.hparams.get("args.seed")


@pytest.mark.parametrize("mutate,line,what", [
    (lambda ls: ls.__setitem__(3, ls[3][:60]), 4, "truncated iteration line"),
    (lambda ls: ls.__setitem__(3, ls[3].replace("lm loss: 2.500000E+00", "lm loss: 2.5x")), 4,
     "'lm loss': '2.5x' is not a number"),
    (lambda ls: ls.insert(4, megatron_line(1, 3, 1.0)), 5, "iteration 1 goes back"),
    (lambda ls: ls.insert(4, megatron_line(2, 3, 1.0)), 5, "iteration 2 repeats"),
    (lambda ls: ls.append("------------------------ arguments ------------------------"), 6,
     "truncated arguments block"),
])
def test_megatron_malformed(tmp_path, mutate, line, what):
    lines = ["x", "y", megatron_line(1, 3, 3.0), megatron_line(2, 3, 2.5), megatron_line(3, 3, 2.0)]
    mutate(lines)
    p = tmp_path / "bad.log"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadInputError) as ei:
        megatron_log.read(p, NAMES)
    assert str(ei.value).startswith(f"{p}:{line}: ") and what in str(ei.value)


def test_megatron_no_iterations_is_an_error(tmp_path):
    p = tmp_path / "empty.log"
    p.write_text("hello\nworld\n")
    with pytest.raises(BadInputError, match="no Megatron 'iteration"):
        megatron_log.read(p, NAMES)


# ----------------------------------------------------------------------------- TensorBoard

@pytest.mark.parametrize("style", ["simple", "tensor"])
def test_tensorboard_scalars(tmp_path, style):
    curve = loss_curve(60, 40)
    d = tmp_path / "tb"
    write_tb_file(d / "events.out.tfevents.1.h", {"train/loss": curve, "learning-rate": {s: 1e-3 for s in curve},
                                                   "eval/acc": {10: 0.5, 20: 0.75}}, style=style)
    (run,) = tensorboard.read(d, NAMES)
    assert steps(run) == list(range(1, 61))
    assert col(run, "loss") == pytest.approx([curve[s] for s in range(1, 61)], rel=1e-7)  # float32
    assert col(run, "lr") == pytest.approx([1e-3] * 60, rel=1e-7)
    assert run.metrics["eval/acc"][0].to_pylist() == [10, 20]
    assert run.started_at == pytest.approx(1.7e9 + 1) and run.source_run is None


def test_tensorboard_restart_across_files_and_dirs(tmp_path):
    d = tmp_path / "tb"
    write_tb_file(d / "a" / "events.out.tfevents.1.h", {"loss": {s: 1.0 * s for s in range(1, 31)}}, wall0=1000.0)
    # the resumed job's file starts later and rewrites steps 26..40
    write_tb_file(d / "a" / "events.out.tfevents.2.h", {"loss": {s: 100.0 + s for s in range(26, 41)}},
                  wall0=5000.0)
    write_tb_file(d / "b" / "events.out.tfevents.1.h", {"loss": {1: 2.0, 2: 1.0}})
    runs = {r.source_run: r for r in tensorboard.read(d, NAMES)}
    assert set(runs) == {"a", "b"}
    a = runs["a"]
    assert steps(a) == list(range(1, 41))
    assert col(a, "loss")[24] == 25.0 and col(a, "loss")[25] == 126.0
    (rs,) = [e for e in a.events if e["kind"] == "restart"]
    assert rs["step"] == 26 and rs["detail"]["replaced_points"] == 5
    assert rs["detail"]["marker"] == "new event file"


def test_tensorboard_malformed(tmp_path):
    f = tmp_path / "events.out.tfevents.1.h"
    write_tb_file(f, {"loss": {1: 3.0, 2: 2.0, 3: 1.0}})
    data = f.read_bytes()
    f.write_bytes(data[:-7])
    with pytest.raises(BadInputError, match=r"events\.out\.tfevents\.1\.h: record 4 \(byte \d+\): truncated record"):
        tensorboard.read(f, NAMES)
    f.write_bytes(data[:-3] + bytes([data[-3] ^ 1]) + data[-2:])
    with pytest.raises(BadInputError, match="record 4 .*data checksum mismatch"):
        tensorboard.read(f, NAMES)
    # a step that goes back inside one file, without a SessionLog START
    recs = [tf_record(tb_event(s, 1.0 + i, "loss", 1.0)) for i, s in enumerate([1, 2, 3, 2])]
    f.write_bytes(b"".join(recs))
    with pytest.raises(BadInputError, match=r"record 4: tag 'loss' step goes back \(3 then 2\)"):
        tensorboard.read(f, NAMES)
    # ... which a SessionLog START makes a restart
    recs.insert(3, tf_record(tb_event(2, 3.5, session_start=True)))
    f.write_bytes(b"".join(recs))
    (run,) = tensorboard.read(f, NAMES)
    assert steps(run) == [1, 2] and [e["kind"] for e in run.events] == ["restart"]
    (tmp_path / "notb").mkdir()
    with pytest.raises(BadInputError, match="no TensorBoard event files"):
        tensorboard.read(tmp_path / "notb", NAMES)


def test_tensorboard_reads_what_tensorboardx_writes(tmp_path):
    """Cross-check against a real writer (the `bench` extra's tensorboardX), when installed."""
    import tensorboardX as tbx  # the dev extra installs it
    w = tbx.SummaryWriter(str(tmp_path / "run"))
    for s in range(1, 21):
        w.add_scalar("train/loss", 5.0 / s, s)
        w.add_scalar("grad-norm", 0.5, s)
    w.add_histogram("weights", [1.0, 2.0, 3.0], 5)
    w.add_text("note", "hello", 1)
    w.close()
    (run,) = tensorboard.read(tmp_path / "run", NAMES)
    assert steps(run) == list(range(1, 21))
    assert col(run, "loss") == pytest.approx([5.0 / s for s in range(1, 21)], rel=1e-7)
    assert set(run.metrics) == set()  # histogram and text are not scalars


# ----------------------------------------------------------------------------- generic

def test_generic_csv_and_jsonl(tmp_path):
    p = tmp_path / "m.csv"
    curve = write_generic_csv(p)
    (run,) = generic.read(p, NAMES)
    assert steps(run) == list(range(1, 121)) and col(run, "loss") == [curve[s] for s in range(1, 121)]
    assert run.metrics["my_metric"][1].to_pylist()[:2] == [0.5, 1.0]
    assert run.hparams["import.dropped_columns"] == ["note"] and run.hparams["import.step_column"] == "iter"
    q = tmp_path / "m.jsonl"
    curve = write_generic_jsonl(q)
    (run,) = generic.read(q, NameMap.build(["loss=train.loss"]))
    assert col(run, "loss") == [curve[s] for s in range(1, 121)] and run.hparams["import.format"] == "jsonl"
    assert "tag" not in run.metrics and run.hparams["import.dropped_columns"] == ["tag"]


@pytest.mark.parametrize("name,text,line,what", [
    ("a.csv", "when,loss\n1,2\n", 1, "no step column"),
    ("a.csv", "step,loss\n1,2\n2,x\n", 3, "column 'loss': 'x' is not a number"),
    ("a.csv", "step,loss,lr\n1,2,3\n2,3\n", 3, "expected 3 fields, found 2"),
    ("a.csv", "step,loss\n1,2\n\n5,2\n4,2\n", 5, "step goes back (5 then 4)"),
    ("a.csv", "step,loss\n1,2\n,2\n", 3, "step value missing"),
    ("a.jsonl", '{"step": 1, "loss": 2}\n{"step": 2, "loss": 1', 2, "not a JSON object"),
    ("a.jsonl", '{"step": 1, "loss": 2}\n{"step": 2, "loss": "high"}\n', 2, "'high' is not a number"),
    ("a.jsonl", '{"step": 2, "loss": 2}\n\n{"step": 1, "loss": 1}\n', 3, "step goes back"),
    ("a.jsonl", '[1, 2]\n', 1, "expected a JSON object"),
])
def test_generic_malformed(tmp_path, name, text, line, what):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(BadInputError) as ei:
        generic.read(p, NAMES)
    assert str(ei.value).startswith(f"{p}:{line}: ") and what in str(ei.value), str(ei.value)


def test_generic_nan_values_are_kept_and_reported(tmp_path):
    p = tmp_path / "n.jsonl"
    p.write_text("\n".join(json.dumps({"step": s, "loss": v}) for s, v in [(1, 2.0), (2, float("nan")), (3, 1.0)]))
    (run,) = generic.read(p, NAMES)
    loss = col(run, "loss")
    assert math.isnan(loss[1]) and [e["step"] for e in run.events if e["kind"] == "nan"] == [2]


@pytest.mark.parametrize("name,text", [
    ("t.csv", "step,loss,time,skipped\n1,2.0,2024-01-01T00:00:00Z,false\n2,1.5,2024-01-01T00:00:10Z,true\n"),
    ("t.jsonl", '{"step":1,"loss":2,"time":"2024-01-01T00:00:00+00:00","skipped":false}\n'
                '{"step":2,"loss":1.5,"time":"2024-01-01T00:00:10+00:00","skipped":true}\n'),
    ("e.csv", "step,loss,_timestamp,skipped\n1,2.0,1704067200,0\n2,1.5,1704067210,1\n"),
])
def test_generic_time_and_skipped_columns(tmp_path, name, text):
    from k2repro.importers.tables import _steps_table

    p = tmp_path / name
    p.write_text(text)
    (run,) = generic.read(p, NAMES)
    t = _steps_table(run)
    assert [x.timestamp() for x in t.column("time").to_pylist()] == [1704067200.0, 1704067210.0]
    assert t.column("skipped").to_pylist() == [False, True]
    assert run.started_at == 1704067200.0 and run.ended_at == 1704067210.0


def test_import_help_lists_every_kind(capsys):
    from k2repro.cli.main import main

    with pytest.raises(SystemExit) as ei:
        main(["import", "--help"])
    out = capsys.readouterr().out
    assert ei.value.code == 0 and all(k in out for k in ("wandb-csv", "tensorboard", "megatron-log", "csv"))
    with pytest.raises(SystemExit) as ei:
        main(["import", "wandb-csv", "--help"])
    out = capsys.readouterr().out
    assert ei.value.code == 0 and "--step-unit" in out and "--run" in out
