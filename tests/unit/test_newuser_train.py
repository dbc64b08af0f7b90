"""Issue 23 (a new user's first week), the parts that need no launch: DVC-managed params
files are not code dirt (item 5), stage commands find the venv without PATH (item 14),
`dvc_plots/` is ignored (item 15), experiment runs are kept where `k2repro runs` looks (item 3).
The launches (Ctrl-C, resume, phases) are in tests/distributed/test_trainer_2rank.py, real
`dvc` in tests/integration/test_dvc_pipeline.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

GIT = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@example.com"}


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env=dict(os.environ, **GIT)).stdout


@pytest.fixture()
def dvc_repo(tmp_path: Path) -> Path:
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: 'true'\n    params:\n      - x\n"
                                       "      - other.yaml:\n          - y\n"
                                       "    plots:\n      - loss.csv:\n          cache: false\n")
    (tmp_path / "loss.csv").write_text("step,loss\n1,2\n")
    (tmp_path / "params.yaml").write_text("x: 1\n")
    (tmp_path / "other.yaml").write_text("y: 1\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    (tmp_path / "train.py").write_text("print(1)\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "init")
    return tmp_path


def test_dvc_params_are_not_code_dirt(dvc_repo: Path) -> None:
    """Item 5: `dvc exp run -S` rewrites params.yaml (and dvc.lock): recorded apart, the code
    facts stay clean and equal to a clean checkout's; a real code edit still shows."""
    from k2repro.audit.facts import git_info
    from k2repro.tools.diff import env_diff

    clean = git_info(dvc_repo)
    (dvc_repo / "params.yaml").write_text("x: 2\n")
    (dvc_repo / "other.yaml").write_text("y: 2\n")
    (dvc_repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (dvc_repo / "loss.csv").unlink()  # DVC deletes a stage's outputs before running it
    exp = git_info(dvc_repo)
    assert exp["git.dirty"] == "false" and exp["git.diff_sha256"] == clean["git.diff_sha256"]
    assert exp["dvc.params_changed"] == "dvc.lock,other.yaml,params.yaml"
    d = env_diff(clean, exp)
    assert not any(d["code"].values())
    assert set(d["params files"]["changed"]) == {"dvc.params_changed", "dvc.params_diff_sha256",
                                                 "dvc.outs_changed"}
    (dvc_repo / "train.py").write_text("print(2)\n")
    assert git_info(dvc_repo)["git.dirty"] == "true"


def test_params_yaml_outside_a_dvc_project_is_code(tmp_path: Path) -> None:
    from k2repro.audit.facts import git_info

    (tmp_path / "params.yaml").write_text("x: 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "init")
    (tmp_path / "params.yaml").write_text("x: 2\n")
    info = git_info(tmp_path)
    assert info["git.dirty"] == "true" and "dvc.params_changed" not in info


def test_stage_commands_need_no_venv_on_path(tmp_path: Path) -> None:
    """Item 14: every dvc.yaml command starts with scripts/python, which finds a clone's .venv
    with a PATH that lacks it (and says what to do when there is none)."""
    import yaml

    for name, st in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        cmds = [c.strip() for c in st["cmd"].split("&&")]
        assert all(c.startswith("scripts/python ") for c in cmds), (name, cmds)
    clone = tmp_path / "clone"
    (clone / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts" / "python", clone / "scripts" / "python")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    bare = subprocess.run(["scripts/python", "-c", "import k2repro"], cwd=clone, env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True)
    assert bare.returncode == 127 and "make setup" in bare.stderr
    (clone / ".venv").symlink_to(Path(sys.executable).parent.parent)
    ok = subprocess.run(["scripts/python", "-c", "import k2repro, sys; print(sys.prefix)"], cwd=clone, env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    # and from a DVC temp workspace (`dvc exp run --temp`): <clone>/.dvc/tmp/exps/<name>/
    tmpws = clone / ".dvc" / "tmp" / "exps" / "tmpabc" / "scripts"
    tmpws.mkdir(parents=True)
    shutil.copy2(REPO / "scripts" / "python", tmpws / "python")
    ok = subprocess.run(["scripts/python", "-c", "import k2repro"], cwd=tmpws.parent, env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_dvc_plots_and_pipeline_stores_are_ignored() -> None:
    """Item 15 (`dvc plots show/diff` write dvc_plots/) and the pipeline's DVC-tracked stores."""
    for path in ("dvc_plots/index.html", "pipeline/train/x", "runs/x", ".venv"):
        r = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO)
        assert r.returncode == 0, path
    r = subprocess.run(["git", "check-ignore", "-q", "--no-index", "reports/loss.csv"], cwd=REPO)
    assert r.returncode == 1, "the plots file is tracked in git (item 4)"


def test_kept_runs_are_linked_and_left_alone(tmp_path: Path) -> None:
    """Item 3: the train stage keeps each run folder of its store under runs/ (hard links, so
    checkpoints cost no second copy); a run already kept is not touched again."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import pipeline_stage
    finally:
        sys.path.pop(0)
    store, keep = tmp_path / "pipeline" / "train", tmp_path / "runs"
    run = store / "run-1"
    (run / "runs").mkdir(parents=True)
    (run / "runs" / "a.parquet").write_bytes(b"x")
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "step_00000002" / "manifest.json").write_text("{}")
    (store / ".tmp-not-a-run").mkdir()
    assert pipeline_stage.keep_runs(store, keep) == ["run-1"]
    kept = keep / "run-1" / "checkpoints" / "step_00000002" / "manifest.json"
    assert kept.read_text() == "{}" and kept.stat().st_ino == (run / "checkpoints" / "step_00000002" /
                                                               "manifest.json").stat().st_ino
    shutil.rmtree(store)  # what DVC does before the next experiment's train stage
    assert kept.read_text() == "{}"
    assert pipeline_stage.keep_runs(tmp_path / "pipeline", keep) == []
