"""A supplied tokenizer (`data.tokenizer=PATH`): a real tokenizers-format file of a different
model family than ours (word-level pre-tokenizer, `</s>` as end of document, as Llama-2/T5
files have) is checked, copied byte for byte, recorded (sha256, vocab size, supplied) and
packs; anything that is not a tokenizer, or too large a vocabulary, is refused before any
output is written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from k2repro.data.dedup import dedup
from k2repro.data.engine import iter_shard
from k2repro.data.pack import pack, tokenizer_path
from k2repro.data.packed import PackedDataset
from k2repro.data.prepare import prepare
from k2repro.data.tokenizer import supplied_tokenizer, use_tokenizer
from k2repro.errors import BadInputError, ConfigError

REPO = Path(__file__).resolve().parents[2]


def train_foreign_tokenizer(texts: list[str], path: Path, vocab_size: int) -> Path:
    """A BPE over whitespace-split words with `<unk>`, `<s>`, `</s>`: not our byte-level
    layout, so the supplied path cannot lean on anything our trainer would have written."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:  # noqa: ANN001
    w = tmp_path_factory.mktemp("supplied")
    prepare(REPO / "data" / "sample", w / "prepared", max_docs=120, val_fraction=0.1)
    dedup(w / "prepared", w / "dedup")
    texts = [d["text"] for p in sorted((w / "dedup" / "train").glob("*.jsonl.gz")) for d in iter_shard(p)]
    (w / "user").mkdir()
    train_foreign_tokenizer(texts, w / "user" / "my-tok.json", 700)
    return w


def test_supplied_tokenizer_is_copied_recorded_and_packs(work: Path) -> None:
    user = work / "user" / "my-tok.json"
    sha = hashlib.sha256(user.read_bytes()).hexdigest()
    tok, info = supplied_tokenizer(user)
    assert info["sha256"] == sha and info["eos_token"] == "</s>" and info["model"] == "BPE"
    assert info["vocab_size"] == tok.get_vocab_size() and 300 < info["vocab_size"] <= 700

    m = use_tokenizer(user, work / "tokenizer", model_vocab_size=1024)
    assert (work / "tokenizer" / "tokenizer.json").read_bytes() == user.read_bytes()
    written = json.loads((work / "tokenizer" / "manifest.json").read_text())
    assert written == m
    assert m["supplied"] is True and m["sha256"] == sha and m["vocab_size"] == info["vocab_size"]
    assert m["artifacts"][0]["sha256"] == sha and m["inputs"][0]["sha256"] == sha
    assert (work / "tokenizer" / m["source"]).resolve() == user.resolve()

    pm = pack(work / "dedup", work / "tokenizer", work / "packed", seq_len=32)
    assert pm["tokenizer_sha256"] == sha and pm["vocab_size"] == info["vocab_size"]
    assert pm["eos_token"] == "</s>" and pm["eos_id"] == info["eos_id"]
    assert pm["tokenizer_supplied"] == {"source": m["source"], "sha256": sha}
    assert tokenizer_path(work / "packed").resolve() == (work / "tokenizer" / "tokenizer.json").resolve()
    ds = PackedDataset(work / "packed", "train")
    ds.verify()
    window = ds.get([0])[0]
    assert int(window.max()) < info["vocab_size"]
    first_doc = next(iter_shard(work / "dedup" / "train" / "00000.jsonl.gz"))["text"]
    n = len(tok.encode(first_doc, add_special_tokens=False).ids)
    if n < 32:  # the first document, then its end-of-document token
        assert window[:n].tolist() == tok.encode(first_doc, add_special_tokens=False).ids
        assert int(window[n]) == info["eos_id"]


def test_vocab_larger_than_model_is_a_config_error(work: Path, tmp_path: Path) -> None:
    user = work / "user" / "my-tok.json"
    n = supplied_tokenizer(user)[1]["vocab_size"]
    with pytest.raises(ConfigError) as e:
        use_tokenizer(user, tmp_path / "out", model_vocab_size=n - 1)
    msg = str(e.value)
    assert "data.tokenizer" in msg and "model.vocab_size" in msg and str(n) in msg and str(n - 1) in msg
    assert "\n" not in msg and not (tmp_path / "out").exists()
    use_tokenizer(user, tmp_path / "fits", model_vocab_size=n)  # equal is fine


@pytest.mark.parametrize("name,content,expect", [
    ("missing.json", None, "no such file"),
    ("notjson.json", b"vocab = {}\n", "not valid JSON"),
    ("binary.json", b"\x89PNG\r\n\x1a\n\x00\xff", "not UTF-8"),
    ("other.json", b'{"name": "a package.json", "version": "1.0"}', "without a tokenizers 'model'"),
    ("broken.json", b'{"version": "1.0", "model": {"type": "BPE", "vocab": 7}}', "not a tokenizer"),
])
def test_not_a_tokenizer_is_refused_naming_the_file(tmp_path: Path, name: str, content: bytes | None,
                                                    expect: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BadInputError) as e:
        use_tokenizer(path, tmp_path / "out", model_vocab_size=4096)
    msg = str(e.value)
    assert msg.startswith(str(path)) and expect in msg and "\n" not in msg, msg
    assert not (tmp_path / "out").exists()


def test_tokenizer_without_end_of_document_token_is_refused(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    path = tmp_path / "noeos.json"
    Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(path))
    with pytest.raises(BadInputError, match="end-of-document token"):
        use_tokenizer(path, tmp_path / "out", model_vocab_size=4096)
    assert not (tmp_path / "out").exists()
