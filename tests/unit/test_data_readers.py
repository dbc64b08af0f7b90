"""Corpus readers: JSONL(.gz), Parquet, text folders; stable ids; normalisation; bad input."""

from __future__ import annotations

import gzip
import json
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from k2repro.data.prepare import assign_splits, prepare, val_score
from k2repro.data.readers import normalize_text, read_source, source_files
from k2repro.errors import BadInputError

REPO = Path(__file__).resolve().parents[2]


def _jsonl(path: Path, recs: list[dict], gz: bool = False) -> None:
    data = "".join(json.dumps(r) + "\n" for r in recs).encode()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_jsonl_gz_with_custom_text_field_ids_and_domains(tmp_path: Path) -> None:
    _jsonl(tmp_path / "a.jsonl.gz", [{"content": "first", "id": "x1", "domain": "code"}, {"content": "second"}], gz=True)
    docs = read_source(tmp_path / "a.jsonl.gz", text_field="content")
    assert [(d.doc_id, d.domain, d.text) for d in docs] == [("a:x1", "code", "first"), ("a:L2", "other", "second")]
    with pytest.raises(BadInputError, match=r"a\.jsonl\.gz:1: no text field 'text'"):
        read_source(tmp_path / "a.jsonl.gz")


def test_parquet_reader(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["alpha", "beta"], "domain": ["prose", "prose"]}), tmp_path / "p.parquet")
    docs = read_source(tmp_path / "p.parquet", text_field="body")
    assert [(d.doc_id, d.domain, d.text) for d in docs] == [("p:R0", "prose", "alpha"), ("p:R1", "prose", "beta")]
    with pytest.raises(BadInputError, match=r"p\.parquet: no column 'text'"):
        read_source(tmp_path / "p.parquet")


def test_text_folder_one_document_per_file_domain_by_extension(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text("def f():\n    return 1\n")
    (tmp_path / "notes.txt").write_text("Some prose.\n")
    (tmp_path / ".hidden").write_text("skipped")
    docs = read_source(tmp_path)
    assert [(d.doc_id, d.domain) for d in docs] == [("notes.txt", "prose"), ("src/m.py", "code")]
    assert [k for _, k in source_files(tmp_path)] == ["text", "text"]


def test_folder_with_record_files_ignores_other_files(tmp_path: Path) -> None:
    _jsonl(tmp_path / "b.jsonl", [{"text": "b"}])
    _jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    (tmp_path / "README.md").write_text("about this data")
    assert [d.doc_id for d in read_source(tmp_path)] == ["a:L1", "b:L1"]
    # format=text forces a folder of text files
    assert len(read_source(tmp_path, fmt="text")) == 3


def test_ids_do_not_shift_when_other_files_or_records_change(tmp_path: Path) -> None:
    _jsonl(tmp_path / "b.jsonl", [{"text": "b1", "id": "k1"}, {"text": "b2", "id": "k2"}])
    before = {d.doc_id: d.text for d in read_source(tmp_path)}
    _jsonl(tmp_path / "a.jsonl", [{"text": "new"}])
    _jsonl(tmp_path / "b.jsonl", [{"text": "b0", "id": "k0"}, {"text": "b1", "id": "k1"}, {"text": "b2", "id": "k2"}])
    after = {d.doc_id: d.text for d in read_source(tmp_path)}
    assert all(after[k] == v for k, v in before.items())


def test_sample_corpus_has_both_domains_and_max_docs_round_robins(tmp_path: Path) -> None:
    docs = read_source(REPO / "data" / "sample", max_docs=40)
    assert len(docs) == 40
    assert {d.domain for d in docs} == {"code", "prose"}
    assert sum(d.domain == "code" for d in docs) == 20


def test_normalize_text() -> None:
    decomposed = "Cafe\u0301\r\nline two   \t\n\n\n\n\nend\u00a0word\x00"
    out = normalize_text(decomposed)
    assert out == "Caf\u00e9\nline two\n\nend word"
    assert unicodedata.is_normalized("NFC", out)
    assert normalize_text("    indented code\n") == "    indented code"  # leading indentation stays


def test_non_utf8_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(BadInputError, match=r"bad\.jsonl:2: not valid UTF-8"):
        read_source(tmp_path / "bad.jsonl")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x.txt").write_bytes(b"line1\nline2\n\xff\n")
    with pytest.raises(BadInputError, match=r"x\.txt:3: not valid UTF-8"):
        read_source(tmp_path / "t")


def test_bad_json_line_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "j.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(BadInputError, match=r"j\.jsonl:2: not valid JSON"):
        read_source(tmp_path / "j.jsonl")
    with pytest.raises(BadInputError, match="no such file or directory"):
        read_source(tmp_path / "missing")


def test_split_is_by_document_seeded_and_stable() -> None:
    ids = [f"part:{i}" for i in range(2000)]
    a = assign_splits(ids, 0.1, 7)
    assert 150 < sum(v == "val" for v in a.values()) < 250
    # a document's side depends only on (id, seed): removing others does not move it
    b = assign_splits(ids[::3], 0.1, 7)
    assert all(b[k] == a[k] for k in b)
    assert assign_splits(ids, 0.1, 8) != a
    assert 0 <= val_score("x", 1) < 1


def test_prepare_drops_empty_and_rejects_duplicate_ids(tmp_path: Path) -> None:
    _jsonl(tmp_path / "c.jsonl", [{"text": "  \n\t "}, {"text": "real text", "id": "r"}, {"text": "more", "id": "s"}])
    m = prepare(tmp_path / "c.jsonl", tmp_path / "out", val_fraction=0.5)
    assert m["n_read"] == 3 and m["n_empty_dropped"] == 1 and m["n_docs"] == 2
    assert m["splits"]["val"]["n_docs"] >= 1
    _jsonl(tmp_path / "d.jsonl", [{"text": "a", "id": "same"}, {"text": "b", "id": "same"}])
    with pytest.raises(BadInputError, match=r"d\.jsonl:2: duplicate document id 'd:same'"):
        prepare(tmp_path / "d.jsonl", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
