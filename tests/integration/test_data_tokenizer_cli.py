"""`k2repro data tokenize data.tokenizer=PATH` as real processes: the supplied file flows
through pack into the packed manifest; a file that is not a tokenizer, or a vocabulary larger
than model.vocab_size, is one line on stderr, exit 2, and no output folder."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import k2 as k2_any
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]


def k2(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "K2REPRO_CONF": str(REPO / "conf"), "OMP_NUM_THREADS": "1"}
    env.pop("K2REPRO_LOG_LEVEL", None)
    return subprocess.run([sys.executable, "-m", "k2repro", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def user_tokenizer(path: Path, vocab_size: int) -> Path:
    """A real tokenizers-format file (byte-level BPE with GPT-2's `<|endoftext|>`), trained
    on the bundled sample's text, as a user would bring one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted((REPO / "data" / "sample").rglob("*"))
             if p.is_file()][:40]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> tuple[Path, Path, list[dict]]:  # noqa: ANN001
    cwd = tmp_path_factory.mktemp("tokcli")
    tok = user_tokenizer(cwd / "mine" / "tokenizer.json", 600)
    common = [f"data.source={REPO / 'data' / 'sample'}", "data.work_dir=w", "data.packed_dir=w/packed",
              "data.max_docs=100", "model.vocab_size=1024", f"data.tokenizer={tok}"]
    out = []
    for stage in ("prepare", "dedup", "tokenize", "pack"):
        r = k2(cwd, "data", stage, *common, "--json")
        assert r.returncode == 0, r.stderr
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
        if stage == "pack":  # progress in the stage's log (stderr is a pipe here), then a summary
            assert "pack: done, " in r.stderr and "docs/s" in r.stderr and "MB/s" in r.stderr, r.stderr
    return cwd, tok, out


def test_supplied_tokenizer_through_tokenize_and_pack(chain: tuple[Path, Path, list[dict]]) -> None:
    cwd, tok, summaries = chain
    sha = hashlib.sha256(tok.read_bytes()).hexdigest()
    vocab = summaries[2]["vocab_size"]
    assert (cwd / "w" / "tokenizer" / "tokenizer.json").read_bytes() == tok.read_bytes()
    tm = json.loads((cwd / "w" / "tokenizer" / "manifest.json").read_text())
    assert tm["supplied"] is True and tm["sha256"] == sha and tm["vocab_size"] == vocab
    pm = json.loads((cwd / "w" / "packed" / "manifest.json").read_text())
    assert pm["tokenizer_sha256"] == sha and pm["vocab_size"] == vocab == summaries[3]["vocab_size"]
    assert pm["tokenizer_supplied"]["sha256"] == sha
    assert summaries[3]["train_samples"] > 0


def _refused(cwd: Path, out: str, *overrides: str) -> str:
    r = k2(cwd, "data", "tokenize", "--out", out, *overrides)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("k2repro data: error: "), r.stderr
    assert not (cwd / out).exists() and not list(cwd.glob(f".{out}*"))
    return lines[0]


def test_a_file_that_is_not_a_tokenizer_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "weights.json").write_text('{"layers": [1, 2, 3]}\n')
    (tmp_path / "vocab.txt").write_text("hello\nworld\n")
    msg = _refused(tmp_path, "t1", f"data.tokenizer={tmp_path / 'weights.json'}")
    assert str(tmp_path / "weights.json") in msg and "not a tokenizer" in msg
    msg = _refused(tmp_path, "t2", f"data.tokenizer={tmp_path / 'vocab.txt'}")
    assert str(tmp_path / "vocab.txt") in msg and "not valid JSON" in msg
    msg = _refused(tmp_path, "t3", f"data.tokenizer={tmp_path / 'absent.json'}")
    assert str(tmp_path / "absent.json") in msg and "no such file" in msg


def test_vocab_larger_than_model_vocab_size_is_a_config_error(chain: tuple[Path, Path, list[dict]],
                                                              tmp_path: Path) -> None:
    _, tok, summaries = chain
    vocab = summaries[2]["vocab_size"]
    msg = _refused(tmp_path, "t", f"data.tokenizer={tok}", "model.vocab_size=512")
    assert "config key 'data.tokenizer'" in msg and "config key 'model.vocab_size' = 512" in msg
    assert f"has {vocab} tokens" in msg and str(tok) in msg


def test_pack_on_a_terminal_redraws_progress(chain: tuple[Path, Path, list[dict]]) -> None:
    """`k2repro data pack` with stderr on a real pty: the progress line is redrawn in place
    (`\\r`) and ends with the summary, while stdout keeps the stage's own summary."""
    import pty

    cwd, tok, _ = chain
    master, slave = pty.openpty()
    env = {**os.environ, "K2REPRO_CONF": str(REPO / "conf"), "OMP_NUM_THREADS": "1"}
    try:
        r = subprocess.run([sys.executable, "-m", "k2repro", "data", "pack", f"data.source={REPO / 'data' / 'sample'}",
                            "data.work_dir=w", "--out", "w/packed-tty", "model.vocab_size=1024",
                            f"data.tokenizer={tok}"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                           stderr=slave, text=True, timeout=300)
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                b = os.read(master, 65536)
            except OSError:
                break
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    err = b"".join(chunks).decode()
    assert r.returncode == 0, err
    assert r.stdout.startswith("data pack: ") and "\r" not in r.stdout
    assert "\rpack: done, " in err and "docs/s" in err and "MB/s" in err, err
    assert "info:" not in err  # a terminal gets the redrawn line, not log lines
    assert (cwd / "w" / "packed-tty" / "train.bin").read_bytes() == (cwd / "w" / "packed" / "train.bin").read_bytes()


def test_train_refuses_packed_data_from_a_larger_supplied_vocab(chain: tuple[Path, Path, list[dict]],
                                                                tmp_path: Path) -> None:
    """The second guard: data packed with a supplied tokenizer, then a model too small for it."""
    cwd, _, summaries = chain
    vocab = summaries[3]["vocab_size"]
    r = k2_any("train", *tiny_overrides(cwd / "w" / "packed", tmp_path / "store", **{"model.vocab_size": 512}))
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr
    assert "config key 'model.vocab_size': 512" in last and f"tokenizer's {vocab}" in last, last
