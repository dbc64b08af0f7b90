"""Tokenizer training (deterministic, train split only, a bounded sample of a large split)
and packing (EOS, manifest, sample -> documents and text, batched encoding), on a slice of
the bundled sample corpus; side-by-side workers' share of the CPUs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from k2repro.core.hashing import sha256_file
from k2repro.data.dedup import dedup
from k2repro.data.engine import iter_shard, shards_of, thread_share
from k2repro.data.pack import encode_docs, pack, sample_text, tokenizer_path
from k2repro.data.packed import PackedDataset
from k2repro.data.prepare import assign_splits, prepare
from k2repro.data.tokenizer import (
    EOS,
    TrainSample,
    build_trainer,
    decode,
    load_tokenizer,
    sample_key,
    train_tokenizer,
)
from k2repro.data.workdir import read_manifest
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


def _train_docs(work: Path) -> list[dict]:
    m = read_manifest(work / "dedup", "dedup")
    return [d for p in shards_of(m, ["train"]) for d in iter_shard(work / "dedup" / p)]


def test_pack_encoding_gives_the_ids_of_a_plain_encode(work: Path) -> None:
    tok = load_tokenizer(work / "tokenizer")
    texts = [d["text"] for d in _train_docs(work)[:40]] + ["naïve café 東京 \t x = 1\n", "", "<|endoftext|> a"]
    ids, lens = encode_docs(tok, texts, eos=0)
    want: list[int] = []
    for t in texts:
        e = tok.encode(t, add_special_tokens=False).ids
        want += [*e, 0]
    assert ids.dtype.name == "uint32" and ids.tolist() == want
    assert lens == [len(tok.encode(t, add_special_tokens=False).ids) for t in texts]


def test_pack_batches_and_join_chunks_do_not_change_an_output_byte(work: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Pack's memory bounds (encode batches of at most ENCODE_BATCH_BYTES, the join copying
    COPY_TOKENS at a time) are not part of the result: one document per batch and 7-token
    chunks write the packed folder of the defaults, byte for byte."""
    import k2repro.data.pack as pk

    monkeypatch.setattr(pk, "ENCODE_BATCH_BYTES", 1)
    monkeypatch.setattr(pk, "COPY_TOKENS", 7)
    pk.pack(work / "dedup", work / "tokenizer", tmp_path / "packed", seq_len=SEQ_LEN)
    for name in ("train.bin", "val.bin", "train.docs.parquet", "val.docs.parquet"):
        assert (tmp_path / "packed" / name).read_bytes() == (work / "packed" / name).read_bytes(), name
    assert PackedDataset(tmp_path / "packed", "train").manifest["splits"] == PackedDataset(work / "packed", "train").manifest["splits"]


def test_tokenizer_within_the_bound_trains_on_everything_and_records_nothing_new(work: Path) -> None:
    m = json.loads((work / "tokenizer" / "manifest.json").read_text())
    kept = read_manifest(work / "dedup", "dedup")["counts"]["kept_bytes"]
    assert kept < 256e6  # the default bound is far above this corpus
    assert "sample" not in m and "train_mb" not in m["params"]  # the manifest of an unbounded run
    tok, trainer = build_trainer(512, 2)
    tok.train_from_iterator([d["text"] for d in _train_docs(work)], trainer=trainer)
    assert tok.to_str(pretty=True) == load_tokenizer(work / "tokenizer").to_str(pretty=True)


def test_tokenizer_sample_is_bounded_deterministic_and_recorded(work: Path, tmp_path: Path) -> None:
    kept = read_manifest(work / "dedup", "dedup")["counts"]["kept_bytes"]
    mb = round(kept * 0.4 / 1e6, 6)
    a = train_tokenizer(work / "dedup", tmp_path / "a", vocab_size=512, min_frequency=2, train_mb=mb)
    b = train_tokenizer(work / "dedup", tmp_path / "b", vocab_size=512, min_frequency=2, train_mb=mb)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert a == b
    s = a["sample"]
    assert a["params"]["train_mb"] == mb and s["max_mb"] == mb
    docs = _train_docs(work)
    assert s["of_docs"] == len(docs) and 0 < s["docs"] < len(docs) and 0 < s["bytes"] <= mb * 1e6
    # the documents drawn: by increasing salted hash of the id while they fit, read in shard order
    size = {d["doc_id"]: len(d["text"].encode("utf-8")) for d in docs}
    taken, total = set(), 0
    for doc_id in sorted(size, key=sample_key):
        if total + size[doc_id] > mb * 1e6:
            break
        taken.add(doc_id)
        total += size[doc_id]
    chosen = [d["text"] for d in docs if d["doc_id"] in taken]
    assert (len(chosen), total) == (s["docs"], s["bytes"])
    assert total > mb * 1e6 - max(size.values())  # it stopped only when the next one did not fit
    tok, trainer = build_trainer(512, 2)
    tok.train_from_iterator(chosen, trainer=trainer)
    assert tok.to_str(pretty=True) == load_tokenizer(tmp_path / "a").to_str(pretty=True)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() != (work / "tokenizer" / "tokenizer.json").read_bytes()


def test_train_sample_never_passes_its_bound() -> None:
    rng = random.Random(3)
    docs = [{"doc_id": f"c:{i}", "text": "x" * rng.randint(1, 5000)} for i in range(2000)]
    total = sum(len(d["text"]) for d in docs)
    for max_bytes in (1, 4000, 100_000, total // 3, total - 1):
        s = TrainSample(max_bytes, total)
        s.plan(iter(docs))
        got = list(s.texts(iter(docs)))
        assert s.bounded and sum(map(len, got)) == s.bytes <= max_bytes and s.seen == len(docs)
        assert len(got) == s.planned_docs
        # the smallest keys, up to the first that does not fit
        taken = [d for d in docs if sample_key(d["doc_id"]) <= s.cutoff]
        nxt = min((d for d in docs if sample_key(d["doc_id"]) > s.cutoff), key=lambda d: sample_key(d["doc_id"]))
        assert [d["text"] for d in taken] == got and s.bytes + len(nxt["text"]) > max_bytes
    s = TrainSample(total, total)  # the whole corpus fits: every document, in order
    assert not s.bounded and list(s.texts(iter(docs))) == [d["text"] for d in docs]


def test_sample_hash_is_independent_of_the_split_hash() -> None:
    ids = [f"c:{i}" for i in range(4000)]
    side = assign_splits(ids, 0.5, 1234)
    low = sorted(ids, key=sample_key)[:2000]  # the half a sample would take first
    share_val = sum(side[i] == "val" for i in low) / len(low)
    assert 0.45 < share_val < 0.55  # same ids, yet the sample is not the validation half


def test_tokenizer_train_mb_must_be_positive(work: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.tokenizer_train_mb"):
        train_tokenizer(work / "dedup", tmp_path / "t", vocab_size=512, train_mb=0)
    assert not (tmp_path / "t").exists()


def test_thread_share_splits_the_cpus_between_workers() -> None:
    assert [thread_share(w, cpus=8) for w in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    assert thread_share(2, cpus=2) == 1
