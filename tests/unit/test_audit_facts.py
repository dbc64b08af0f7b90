"""Facts capture: the keys a diff relies on, git state of a real repository, redacted env."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time

from k2repro.audit.facts import capture_facts, env_vars, git_diff_text, git_info, launcher
from k2repro.audit.redact import REDACTED


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                   env=dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@e",
                            GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@e"))


def test_git_info_of_a_dirty_repository(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-qm", "c")
    clean = git_info(tmp_path)
    assert clean["git.dirty"] == "false" and len(clean["git.commit"]) == 40
    (tmp_path / "a.txt").write_text("two\n")
    dirty = git_info(tmp_path)
    diff = git_diff_text(tmp_path)
    assert dirty["git.dirty"] == "true" and "+two" in diff
    assert dirty["git.diff_sha256"] == hashlib.sha256(diff.encode()).hexdigest()
    assert git_info(tmp_path.parent / "nowhere")["git.commit"] == "absent"


def test_capture_facts_keys_and_speed(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-value-123")
    capture_facts(0, 2)  # warm the package cache (and torch import)
    t0 = time.perf_counter()
    f = capture_facts(1, 2, extra={"note": "x", "my_token": "t0ps3cret"})
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, elapsed
    for k in ("host", "os", "cpu.model", "cpu.count", "ram.bytes", "python", "torch.version",
              "gpu.count", "gpu.name", "launcher", "git.commit", "git.dirty", "git.diff_sha256",
              "det.deterministic_algorithms", "pkg.duckdb", "env.OMP_NUM_THREADS"):
        assert k in f, k
    assert f["rank"] == "1" and f["world_size"] == "2"
    assert f["env.WANDB_API_KEY"] == REDACTED and f["my_token"] == REDACTED and f["note"] == "x"
    assert "wandb-value-123" not in "".join(f.values())
    assert all(isinstance(v, str) for v in f.values())


def test_launcher_and_env_filter():
    assert launcher({"TORCHELASTIC_RUN_ID": "x"}) == "torchrun"
    assert launcher({"SLURM_JOB_ID": "1"}) == "slurm"
    assert launcher({}) == "python"
    e = env_vars({"NCCL_DEBUG": "INFO", "HOME": "/h", "HF_TOKEN": "abcdefg", "PYTHONHASHSEED": "0"})
    assert e == {"env.NCCL_DEBUG": "INFO", "env.HF_TOKEN": REDACTED, "env.PYTHONHASHSEED": "0"}
