"""The DVC pipeline with the real `dvc` binary in a temporary git repo (issue 4's must-shows):
every stage runs, a second `dvc repro` runs none, `dvc exp run -S optim.lr=...` recomposes
params.yaml through Hydra and reruns only what follows training, metrics and plots show, and
push/pull through a local remote restores data and checkpoints byte for byte."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow

# A slice of the corpus and ~20 steps keep this test quick; the stage graph is the real one.
SLICE = """
data:
  max_docs: 150
train:
  max_steps: 20
  global_batch_size: 8
  micro_batch_size: 4
  seq_len: 64
ckpt:
  interval: 10
parallel:
  nproc: 1
audit:
  flush_every: 5
"""


def _env() -> dict:
    venv_bin = str(Path(sys.executable).parent)
    return dict(os.environ, DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1", GIT_AUTHOR_NAME="t",
                GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com",
                PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""))


def sh(cwd: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("dvcrepo") / "repo"
    dst.mkdir()
    for name in ("conf", "data/sample", "src", "scripts", ".dvc/config", "dvc.yaml", ".gitignore", ".dvcignore"):
        src = REPO / name
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, target)
    pipe = dst / "conf" / "pipeline.yaml"
    body = yaml.safe_load(pipe.read_text())
    for group, values in yaml.safe_load(SLICE).items():
        body.setdefault(group, {}).update(values)
    pipe.write_text(yaml.safe_dump(body, sort_keys=False))
    sh(dst, sys.executable, "scripts/compose_params.py", "params.yaml")
    sh(dst, "git", "init", "-q", "-b", "main")
    sh(dst, "git", "add", "-A")
    sh(dst, "git", "commit", "-qm", "init")
    return dst


def test_pipeline_end_to_end(repo: Path, tmp_path: Path) -> None:
    first = sh(repo, "dvc", "repro")
    assert ran(first.stdout) == {"prepare", "dedup", "tokenize", "pack", "train", "eval", "forensics", "metrics"}, first.stdout
    second = sh(repo, "dvc", "repro")
    assert ran(second.stdout) == set(), second.stdout

    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "first repro")
    exp = sh(repo, "dvc", "exp", "run", "-S", "optim.lr=0.002")
    assert ran(exp.stdout) == {"train", "eval", "forensics", "metrics"}, exp.stdout
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["optim"]["lr"] == 0.002 and params["data"]["max_docs"] == 150

    metrics = sh(repo, "dvc", "metrics", "show")
    assert "final_loss" in metrics.stdout
    plots = sh(repo, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").exists(), plots.stdout

    remote = tmp_path / "remote"
    sh(repo, "dvc", "remote", "add", "-d", "local", str(remote))
    sh(repo, "dvc", "push")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "exp + remote")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    sh(clone, "dvc", "pull")
    for sub in ("data/work/packed", "runs/pipeline/train"):
        a, b = tree_hashes(repo / sub), tree_hashes(clone / sub)
        assert a == b and a, sub
    assert any("checkpoints/step_" in k for k in tree_hashes(clone / "runs/pipeline/train"))
