"""`k2repro import` end to end: fixtures in every format imported through the real CLI, the
store's view of them (status, source, redaction), forensics on an imported run, idempotent
re-imports, and malformed input: exit 2, the line named, the store's bytes unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from k2repro.cli.main import main
from tests.conftest import REPO, k2
from tests.integration.import_fixtures import (
    loss_curve,
    megatron_line,
    write_generic_csv,
    write_generic_jsonl,
    write_megatron_log,
    write_tb_file,
    write_wandb_csv,
)

SECRET = "hf_SECRETVALUE12345"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under the store, with its bytes (a missing store is an empty dict)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def sql(store: Path, query: str) -> list[dict]:
    r = k2("sql", query, "--store", str(store), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def imp(store: Path, *args: str) -> dict:
    r = k2("import", *args, "--store", str(store), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("sources")
    out = {"dir": d}
    out["megatron"] = write_megatron_log(d / "megatron.log")
    out["wandb"] = write_wandb_csv(d / "wandb.csv")
    write_generic_csv(d / "metrics.csv")
    write_generic_jsonl(d / "metrics.jsonl")
    write_tb_file(d / "tb" / "events.out.tfevents.1.host",
                  {"train/loss": loss_curve(120, 80, seed=5), "learning-rate": {s: 1e-3 for s in range(1, 121)}})
    return out


@pytest.fixture(scope="module")
def imported(sources, tmp_path_factory) -> dict:
    """Every format imported once into one store, through the CLI in subprocesses."""
    store = tmp_path_factory.mktemp("store") / "runs"
    d = sources["dir"]
    res = {
        "megatron": imp(store, "megatron-log", str(d / "megatron.log"), "--name", "mega"),
        "wandb": imp(store, "wandb-csv", str(d / "wandb.csv"), "--name", "k2"),
        "csv": imp(store, "csv", str(d / "metrics.csv"), "--name", "gen", "--map", "step=iter"),
        "jsonl": imp(store, "csv", str(d / "metrics.jsonl"), "--name", "genj", "--map", "loss=train.loss"),
        "tb": imp(store, "tensorboard", str(d / "tb"), "--name", "tb"),
    }
    return {"store": store, **res}


def test_every_format_lands_as_completed_import_runs(imported):
    store = imported["store"]
    assert len(imported["wandb"]["run_ids"]) == 2
    rows = {r["run_id"]: r for r in sql(store, "SELECT r.run_id, r.name, r.status, r.source, "
                                        "(SELECT count(*) FROM steps s WHERE s.run_id = r.run_id) AS n "
                                        "FROM runs r")}
    expect = {"megatron": ("import:megatron-log", ["mega"], [120]),
              "wandb": ("import:wandb-csv", ["k2/k2-stage1", "k2/k2-stage2"], [120, 35]),
              "csv": ("import:csv", ["gen"], [120]), "jsonl": ("import:csv", ["genj"], [120]),
              "tb": ("import:tensorboard", ["tb"], [120])}
    assert len(rows) == 6
    for key, (source, names, counts) in expect.items():
        got = [rows[i] for i in imported[key]["run_ids"]]
        assert [g["name"] for g in got] == names and [g["n"] for g in got] == counts
        assert {g["status"] for g in got} == {"completed"} and {g["source"] for g in got} == {source}
        assert all(r["created"] for r in imported[key]["runs"])
    # the Megatron run's skip and restart, and the sampled W&B run, are in `events`
    ev = sql(store, "SELECT r.name, e.kind, e.step FROM events e JOIN runs r USING (run_id) "
                    "WHERE e.kind IN ('skip', 'restart', 'import_sampled') ORDER BY 1, 2")
    assert [(e["name"], e["kind"], e["step"]) for e in ev] == [
        ("k2/k2-stage2", "import_sampled", None), ("mega", "restart", 96), ("mega", "skip", 50)]
    sk = sql(store, "SELECT step FROM steps JOIN runs USING (run_id) WHERE name = 'mega' AND skipped")
    assert [r["step"] for r in sk] == [50]
    sampled = sql(store, "SELECT r.name, h.value FROM hparams h JOIN runs r USING (run_id) "
                         "WHERE h.key = 'import.sampled' AND r.source = 'import:wandb-csv' ORDER BY 1")
    assert [r["value"] for r in sampled] == ["false", "true"]
    # unmapped series are queryable in `metrics`
    m = sql(store, "SELECT count(*) AS n FROM metrics JOIN runs USING (run_id) "
                   "WHERE metrics.name = 'throughput/weird' AND runs.name = 'k2/k2-stage1'")
    assert m[0]["n"] == 120


def test_secrets_in_imported_arguments_are_redacted(imported):
    h = sql(imported["store"], "SELECT value FROM hparams WHERE key = 'args.hf_token'")
    assert [r["value"] for r in h] == ["***REDACTED***"]
    leaked = [k for k, v in snapshot(imported["store"]).items() if SECRET.encode() in v]
    assert leaked == []


def test_forensics_finds_the_spike_in_imported_runs(imported, tmp_path):
    store = imported["store"]
    for key, idx in (("megatron", 0), ("wandb", 0), ("tb", 0), ("csv", 0)):
        run_id = imported[key]["run_ids"][idx]
        r = k2("forensics", run_id, "--store", str(store), "--out", str(tmp_path / "rep"),
               "--no-html", "--no-spike-rows", "--json")
        assert r.returncode == 0, r.stderr
        spikes = json.loads(r.stdout)["spikes"]
        assert any(s["onset_step"] <= 80 <= s["end_step"] and s["peak_step"] == 80 for s in spikes), (key, spikes)
        # Megatron's skipped iteration 50 has no loss: a gap, not a spike
        assert not any(s["onset_step"] <= 50 <= s["end_step"] for s in spikes), (key, spikes)


def test_same_content_twice_is_idempotent_and_other_options_refused(imported, sources):
    store = imported["store"]
    before = snapshot(store)
    again = imp(store, "megatron-log", str(sources["dir"] / "megatron.log"), "--name", "mega-again")
    assert again["run_ids"] == imported["megatron"]["run_ids"] and not again["runs"][0]["created"]
    one = imp(store, "wandb-csv", str(sources["dir"] / "wandb.csv"), "--run", "k2-stage2")
    assert one["run_ids"] == imported["wandb"]["run_ids"][1:]
    r = k2("import", "csv", str(sources["dir"] / "metrics.csv"), "--map", "step=iter,lr=my_metric",
           "--store", str(store))
    assert r.returncode == 2 and "already imported as run" in r.stderr and "other options" in r.stderr
    assert snapshot(store) == before


def test_import_does_not_load_torch(sources, tmp_path):
    code = ("import sys; from k2repro.cli.main import main; "
            f"rc = main(['import', 'csv', {str(sources['dir'] / 'metrics.csv')!r}, '--store', "
            f"{str(tmp_path / 's')!r}]); assert rc == 0, rc; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- malformed input

def _megatron(lines_fn) -> str:
    lines = ["x", megatron_line(1, 3, 3.0), megatron_line(2, 3, 2.5), megatron_line(3, 3, 2.0)]
    lines_fn(lines)
    return "\n".join(lines) + "\n"


MALFORMED = [
    # (kind, file name, content, line named, words in the message)
    ("csv", "trunc.csv", "step,loss,lr\n1,2,3\n2,3\n", 3, "expected 3 fields, found 2"),
    ("csv", "hdr.csv", "when,loss\n1,2\n", 1, "wrong header"),
    ("csv", "nan.csv", "step,loss\n1,2\n2,two\n", 3, "'two' is not a number"),
    ("csv", "back.csv", "step,loss\n1,2\n3,2\n2,2\n", 4, "goes back"),
    ("csv", "trunc.jsonl", '{"step": 1, "loss": 2}\n{"step": 2, "lo', 2, "not a JSON object"),
    ("wandb-csv", "w-hdr.csv", '"Step","loss"\n1,2\n', 1, "wrong header"),
    ("wandb-csv", "w-val.csv", '"Step","a - loss","b - loss"\n1,2,\n2,,x\n', 3, "'x' is not a number"),
    ("wandb-csv", "w-trunc.csv", '"Step","a - loss","b - loss"\n1,2,3\n2,2\n', 3, "expected 3 fields"),
    ("wandb-csv", "w-back.csv", '"Step","a - loss","b - loss"\n1,2,3\n5,2,3\n4,2,3\n', 4, "goes back"),
    ("megatron-log", "m-trunc.log", _megatron(lambda ls: ls.__setitem__(3, ls[3][:70])), 4,
     "truncated iteration line"),
    ("megatron-log", "m-val.log", _megatron(lambda ls: ls.__setitem__(2, ls[2].replace("lm loss: 2.5", "lm loss: x2.5"))),
     3, "is not a number"),
    ("megatron-log", "m-back.log", _megatron(lambda ls: ls.append(megatron_line(2, 3, 1.0))), 5,
     "without a restart marker"),
]


@pytest.fixture()
def populated_store(tmp_path, sources) -> Path:
    store = tmp_path / "runs"
    assert main(["import", "csv", str(sources["dir"] / "metrics.csv"), "--store", str(store)]) == 0
    return store


@pytest.mark.parametrize("kind,fname,content,line,words", MALFORMED, ids=[m[1] for m in MALFORMED])
def test_malformed_input_exit_2_line_named_store_unchanged(tmp_path, populated_store, capsys,
                                                           kind, fname, content, line, words):
    src = tmp_path / fname
    src.write_text(content)
    before = snapshot(populated_store)
    capsys.readouterr()
    rc = main(["import", kind, str(src), "--store", str(populated_store), "--name", "bad"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith(f"k2repro import: error: {src}:{line}: ") and words in err, err
    assert snapshot(populated_store) == before


def test_malformed_tensorboard_file_exit_2_store_unchanged(tmp_path, populated_store, capsys):
    f = write_tb_file(tmp_path / "tb" / "events.out.tfevents.9.h", {"loss": {1: 2.0, 2: 1.0}})
    f.write_bytes(f.read_bytes()[:-5])
    before = snapshot(populated_store)
    capsys.readouterr()
    assert main(["import", "tensorboard", str(tmp_path / "tb"), "--store", str(populated_store)]) == 2
    err = capsys.readouterr().err
    assert f"{f}: record 3 (byte " in err and "truncated record" in err
    assert snapshot(populated_store) == before


def test_malformed_input_into_a_missing_store_creates_nothing(tmp_path, capsys):
    src = tmp_path / "bad.csv"
    src.write_text("step,loss\n1,2\n2,x\n")
    store = tmp_path / "nostore"
    r = k2("import", "csv", str(src), "--store", str(store))
    assert r.returncode == 2 and f"{src}:3:" in r.stderr and not store.exists()


def test_one_failing_run_of_several_leaves_none(tmp_path, sources, capsys):
    """A W&B file whose first run is fine and whose second run has a step that is not a whole
    number of --step-divisor: neither is imported."""
    src = tmp_path / "two.csv"
    src.write_text('"Step","a - loss","b - loss"\n2,2,\n3,,1\n4,2,\n')
    store = tmp_path / "runs"
    assert main(["import", "wandb-csv", str(src), "--store", str(store), "--step-divisor", "2"]) == 2
    assert not store.exists()
    assert f"{src}:3: Step 3 is not a whole number" in capsys.readouterr().err
