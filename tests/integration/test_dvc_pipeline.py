"""The DVC pipeline with the real `dvc` binary in a temporary git repo (issue 4's must-shows):
every stage runs, a second `dvc repro` runs none, `dvc exp run -S optim.lr=...` recomposes
params.yaml through Hydra and reruns only what follows training, metrics and plots show, and
push/pull through a local remote restores data and checkpoints byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import re
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


VENV_BIN = Path(sys.executable).parent
DVC = str(VENV_BIN / "dvc")
K2 = str(VENV_BIN / "k2repro")


def _env() -> dict:
    """As a new user's shell: the venv is NOT on PATH (README runs `.venv/bin/dvc ...`), so a
    stage command that needs PATH to find `k2repro` or `python` fails (issue 23 item 14)."""
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != VENV_BIN.resolve() and not (Path(p) / "k2repro").exists())
    env = dict(os.environ, DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1", GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com",
               PATH=path)
    env.pop("VIRTUAL_ENV", None)
    return env


def sh(cwd: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = tuple(DVC if c == "dvc" else K2 if c == "k2repro" else c for c in cmd)
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
    (dst / ".venv").symlink_to(VENV_BIN.parent)  # a fresh clone's `make setup` venv
    sh(dst, sys.executable, "scripts/compose_params.py", "params.yaml")
    sh(dst, "git", "init", "-q", "-b", "main")
    sh(dst, "git", "add", "-A")
    sh(dst, "git", "commit", "-qm", "init")
    return dst


def test_pipeline_end_to_end(repo: Path, tmp_path: Path) -> None:
    first = sh(repo, "dvc", "repro")
    assert ran(first.stdout) == {"prepare", "dedup", "tokenize", "pack", "train", "eval", "forensics", "metrics"}, first.stdout
    # item 10: no empty table (a header and "(3 rows)" with no rows), no stray "{ }"
    assert not re.search(r"^\s*\{\s*\}\s*$", first.stdout + first.stderr, re.M), first.stdout
    for m in re.finditer(r"^\((\d+) rows?\)$", first.stdout, re.M):
        body = first.stdout[:m.start()].rstrip("\n").splitlines()
        assert int(m.group(1)) == 0 or not set(body[-1]) <= set("- "), first.stdout
    second = sh(repo, "dvc", "repro")
    assert ran(second.stdout) == set(), second.stdout

    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "first repro")
    assert "dvc.lock" in sh(repo, "git", "ls-files").stdout.split()
    base = _run_ids(repo)
    assert len(base) == 1
    exp = sh(repo, "dvc", "exp", "run", "-n", "lr2", "-S", "optim.lr=0.002")
    assert ran(exp.stdout) == {"train", "eval", "forensics", "metrics"}, exp.stdout
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["optim"]["lr"] == 0.002 and params["data"]["max_docs"] == 150

    # item 3: the experiment's run lands next to the first one (DVC cleared pipeline/train)
    both = _run_ids(repo)
    assert len(both) == 2 and base[0] in both, both
    new = next(r for r in both if r != base[0])
    # item 5: params.yaml, as `dvc exp run` rewrote it, is no code change
    d = json.loads(sh(repo, "k2repro", "diff", base[0], new, "--json").stdout)
    code = d["env"]["code"]
    assert set(code["changed"]) <= {"git.commit"} and not code["added"] and not code["removed"], code
    assert "git_dirty" not in d["run"], d["run"]
    assert d["env"]["params files"]["changed"]["dvc.params_changed"] == ["none", "params.yaml"]
    assert "optim.lr" in d["config"]["changed"]
    mdiff = sh(repo, "dvc", "metrics", "diff", "--json")
    assert json.loads(mdiff.stdout)["reports/metrics.json"]["train.final_loss"]["old"] is not None, mdiff.stdout
    # item 4: plots diff across revisions finds both curves
    pd = sh(repo, "dvc", "plots", "diff", "HEAD", "lr2", "--json")
    rows = re.findall(r'"rev": "([^"]+)"', pd.stdout)
    assert rows.count("HEAD") >= 20 and rows.count("lr2") >= 20, pd.stdout[-2000:]

    metrics = sh(repo, "dvc", "metrics", "show")
    assert "final_loss" in metrics.stdout
    plots = sh(repo, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").exists(), plots.stdout
    # item 3: runs survive `dvc exp apply` and `dvc checkout`
    sh(repo, "dvc", "exp", "apply", "lr2")
    assert sorted(_run_ids(repo)) == sorted(both)
    sh(repo, "git", "checkout", "--", ".")
    sh(repo, "dvc", "checkout", "--force")
    assert sorted(_run_ids(repo)) == sorted(both)
    assert (repo / "runs" / base[0] / "checkpoints" / "step_00000020" / "manifest.json").exists()
    sh(repo, "dvc", "exp", "apply", "lr2")

    remote = tmp_path / "remote"
    sh(repo, "dvc", "remote", "add", "-d", "local", str(remote))
    sh(repo, "dvc", "push")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "exp + remote")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    sh(clone, "dvc", "pull")
    for sub in ("data/work/packed", "pipeline/train"):
        a, b = tree_hashes(repo / sub), tree_hashes(clone / sub)
        assert a == b and a, sub
    assert any("checkpoints/step_" in k for k in tree_hashes(clone / "pipeline/train"))


def _run_ids(repo: Path) -> list[str]:
    """The runs `k2repro runs` lists with no --store (the default store, runs/)."""
    r = sh(repo, "k2repro", "runs", "--json")
    return [row["run_id"] for row in json.loads(r.stdout)]
