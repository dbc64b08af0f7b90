"""`k2repro forensics` as a real process: JSON on stdout, files and spike rows written, exit
codes (0 whatever it finds, 2 for a missing run / store / bad option), no torch import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from k2repro.forensics.synthetic import InjectedSpike, SyntheticRun, write_run
from tests.conftest import k2


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    write_run(root, SyntheticRun(run_id="cli", n_steps=400, seed=21,
                                 spikes=(InjectedSpike("bad_batch", 150), InjectedSpike("nan", 380))))
    write_run(root, SyntheticRun(run_id="calm", n_steps=300, seed=22))
    return root


def test_json_output_files_and_spike_rows(store: Path, tmp_path: Path) -> None:
    out, out_store = tmp_path / "reports", tmp_path / "fstore"
    r = k2("forensics", "cli", "--store", str(store), "--out", str(out), "--out-store", str(out_store),
           "--json", "--no-html")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["run_id"] == "cli"
    assert [(s["onset_step"], s["class"]) for s in obj["spikes"]] == [(150, "transient"), (380, "divergence")]
    assert obj["spikes"][0]["data"]["verdict"] == "data"
    assert (out / "cli" / "forensics.json").exists() and (out / "cli" / "forensics.md").exists()
    assert not (out / "cli" / "forensics.html").exists()
    assert (out_store / "cli" / "spikes" / "forensics.parquet").exists()
    # nothing was written into the store that was read
    assert not (store / "cli" / "spikes").exists()
    q = k2("sql", "--store", str(out_store), "--json", "SELECT onset_step, class FROM spikes ORDER BY onset_step")
    assert q.returncode == 0, q.stderr
    assert [row["class"] for row in json.loads(q.stdout)] == ["transient", "divergence"]


def test_clean_run_exits_zero_with_no_spike(store: Path, tmp_path: Path) -> None:
    r = k2("forensics", "calm", "--store", str(store), "--out", str(tmp_path), "--no-spike-rows", "--no-html")
    assert r.returncode == 0, r.stderr
    assert "0 spike(s)" in r.stdout


@pytest.mark.parametrize("args, msg", [
    (["nope"], "no run 'nope'"),
    (["cli", "--set", "episodes.horizon=3"], "unknown parameter 'horizon'"),
    (["cli", "--set", "bogus=1"], "SECTION.KEY=VALUE"),
    (["cli", "--detector", "robust_z:threshold=abc"], "must be float"),
    (["cli", "--threshold", "-1"], "--threshold must be > 0"),
])
def test_bad_input_is_one_line_exit_2(store: Path, tmp_path: Path, args: list[str], msg: str) -> None:
    r = k2("forensics", *args, "--store", str(store), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("k2repro forensics: error:") and msg in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


def test_missing_store_is_exit_2(tmp_path: Path) -> None:
    r = k2("forensics", "x", "--store", str(tmp_path / "absent"))
    assert r.returncode == 2 and "no store at" in r.stderr


def test_help() -> None:
    r = k2("forensics", "--help")
    assert r.returncode == 0 and "--out-store" in r.stdout and "--json" in r.stdout


def test_forensics_does_not_import_torch(store: Path, tmp_path: Path) -> None:
    code = (
        "import sys, k2repro\n"
        "from k2repro.forensics.analyze import analyze_run\n"
        "from k2repro.forensics.report import write_reports\n"
        f"r = analyze_run(k2repro.open_store({str(store)!r}), 'cli')\n"
        f"write_reports(r, {str(tmp_path)!r})\n"
        "print('torch' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_run_by_unique_prefix_and_extra_scan(store: Path, tmp_path: Path) -> None:
    r = k2("forensics", "cl", "--store", str(store), "--out", str(tmp_path), "--no-spike-rows", "--no-html",
           "--scan", "grad_norm", "--json")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["run_id"] == "cli"
    assert obj["detectors"]["grad_norm:robust_z"]["opens_episodes"] is False
    assert obj["detectors"]["loss_max:robust_z"]["opens_episodes"] is True
    bad = k2("forensics", "cli", "--store", str(store), "--scan", "nope")
    assert bad.returncode == 2 and "not a steps signal" in bad.stderr
