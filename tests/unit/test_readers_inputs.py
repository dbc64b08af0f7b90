"""Inputs of issue 22: the same records as JSONL (plain, .gz, .zst), Parquet and a real Hugging
Face `datasets` save_to_disk folder give the same documents and, through the CLI stages, the
same packed data; globs and folders resolve in a fixed order; reading streams with bounded
memory; fingerprints for lineage; every kind of bad input is one line naming the file and
line (or row), exit code 2, no output folder."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from k2repro.cli.main import main
from k2repro.data.readers import (
    FULL_HASH_MAX,
    fingerprint,
    iter_inputs,
    read_file,
    read_source,
    resolve_inputs,
)
from k2repro.errors import BadInputError

REPO = Path(__file__).resolve().parents[2]
FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "datasets")


@pytest.fixture(scope="module")
def records() -> list[dict]:
    """Real documents (a round-robin slice of the sample corpus, cut to 2 KB so the stages
    stay fast) under other field names, plus an exact copy under another id, non-ASCII text
    and an empty document (prepare drops it)."""
    recs = [{"uid": d.doc_id.split(":", 1)[1], "body": d.text[:2000], "domain": d.domain}
            for d in read_source(REPO / "data" / "sample", max_docs=48)]
    recs.append({"uid": "copy-of-first", "body": recs[0]["body"], "domain": recs[0]["domain"]})
    recs.append({"uid": "unicode", "body": "naïve café 東京 \t x = 1\n\u00e9t\u00e9 " * 20, "domain": "prose"})
    recs.append({"uid": "empty", "body": "  \n ", "domain": "prose"})
    return recs


def _jsonl_bytes(recs: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode()


def write_as(fmt: str, folder: Path, recs: list[dict], name: str = "corpus", shards: int = 3) -> Path:
    """`recs` written as `fmt` into `folder`; returns what to pass as an input."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "datasets":
        import datasets

        datasets.disable_progress_bars()
        datasets.Dataset.from_list(recs).save_to_disk(str(folder / name), num_shards=shards)
        return folder / name
    path = folder / f"{name}.{fmt}"
    if fmt == "parquet":  # several row groups and batches
        pq.write_table(pa.Table.from_pylist(recs), path, row_group_size=7, write_page_checksum=True)
    elif fmt.endswith(".zst"):
        with pa.output_stream(str(path), compression="zstd") as out:
            out.write(_jsonl_bytes(recs))
    else:
        data = _jsonl_bytes(recs)
        path.write_bytes(gzip.compress(data, mtime=0) if fmt.endswith(".gz") else data)
    return path


@pytest.fixture(scope="module")
def corpora(records: list[dict], tmp_path_factory) -> dict[str, Path]:  # noqa: ANN001
    root = tmp_path_factory.mktemp("corpora")
    return {fmt: write_as(fmt, root / fmt.replace(".", "_"), records) for fmt in FORMATS}


def _triples(inputs: object, **kw: str) -> list[tuple[str, str, str]]:
    return [(d.doc_id, d.domain, d.text) for d in iter_inputs(resolve_inputs(inputs), **kw)]


def test_every_format_gives_the_same_documents_with_mapped_fields(records: list[dict], corpora: dict[str, Path]) -> None:
    want = [(f"corpus:{r['uid']}", r["domain"], r["body"]) for r in records]
    for fmt, path in corpora.items():
        assert _triples(path, text_field="body", id_field="uid") == want, fmt
    formats = {fmt: {f.format for f in resolve_inputs(p)} for fmt, p in corpora.items()}
    assert formats == {"jsonl": {"jsonl"}, "jsonl.gz": {"jsonl"}, "jsonl.zst": {"jsonl"},
                       "parquet": {"parquet"}, "datasets": {"datasets"}}
    assert len(resolve_inputs(corpora["datasets"])) == 3  # three shards, one dataset


def test_row_ids_span_dataset_shards_and_match_parquet(records: list[dict], corpora: dict[str, Path],
                                                       tmp_path: Path) -> None:
    """Without an id field a row's key is its row number in the whole dataset, so the shard
    count of save_to_disk does not change ids, and Parquet rows get the same ids."""
    one = write_as("datasets", tmp_path / "one", records, shards=1)
    by_parquet = _triples(corpora["parquet"], text_field="body", id_field="no_such_field")
    assert by_parquet[:2] == [("corpus:R0", records[0]["domain"], records[0]["body"]),
                              ("corpus:R1", records[1]["domain"], records[1]["body"])]
    assert _triples(corpora["datasets"], text_field="body", id_field="no_such_field") == by_parquet
    assert _triples(one, text_field="body", id_field="no_such_field") == by_parquet
    shards = resolve_inputs(corpora["datasets"])
    assert [f.row0 for f in shards] == [0, 17, 34]  # 51 rows in three shards
    # one shard read on its own (as one executor task would) keeps the whole dataset's keys
    assert next(read_file(shards[2], "body", "no_such_field")).doc_id == "corpus:R34"
    # JSONL without ids: the line number
    assert _triples(corpora["jsonl"], text_field="body", id_field="x")[1][0] == "corpus:L2"


def test_dataset_dict_folder_gives_one_part_per_split(records: list[dict], tmp_path: Path) -> None:
    import datasets

    datasets.disable_progress_bars()
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:5]),
                               "test": datasets.Dataset.from_list(records[5:7])})
    dd.save_to_disk(str(tmp_path / "dd"))
    ids = [d.doc_id for d in iter_inputs(resolve_inputs(tmp_path / "dd", "datasets"), "body", "uid")]
    assert ids == [f"dd/test:{r['uid']}" for r in records[5:7]] + [f"dd/train:{r['uid']}" for r in records[:5]]


def test_folders_globs_and_lists_resolve_in_a_fixed_order(records: list[dict], tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_as("datasets", root, records[:4], name="hf")
    write_as("jsonl", root / "b", records[:2], name="x")
    write_as("parquet", root, records[:3], name="a")
    write_as("jsonl.zst", root / "b" / "deep", records[:1], name="z")
    (root / "README.md").write_text("about this corpus")
    (root / ".cache.jsonl").write_text("not read")
    parts = [(f.part, f.format) for f in resolve_inputs(root)]
    assert parts == [("a", "parquet"), ("b/deep/z", "jsonl"), ("b/x", "jsonl"),
                     ("hf", "datasets"), ("hf", "datasets"), ("hf", "datasets")]
    assert [f.part for f in resolve_inputs(f"{root}/**/*.jsonl*")] == ["b/deep/z", "b/x"]
    assert [f.part for f in resolve_inputs(f"{root}/b/*")] == ["deep/z", "x"]  # named below the glob's fixed folder
    assert [f.part for f in resolve_inputs([root / "b", root / "a.parquet"])] == ["a", "deep/z", "x"]
    assert {f.part for f in resolve_inputs(f"{root}/h*")} == {"hf"}  # a glob matching a dataset folder
    # a pattern reaching into a dataset folder selects the dataset, not its Arrow files
    assert resolve_inputs(f"{root}/**/*") == resolve_inputs(root)
    assert {f.part for f in resolve_inputs(f"{root}/hf/*.arrow")} == {"hf"}
    lit = write_as("jsonl", tmp_path / "lit", records[:1], name="odd[1]")  # a real name, not a pattern
    assert [f.part for f in resolve_inputs(str(lit))] == ["odd[1]"]
    assert [f.rel for f in resolve_inputs(root)][:3] == ["a.parquet", "b/deep/z.jsonl.zst", "b/x.jsonl"]
    assert resolve_inputs(root)[3].rel == "hf/data-00000-of-00003.arrow"
    assert pickle.loads(pickle.dumps(resolve_inputs(root))) == resolve_inputs(root)  # to workers
    # overlapping inputs name a file once
    assert resolve_inputs([root, f"{root}/*.parquet"]) == resolve_inputs(root)
    assert [f.part for f in resolve_inputs(root, "parquet")] == ["a"]
    assert {f.part for f in resolve_inputs(root, "datasets")} == {"hf"}
    assert {f.path.name for f in resolve_inputs(root, "text")} == {"README.md", "a.parquet", "x.jsonl",
                                                                   "z.jsonl.zst"}
    # the same tree built in another order resolves to the same list
    other = tmp_path / "other"
    (other / "b" / "deep").mkdir(parents=True)
    for rel in ("b/deep/z.jsonl.zst", "README.md", "a.parquet", "b/x.jsonl"):
        (other / rel).write_bytes((root / rel).read_bytes())
    write_as("datasets", other, records[:4], name="hf")
    rel = [(f.path.relative_to(other), f.part, f.size, f.row0) for f in resolve_inputs(other)]
    assert rel == [(f.path.relative_to(root), f.part, f.size, f.row0) for f in resolve_inputs(root)]


def test_two_files_with_one_id_prefix_are_an_error(tmp_path: Path) -> None:
    write_as("jsonl", tmp_path, [{"text": "a"}], name="a")
    write_as("parquet", tmp_path, [{"text": "b"}], name="a")
    with pytest.raises(BadInputError, match=r"a\.jsonl and .*a\.parquet: both give document ids 'a:\.\.\.'"):
        resolve_inputs(tmp_path)


def test_sample_corpus_ids_are_unchanged() -> None:
    """The default input keeps its ids (so prepared splits and dedup reports do not move)."""
    docs = read_source(REPO / "data" / "sample")
    assert len(docs) == 1807 and docs[0].doc_id.startswith("code:cpython-3.11.2/Lib/")
    assert {d.doc_id.split(":", 1)[0] for d in docs} == {"code", "prose"}
    assert [f.part for f in resolve_inputs(REPO / "data" / "sample")] == ["code", "prose"]
    assert [f.compression for f in resolve_inputs(REPO / "data" / "sample")] == ["gzip", "gzip"]


def test_fingerprint_full_sha256_then_named_sampled_hash(tmp_path: Path) -> None:
    small = tmp_path / "s.jsonl"
    small.write_text('{"text": "x"}\n')
    fp = fingerprint(resolve_inputs(small)[0])
    assert fp["algo"] == "sha256" and fp["sha256"] == hashlib.sha256(small.read_bytes()).hexdigest() == fp["digest"]
    big = tmp_path / "big.parquet"
    with open(big, "wb") as f:  # sparse: FULL_HASH_MAX + 5 MiB without writing them
        f.truncate(FULL_HASH_MAX + (5 << 20))
    fp = fingerprint(big)
    assert fp["algo"] == "sha256-sampled-16x1MiB" and "sha256" not in fp and fp["size"] == big.stat().st_size
    with open(big, "r+b") as f:  # a byte inside the last sampled block
        f.seek(big.stat().st_size - 1)
        f.write(b"\x01")
    assert fingerprint(big)["digest"] != fp["digest"]
    with open(big, "ab") as f:
        f.write(b"\x00")
    assert fingerprint(big)["size"] == fp["size"] + 1


def test_reading_streams_with_bounded_memory(tmp_path: Path) -> None:
    """~25 MB of text as JSONL.gz and as Parquet in ONE row group: Python's heap (tracemalloc)
    and Arrow's allocations stay a small fraction of it while every document is read (the
    whole-file read of earlier releases peaks above the text size; pyarrow's default Parquet
    reading, which pre-buffers the row group, at 14 MB of Arrow memory)."""
    words = sorted({w for w in (REPO / "data" / "sample" / "SOURCES.md").read_text().split() if w.isalpha()})
    rng = random.Random(0)  # random words: the file does not compress to nothing
    recs = [{"id": f"d{i}", "text": " ".join(rng.choices(words, k=190))} for i in range(20000)]
    total = sum(len(r["text"]) for r in recs)
    assert total > 24e6
    with gzip.open(tmp_path / "big.jsonl.gz", "wb", compresslevel=1) as f:
        f.write(_jsonl_bytes(recs))
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "big.parquet", row_group_size=len(recs))
    del recs
    for name in ("big.jsonl.gz", "big.parquet"):
        f = resolve_inputs(tmp_path / name)[0]
        tracemalloc.start()
        n, seen, arrow_peak = 0, 0, 0
        try:
            for d in read_file(f):
                n += 1
                seen += len(d.text)
                if n % 200 == 0:
                    arrow_peak = max(arrow_peak, pa.total_allocated_bytes())
            heap_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert n == 20000 and seen == total, name
        assert heap_peak < total / 8, (name, heap_peak)  # measured: 0.1 MB (gz), 1.4 MB (Parquet: a batch)
        # measured: 0 (gz), 5.1-5.4 MB (Parquet: read buffer, a page, a batch); 14 MB when
        # pyarrow pre-buffers the row group
        assert arrow_peak < 8e6, (name, arrow_peak)


# ---------------------------------------------------------------- bad input through the CLI


def _corrupt_parquet_page(folder: Path) -> Path:
    p = write_as("parquet", folder, [{"text": f"document {i} " * 30} for i in range(30)], name="c")
    col = pq.ParquetFile(p).metadata.row_group(2).column(0)
    end = (col.dictionary_page_offset or col.data_page_offset) + col.total_compressed_size
    data = bytearray(p.read_bytes())
    data[end - 12 : end - 4] = b"\x07" * 8  # inside the last page of row group 2 (rows 14..20)
    p.write_bytes(bytes(data))
    return p


def _truncated_parquet(folder: Path) -> Path:
    p = write_as("parquet", folder, [{"text": "x"}] * 10, name="c")
    p.write_bytes(p.read_bytes()[:-30])
    return p


def _jsonl_without_text(folder: Path) -> Path:
    p = folder / "c.jsonl"
    p.write_text('{"text": "one"}\n\n{"text": "two"}\n{"body": "three"}\n')
    return p


def _invalid_json(folder: Path) -> Path:
    p = folder / "c.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"text": "one"}\n{"text": "two",\n'))
    return p


def _truncated_gz(folder: Path) -> Path:
    p = folder / "c.jsonl.gz"
    data = gzip.compress(b"".join(b'{"text": "document %d"}\n' % i for i in range(2000)))
    p.write_bytes(data[: len(data) // 2])
    return p


def _corrupt_zst(folder: Path) -> Path:
    p = write_as("jsonl.zst", folder, [{"text": f"document {i}"} for i in range(500)], name="c")
    data = bytearray(p.read_bytes())
    data[8:40] = b"\xff" * 32
    p.write_bytes(bytes(data))
    return p


def _datasets_without_state(folder: Path) -> Path:
    d = write_as("datasets", folder, [{"text": "a"}, {"text": "b"}], name="ds", shards=2)
    (d / "state.json").unlink()
    return d


def _datasets_missing_shard(folder: Path) -> Path:
    d = write_as("datasets", folder, [{"text": "a"}, {"text": "b"}], name="ds", shards=2)
    (d / "data-00001-of-00002.arrow").unlink()
    return d


def _datasets_truncated_shard(folder: Path) -> Path:
    d = write_as("datasets", folder, [{"text": f"document {i} " * 50} for i in range(40)], name="ds", shards=2)
    shard = d / "data-00001-of-00002.arrow"
    shard.write_bytes(shard.read_bytes()[:-500])
    return d


def _null_text_row(folder: Path) -> Path:
    return write_as("parquet", folder, [{"text": "a"}, {"text": "b"}, {"text": None}], name="c")


# (builder, extra overrides, what the one-line message must contain)
BAD = {
    "parquet_corrupt_page": (_corrupt_parquet_page, [], "c.parquet:row 14: not a readable Parquet file"),
    "parquet_truncated": (_truncated_parquet, [], "c.parquet: not a readable Parquet file"),
    "parquet_null_text": (_null_text_row, [], "c.parquet:row 2: column 'text' is null"),
    "jsonl_no_text_field": (_jsonl_without_text, [], "c.jsonl:4: no text field 'text'"),
    "jsonl_invalid_json": (_invalid_json, [], "c.jsonl.gz:2: not valid JSON"),
    "gz_truncated": (_truncated_gz, [], "c.jsonl.gz:"),
    "zst_corrupt": (_corrupt_zst, [], "c.jsonl.zst:1: cannot decompress (zstd)"),
    "datasets_missing": (lambda d: d / "no_such_dataset", ["data.format=datasets"],
                         "no_such_dataset: no such Hugging Face datasets folder"),
    "datasets_without_state": (_datasets_without_state, [], "ds: not a Hugging Face datasets folder (Arrow files but no state.json"),
    "datasets_missing_shard": (_datasets_missing_shard, [], "data-00001-of-00002.arrow: missing (listed in"),
    "datasets_truncated_shard": (_datasets_truncated_shard, [], "data-00001-of-00002.arrow:row 0: not a readable Arrow file"),
    "empty_glob": (lambda d: d / "*.jsonl", [], "*.jsonl: the pattern matches no file"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    build, overrides, expect = BAD[case]
    src = build(tmp_path)
    out = tmp_path / "out"
    rc = main(["data", "prepare", "--in", str(src), "--out", str(out), f"data.work_dir={tmp_path / 'w'}", *overrides])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("k2repro data: error: "), err
    assert expect in err, err
    if case == "gz_truncated":
        assert "cannot decompress (gzip)" in err and err.split("c.jsonl.gz:")[1].split(":")[0].isdigit(), err
    assert not out.exists() and not (tmp_path / "w").exists()


def test_bad_input_exit_code_of_the_real_process(tmp_path: Path) -> None:
    src = _jsonl_without_text(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "k2repro", "data", "prepare", "--in", str(src), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().endswith("c.jsonl:4: no text field 'text' (set data.text_field)"), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the whole chain per format


def _chain(src: Path, work: Path) -> dict[str, bytes]:
    common = [f"data.work_dir={work}", f"data.packed_dir={work / 'packed'}", "data.text_field=body",
              "data.vocab_size=300", "train.seq_len=32"]
    assert main(["data", "prepare", "--in", str(src), *common]) == 0
    for stage in ("dedup", "tokenize", "pack"):
        assert main(["data", stage, *common]) == 0, stage
    packed = work / "packed"
    out = {p.name: p.read_bytes() for p in sorted(packed.iterdir()) if p.name != "manifest.json"}
    m = json.loads((packed / "manifest.json").read_text())
    out["manifest:splits+domains"] = json.dumps([m.get("splits"), m.get("domain_stats"), m.get("domains"),
                                                 m.get("tokenizer_sha256"), m.get("dedup")], sort_keys=True).encode()
    return out


def test_jsonl_parquet_and_datasets_give_the_same_packed_data(records: list[dict], tmp_path: Path) -> None:
    # records keyed by `id`, the default id field, so the stages' own id mapping is not needed
    recs = [{"id": r["uid"], "body": r["body"], "domain": r["domain"]} for r in records]
    packed = {fmt: _chain(write_as(fmt, tmp_path / f"in_{i}", recs), tmp_path / f"work_{i}")
              for i, fmt in enumerate(("jsonl", "parquet", "datasets"))}
    ref = packed["jsonl"]
    assert {"train.bin", "val.bin", "train.docs.parquet", "val.docs.parquet"} <= set(ref)
    assert len(ref["train.bin"]) > 1000
    for fmt in ("parquet", "datasets"):
        assert packed[fmt].keys() == ref.keys(), fmt
        diff = [k for k in ref if packed[fmt][k] != ref[k]]
        assert not diff, (fmt, diff)
