"""`k2repro data {prepare,dedup,tokenize,pack}` as real processes: byte-identical reruns, bad
input (exit 2, file and line named, no output folder), the dedup report on the real corpus."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STAGES = ("prepare", "dedup", "tokenize", "pack")


def k2(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "K2REPRO_CONF": str(REPO / "conf"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "k2repro", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def chain(cwd: Path, work: str, *overrides: str) -> list[dict]:
    out = []
    common = ["--config-name", "pipeline", f"data.source={REPO / 'data' / 'sample'}", f"data.work_dir={work}",
              f"data.packed_dir={work}/packed", *overrides]
    for stage in STAGES:
        r = k2(cwd, "data", stage, *common, "--json")
        assert r.returncode == 0, r.stderr
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return out


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def slice_run(tmp_path_factory) -> Path:  # noqa: ANN001
    cwd = tmp_path_factory.mktemp("cli")
    summaries = chain(cwd, "w1", "data.max_docs=150")
    assert [s["stage"] for s in summaries] == list(STAGES)
    assert summaries[3]["train_samples"] > 0 and summaries[3]["val_samples"] > 0
    return cwd


def test_rerun_gives_byte_identical_outputs(slice_run: Path) -> None:
    first = digests(slice_run / "w1")
    assert {"prepared/train/00000.jsonl.gz", "dedup/report.json", "tokenizer/tokenizer.json", "packed/train.bin",
            "packed/manifest.json"} <= set(first)
    chain(slice_run, "w1", "data.max_docs=150")  # in place, as `dvc repro` would after a change
    chain(slice_run, "w2", "data.max_docs=150")  # and into a fresh folder
    assert digests(slice_run / "w1") == first
    assert digests(slice_run / "w2") == first
    # no temporary folders left next to the outputs
    assert sorted(p.name for p in (slice_run / "w1").iterdir()) == ["dedup", "packed", "prepared", "tokenizer"]


def _bad(tmp_path: Path, stage: str, *args: str) -> str:
    r = k2(tmp_path, "data", stage, *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    # progress lines (`k2repro data: info: prepare: done, ...`) of work that finished before the
    # stage found the problem may come first; the error itself is one line, and the last
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("k2repro data: info: ")]
    assert len(lines) == 1 and lines[0].startswith("k2repro data: error: "), r.stderr
    return lines[0]


def test_missing_path(tmp_path: Path) -> None:
    msg = _bad(tmp_path, "prepare", "--in", "nowhere/corpus.jsonl", "--out", "out")
    assert "nowhere/corpus.jsonl" in msg and "no such file" in msg
    assert not (tmp_path / "out").exists()


def test_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "empty.jsonl").write_text("")
    (tmp_path / "c" / "blank.jsonl").write_text('{"text": "   "}\n')
    msg = _bad(tmp_path, "prepare", "--in", "c", "--out", "out")
    assert "c: empty corpus" in msg
    assert not (tmp_path / "out").exists()


def test_non_utf8_bytes(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": "\xff\xfe"}\n')
    msg = _bad(tmp_path, "prepare", "--in", "bad.jsonl", "--out", "out")
    assert "bad.jsonl:3: not valid UTF-8" in msg
    assert not (tmp_path / "out").exists()


def test_jsonl_line_without_text_field_leaves_existing_output_unchanged(tmp_path: Path) -> None:
    (tmp_path / "good.jsonl").write_text('{"text": "one document"}\n{"text": "another one"}\n')
    assert k2(tmp_path, "data", "prepare", "--in", "good.jsonl", "--out", "out").returncode == 0
    before = digests(tmp_path / "out")
    (tmp_path / "x.jsonl").write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    msg = _bad(tmp_path, "prepare", "--in", "x.jsonl", "--out", "out")
    assert "x.jsonl:2: no text field 'text'" in msg
    assert digests(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.jsonl", "out", "x.jsonl"]


def test_vocab_size_too_small(slice_run: Path) -> None:
    msg = _bad(slice_run, "tokenize", "--in", "w1/dedup", "--out", "tok_small", "data.vocab_size=100")
    assert "data.vocab_size" in msg
    assert not (slice_run / "tok_small").exists()


def test_tokenizer_train_mb_reaches_the_stage_and_is_checked(slice_run: Path) -> None:
    """data.tokenizer_train_mb from the command line bounds the training sample (recorded in
    the manifest); a bound that is not positive is one line naming the key, exit 2, no output."""
    r = k2(slice_run, "data", "tokenize", "--config-name", "pipeline", "--in", "w1/dedup", "--out", "tok_bounded",
           "data.tokenizer_train_mb=0.2", "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads((slice_run / "tok_bounded" / "manifest.json").read_text())
    assert m["params"]["train_mb"] == 0.2 and 0 < m["sample"]["bytes"] <= 200_000
    assert m["sample"]["docs"] < m["sample"]["of_docs"]
    msg = _bad(slice_run, "tokenize", "--in", "w1/dedup", "--out", "tok_zero", "data.tokenizer_train_mb=0")
    assert "data.tokenizer_train_mb" in msg and not (slice_run / "tok_zero").exists()


def test_dedup_report_lists_real_duplicates_of_the_sample_corpus(tmp_path: Path) -> None:
    for stage in ("prepare", "dedup"):
        r = k2(tmp_path, "data", stage, f"data.source={REPO / 'data' / 'sample'}", "data.work_dir=w")
        assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "w" / "dedup" / "report.json").read_text())
    c = report["counts"]
    assert c["input_docs"] > 1500 and c["exact_removed"] > 100 and c["near_removed"] > 20
    assert c["kept_docs"] == c["input_docs"] - c["exact_removed"] - c["near_removed"]
    exact = [x for x in report["clusters"] if x["kind"] == "exact"]
    near = [x for x in report["clusters"] if x["kind"] == "near"]
    assert len(exact) > 50 and len(near) > 20
    # packages built from one source share a copyright file (libglvnd: libegl1, libgl1, ...)
    glvnd = next(x for x in exact if "prose:debian-copyright/libgl1" in {r["doc_id"] for r in x["removed"]} | {x["kept"]})
    assert glvnd["size"] >= 5
    # the same standard-library module in two releases
    pairs = {(x["kept"], r["doc_id"]) for x in near for r in x["removed"]}
    assert any(k.startswith("code:cpython-3.11.2/") and d.startswith("code:cpython-3.11.7/") for k, d in pairs)
    assert all(x["kept_snippet"] and all(r["snippet"] for r in x["removed"]) for x in near)
    md = (tmp_path / "w" / "dedup" / "report.md").read_text()
    assert "Near duplicate clusters" in md and "Exact duplicate clusters" in md
    removed = [json.loads(line) for line in (tmp_path / "w" / "dedup" / "removed.jsonl").read_text().splitlines()]
    assert len(removed) == c["exact_removed"] + c["near_removed"]


@pytest.mark.slow
def test_full_corpus_chain_is_byte_identical_on_rerun(tmp_path: Path) -> None:
    summaries = chain(tmp_path, "w")
    first = digests(tmp_path / "w")
    assert summaries[3]["train_tokens"] > 1_000_000
    chain(tmp_path, "w")
    assert digests(tmp_path / "w") == first
