"""Tokenizer training (deterministic, train split only) and packing (EOS, manifest,
sample -> documents and text), on a slice of the bundled sample corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from k2repro.core.hashing import sha256_file
from k2repro.data.dedup import dedup
from k2repro.data.engine import iter_shard
from k2repro.data.pack import pack, sample_text, tokenizer_path
from k2repro.data.packed import PackedDataset
from k2repro.data.prepare import assign_splits, prepare
from k2repro.data.tokenizer import EOS, decode, load_tokenizer, train_tokenizer
from k2repro.errors import BadInputError, ConfigError

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 64


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:  # noqa: ANN001
    w = tmp_path_factory.mktemp("work")
    prepare(REPO / "data" / "sample", w / "prepared", max_docs=120, val_fraction=0.1)
    dedup(w / "prepared", w / "dedup")
    train_tokenizer(w / "dedup", w / "tokenizer", vocab_size=512, min_frequency=2)
    pack(w / "dedup", w / "tokenizer", w / "packed", seq_len=SEQ_LEN)
    return w


def _docs(folder: Path, split: str) -> dict[str, str]:
    """doc id -> text of one split of a docs folder (its gzip JSONL shards)."""
    return {d["doc_id"]: d["text"] for p in sorted((folder / split).glob("*.jsonl.gz")) for d in iter_shard(p)}


def test_tokenizer_is_deterministic_and_lossless(work: Path, tmp_path: Path) -> None:
    train_tokenizer(work / "dedup", tmp_path / "again", vocab_size=512, min_frequency=2)
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (work / "tokenizer" / "tokenizer.json").read_bytes()
    tok = load_tokenizer(work / "tokenizer")
    assert tok.get_vocab_size() == 512 and tok.token_to_id(EOS) == 0
    for text in list(_docs(work / "dedup", "val").values())[:3] + ["naïve café 東京 \t x = 1\n"]:
        assert decode(tok, tok.encode(text).ids) == text


def test_tokenizer_learns_from_train_split_only(tmp_path: Path) -> None:
    ids = [f"k{i}" for i in range(40)]
    side = assign_splits([f"c:{i}" for i in ids], 0.2, 1234)
    val_key = next(i for i in ids if side[f"c:{i}"] == "val")
    recs = [{"id": i, "text": f"ordinary words number {i} " * 20} for i in ids]
    recs[ids.index(val_key)]["text"] = "zqxjvk " * 400  # only in a validation document
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    prepare(tmp_path / "c.jsonl", tmp_path / "p", val_fraction=0.2)
    dedup(tmp_path / "p", tmp_path / "d")
    train_tokenizer(tmp_path / "d", tmp_path / "t", vocab_size=400, min_frequency=2)
    vocab = load_tokenizer(tmp_path / "t").get_vocab()
    assert not [t for t in vocab if "zqx" in t]
    assert [t for t in vocab if "ordinary" in t]


def test_vocab_too_small_is_a_config_error_and_writes_nothing(work: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.vocab_size"):
        train_tokenizer(work / "dedup", tmp_path / "tok", vocab_size=100)
    assert not (tmp_path / "tok").exists()


def test_pack_manifest_records_tokenizer_domains_and_upstream(work: Path) -> None:
    ds = PackedDataset(work / "packed", "train")
    m = ds.manifest
    assert m["seq_len"] == SEQ_LEN and m["eos_id"] == 0 and m["vocab_size"] == 512
    assert tokenizer_path(work / "packed").resolve() == (work / "tokenizer" / "tokenizer.json").resolve()
    assert m["tokenizer"] == "tokenizer/tokenizer.json"
    assert m["tokenizer_sha256"] == sha256_file(work / "tokenizer" / "tokenizer.json")
    assert m["domains"] == ["code", "prose"]
    arts = {a["artifact"]: a for a in m["artifacts"]}
    for name in ("packed/train.bin", "packed/val.bin", "dedup/train/00000", "dedup/val/00000", "prepared/train/00000",
                 "tokenizer/tokenizer.json", "corpus/code.jsonl.gz", "corpus/prose.jsonl.gz"):
        assert name in arts, name
        p = work / "packed" / ".." / arts[name]["path"] if not name.startswith("packed/") else work / "packed" / arts[name]["path"]
        assert sha256_file(p) == arts[name]["sha256"], name
    assert arts["dedup/train/00000"]["n_tokens"] == sum(v["n_tokens"] for v in m["domain_stats"]["train"].values())
    ds.verify()
    assert len(PackedDataset(work / "packed", "val")) > 0


def test_eos_after_every_document(work: Path) -> None:
    ds = PackedDataset(work / "packed", "train")
    stream = np.asarray(ds.tokens).reshape(-1)
    ends = (ds.docs["token_start"] + ds.docs["n_tokens"]).to_numpy()
    ends = ends[ends < stream.size]
    assert len(ends) > 10 and (stream[ends] == ds.eos_id).all()
    assert (stream == ds.eos_id).sum() == len(ends)  # and nowhere else


def test_sample_text_maps_samples_to_documents_and_their_text(work: Path) -> None:
    texts = _docs(work / "dedup", "train")
    ds = PackedDataset(work / "packed", "train")
    domains = {str(a): str(b) for a, b in zip(ds.docs["doc_id"], ds.docs["domain"])}
    ends = (ds.docs["token_start"] + ds.docs["n_tokens"]).to_numpy()
    boundary = sorted({int(e) // (SEQ_LEN + 1) for e in ends if e // (SEQ_LEN + 1) < len(ds)})
    multi = 0
    for sid in list(range(0, len(ds), max(1, len(ds) // 30))) + boundary[:30]:
        parts = sample_text(work / "packed", "train", sid)
        assert parts and [p["doc_id"] for p in parts] == [d for d in ds.docs_of(sid) if d in {p["doc_id"] for p in parts}]
        multi += len(parts) > 1
        assert sum(p["n_tokens"] for p in parts) + sum(1 for t in ds.get([sid])[0] if t == ds.eos_id) == SEQ_LEN + 1
        for p in parts:
            assert p["domain"] == domains[p["doc_id"]]
            assert len(p["snippet"]) > 0 and p["snippet"] in texts[p["doc_id"]]
    assert multi > 0  # some windows span a document boundary
    with pytest.raises(BadInputError, match="out of range"):
        sample_text(work / "packed", "train", len(ds))
