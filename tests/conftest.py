"""Shared fixtures: a small packed corpus with learnable structure, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def make_packed(out: Path, n_docs: int = 120, vocab: int = 320, seq_len: int = 32, seed: int = 0) -> Path:
    """Documents drawn from a few fixed token cycles plus noise, so a tiny model's loss falls."""
    from k2repro.data.packed import Doc, write_packed

    rng = np.random.default_rng(seed)
    motifs = [rng.integers(3, vocab, size=rng.integers(5, 12)) for _ in range(8)]
    docs = []
    for i in range(n_docs):
        m = motifs[i % len(motifs)]
        toks = np.resize(m, int(rng.integers(40, 120))).copy()
        noise = rng.random(toks.size) < 0.1
        toks[noise] = rng.integers(3, vocab, size=int(noise.sum()))
        docs.append(Doc(f"synthetic/{i:04d}", "code" if i % 3 == 0 else "prose", toks))
    write_packed(out, {"train": docs[:-10], "val": docs[-10:]}, seq_len=seq_len, vocab_size=vocab, eos_id=0)
    return out


@pytest.fixture(scope="session")
def packed_dir(tmp_path_factory) -> Path:
    return make_packed(tmp_path_factory.mktemp("packed") / "packed")


def tiny_overrides(packed: Path, store: Path, **extra: object) -> list[str]:
    """Overrides for a fast tiny run on the synthetic corpus."""
    base = {
        "model.vocab_size": 320, "data.vocab_size": 320, "model.d_model": 32, "model.n_heads": 2,
        "model.n_kv_heads": 2, "model.ffn_dim": 64, "model.max_seq_len": 64,
        "data.packed_dir": str(packed), "audit.store": str(store), "train.seq_len": 32,
        "train.global_batch_size": 8, "train.micro_batch_size": 2, "train.max_steps": 20,
        "optim.warmup_steps": 5,
    }
    base.update(extra)
    return [f"{k}={_fmt(v)}" for k, v in base.items()]


def _fmt(v: object) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list | tuple):
        return "[" + ",".join(str(x) for x in v) + "]"
    return str(v)


def k2(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "k2repro", *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=timeout)


def dirty_repo(repo: Path, name: str, dirty: str) -> Path:
    """A git repo at `repo` with one commit of `name` (`x = 1`) and `dirty` as its uncommitted
    content: what the git-diff capture of a run sees (the secrets checks plant values in it)."""
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env=env)

    repo.mkdir(parents=True, exist_ok=True)
    git("init", "-q")
    (repo / name).write_text("x = 1\n")
    git("add", name)
    git("commit", "-qm", "init")
    (repo / name).write_text(dirty)
    return repo


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001
    """GPU-marked tests run where CUDA is (scripts/gpu_check.sh) and are skipped elsewhere."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
