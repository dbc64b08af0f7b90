"""`k2repro data pack`: tokenize the deduplicated documents into packed windows, and map a
packed sample back to its documents and text.

The packed folder (format in `k2repro.data.packed`) records in its manifest the tokenizer
(path relative to the packed folder's parent, and sha256), the domains, and every upstream
artefact (corpus files, prepared and deduplicated documents, tokenizer) with its sha256, so
the trainer can write the whole chain into the store's `data_manifest`.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np

from k2repro.core.hashing import sha256_file
from k2repro.data.packed import MANIFEST, Doc, PackedDataset, write_packed
from k2repro.data.progress import Progress
from k2repro.data.tokenizer import TOKENIZER_FILE, eos_id, eos_token, load_tokenizer
from k2repro.data.workdir import SPLITS, read_docs, read_manifest, rebase, relpath
from k2repro.errors import BadInputError

STAGE = "pack"
ENCODE_BATCH = 256


def pack(in_dir: str | os.PathLike, tokenizer: str | os.PathLike, out: str | os.PathLike, seq_len: int) -> dict:
    """Encode `<in_dir>/{train,val}.jsonl` (dedup's output) with the tokenizer, write the
    packed folder `out` (windows of seq_len + 1 tokens, EOS after every document)."""
    if seq_len < 2:
        raise BadInputError(f"train.seq_len must be >= 2 (got {seq_len})")
    src, out = Path(in_dir), Path(out)
    tok_path = Path(tokenizer)
    if tok_path.is_dir():
        tok_path = tok_path / TOKENIZER_FILE
    dedup_m = read_manifest(src, "dedup")
    tok_m = read_manifest(tok_path.parent, "tokenize")
    tok = load_tokenizer(tok_path)
    eos = eos_id(tok)
    tok_sha = sha256_file(tok_path)
    if tok_sha != tok_m["artifacts"][0]["sha256"]:
        raise BadInputError(f"{tok_path}: sha256 differs from {tok_path.parent / 'manifest.json'} (rerun `k2repro data tokenize`)")

    splits: dict[str, list[Doc]] = {}
    stats: dict[str, dict] = {}
    all_docs = {s: read_docs(src / f"{s}.jsonl") for s in SPLITS}
    prog = Progress(STAGE, total_docs=sum(map(len, all_docs.values())))
    for s in SPLITS:
        docs = all_docs[s]
        encoded: list[Doc] = []
        for k in range(0, len(docs), ENCODE_BATCH):
            chunk = docs[k : k + ENCODE_BATCH]
            texts = [d["text"] for d in chunk]
            for d, e in zip(chunk, tok.encode_batch(texts, add_special_tokens=False)):
                encoded.append(Doc(d["doc_id"], d["domain"], np.asarray(e.ids, dtype=np.int64)))
            prog.update(len(chunk), sum(len(t.encode("utf-8")) for t in texts))
        splits[s] = encoded
        per_dom: dict[str, dict[str, int]] = {}
        for d in encoded:
            st = per_dom.setdefault(d.domain, {"n_docs": 0, "n_tokens": 0})
            st["n_docs"] += 1
            st["n_tokens"] += int(d.tokens.size) + 1  # + EOS
        stats[s] = dict(sorted(per_dom.items()))

    base = out.parent
    extra = rebase(dedup_m.get("inputs", []), src, base)
    for row in rebase(dedup_m["artifacts"], src, base):
        split = row["artifact"].split("/", 1)[1]
        if split in stats:  # now known: the tokens of the deduplicated documents
            row["n_tokens"] = sum(v["n_tokens"] for v in stats[split].values())
        extra.append(row)
    extra += rebase(tok_m["artifacts"], tok_path.parent, base)

    domains = sorted({d for s in stats.values() for d in s})
    meta = {
        "stage": STAGE,
        "tokenizer": relpath(tok_path, base), "tokenizer_sha256": tok_sha, "tokenizer_relative_to": "packed_dir_parent",
        "eos_token": eos_token(tok), "domains": domains, "domain_stats": stats,
        "dedup": {k: dedup_m["counts"][k] for k in ("input_docs", "kept_docs", "dedup_ratio")},
        **({"tokenizer_supplied": {"source": tok_m["source"], "sha256": tok_m["sha256"]}} if tok_m.get("supplied") else {}),
    }
    with prog:  # the summary line comes once the packed folder is written
        return write_packed(out, splits, seq_len=seq_len, vocab_size=tok.get_vocab_size(), eos_id=eos,
                            extra_artifacts=extra, meta=meta)


def tokenizer_path(packed_dir: str | os.PathLike) -> Path:
    """The tokenizer.json a packed folder was made with (its manifest's `tokenizer`)."""
    d = Path(packed_dir)
    try:
        m = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"{d / MANIFEST}: missing (run `k2repro data pack`)") from None
    if "tokenizer" not in m:
        raise BadInputError(f"{d / MANIFEST}: records no tokenizer")
    return d.parent / m["tokenizer"]


@functools.lru_cache(maxsize=4)
def _tokenizer_for(path: str, sha: str):  # noqa: ANN202 - cached per (path, content)
    return load_tokenizer(path)


def _trim(s: str) -> str:
    # A window can start or end inside a multi-byte character; the cut bytes decode to U+FFFD.
    return s.strip("\ufffd")


def sample_text(packed_dir: str | os.PathLike, split: str, sample_id: int) -> list[dict]:
    """The documents one packed sample holds, in order: `doc_id`, `domain`, `snippet` (the
    decoded text of that document inside the window), `offset` (the first token's position
    in the window), `n_tokens`, and `doc_token_start` (where the window starts in the
    document). For `k2repro batch` and forensics."""
    ds = PackedDataset(packed_dir, split)
    if not 0 <= sample_id < len(ds):
        raise BadInputError(f"sample {sample_id} out of range for split '{split}' of {packed_dir} ({len(ds)} samples)")
    tpath = tokenizer_path(packed_dir)
    tok = _tokenizer_for(str(tpath), sha256_file(tpath))
    window = ds.get([sample_id])[0]
    w = ds.seq_len + 1
    lo, hi = sample_id * w, (sample_id + 1) * w
    docs = ds.docs
    starts = docs["token_start"].to_numpy()
    lens = docs["n_tokens"].to_numpy()
    first = int(np.searchsorted(starts + lens + 1, lo, side="right"))
    last = int(np.searchsorted(starts, hi, side="left"))
    out = []
    for k in range(first, last):
        a, b = max(int(starts[k]), lo), min(int(starts[k] + lens[k]), hi)  # the EOS is not text
        if b <= a:
            continue
        out.append({
            "doc_id": str(docs["doc_id"].iloc[k]), "domain": str(docs["domain"].iloc[k]),
            "snippet": _trim(tok.decode([int(t) for t in window[a - lo : b - lo]], skip_special_tokens=False)),
            "offset": a - lo, "n_tokens": b - a, "doc_token_start": a - int(starts[k]),
        })
    return out
