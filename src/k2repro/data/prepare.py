"""`k2repro data prepare`: read a corpus, normalise, split train/validation by document.

The split is a pure function of (document id, split seed): a document's side never changes
when other documents are added or removed, and near-duplicate removal later runs over both
sides together, so no document leaks from train into validation through a copy.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from k2repro.core.atomic import atomic_dir
from k2repro.core.hashing import sha256_file
from k2repro.data.readers import normalize_text, read_source, source_files
from k2repro.data.workdir import (
    DOCS_FORMAT,
    SPLITS,
    artifact,
    domain_counts,
    relpath,
    write_docs,
    write_json,
)
from k2repro.errors import BadInputError

STAGE = "prepare"


def val_score(doc_id: str, split_seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, doc id)."""
    h = hashlib.sha256(f"{split_seed}\x00{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def assign_splits(doc_ids: list[str], val_fraction: float, split_seed: int) -> dict[str, str]:
    """doc id -> `train`|`val`: `val` where val_score < val_fraction. When that leaves the
    validation side empty on a tiny corpus, the document with the smallest score moves there
    (still a pure function of the ids), so evaluation always has data."""
    scores = {d: val_score(d, split_seed) for d in doc_ids}
    out = {d: "val" if s < val_fraction else "train" for d, s in scores.items()}
    if val_fraction > 0 and len(doc_ids) >= 2 and "val" not in out.values():
        out[min(scores, key=lambda d: (scores[d], d))] = "val"
    return out


def prepare(
    source: str | os.PathLike,
    out: str | os.PathLike,
    text_field: str = "text",
    fmt: str = "auto",
    val_fraction: float = 0.05,
    split_seed: int = 1234,
    max_docs: int = 0,
) -> dict:
    """Read `source`, write `<out>/{train,val}.jsonl` and `manifest.json`; returns the manifest.

    Everything is read and checked before the output folder is touched."""
    if not 0 <= val_fraction < 1:
        raise BadInputError(f"data.val_fraction must be in [0, 1) (got {val_fraction})")
    raw = read_source(source, text_field=text_field, fmt=fmt, max_docs=max_docs)
    seen: dict[str, str] = {}
    docs: list[dict] = []
    n_empty = 0
    for r in raw:
        if r.doc_id in seen:
            raise BadInputError(f"{r.origin}: duplicate document id '{r.doc_id}' (first at {seen[r.doc_id]})")
        seen[r.doc_id] = r.origin
        text = normalize_text(r.text)
        if not text.strip():
            n_empty += 1
            continue
        docs.append({"doc_id": r.doc_id, "domain": r.domain, "text": text})
    if not docs:
        raise BadInputError(f"{source}: empty corpus (no document with text; read {len(raw)} records)")
    docs.sort(key=lambda d: d["doc_id"])
    side = assign_splits([d["doc_id"] for d in docs], val_fraction, split_seed)
    by_split = {s: [d for d in docs if side[d["doc_id"]] == s] for s in SPLITS}

    src = Path(source)
    inputs = [{"artifact": f"corpus/{p.name if src.is_file() else p.relative_to(src).as_posix()}",
               "path": relpath(p, out), "sha256": sha256_file(p), "n_docs": 0, "n_tokens": 0}
              for p, _ in source_files(src, fmt)]
    manifest: dict = {
        "stage": STAGE, "format": DOCS_FORMAT,
        "params": {"source": str(source), "text_field": text_field, "format": fmt,
                   "val_fraction": val_fraction, "split_seed": split_seed, "max_docs": max_docs},
        "inputs": inputs,
        "n_read": len(raw), "n_empty_dropped": n_empty, "n_docs": len(docs),
        "splits": {}, "artifacts": [],
    }
    with atomic_dir(out) as tmp:
        for s in SPLITS:
            name = f"{s}.jsonl"
            write_docs(tmp / name, by_split[s])
            manifest["splits"][s] = {
                "n_docs": len(by_split[s]), "domains": domain_counts(by_split[s]),
                "n_bytes": sum(len(d["text"].encode("utf-8")) for d in by_split[s]),
            }
            manifest["artifacts"].append(artifact(tmp, name, f"prepared/{s}", n_docs=len(by_split[s])))
        write_json(tmp / "manifest.json", manifest)
    return manifest
