"""Shared plumbing of the data stages: atomic output folders, document files, manifests.

Every stage writes its whole output folder into a temporary sibling and renames it into
place, so a failed or killed stage leaves the previous output (or nothing) and never half a
folder. Files are written byte-deterministically (sorted keys, fixed separators, no
timestamps), so a rerun on the same input gives the same sha256 for every file and DVC sees
no change.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from k2repro.core.hashing import sha256_file
from k2repro.errors import BadInputError

DOCS_FORMAT = "k2repro-docs-v2"  # v2: gzip JSONL shards {train,val}/<task>.jsonl.gz
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def dumps(obj: object) -> str:
    """Canonical JSON for manifests and reports (sorted keys, stable floats)."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(path: Path, obj: object) -> None:
    path.write_text(dumps(obj), encoding="utf-8")


def write_docs(path: Path, docs: Iterable[dict]) -> int:
    """One JSON object per line (`doc_id`, `domain`, `text`); returns the count."""
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False, sort_keys=True, separators=(",", ":")))
            f.write("\n")
            n += 1
    return n


def read_docs(path: Path) -> list[dict]:
    """Documents written by `write_docs` (a stage's own output, so errors are corruption)."""
    if not path.exists():
        raise BadInputError(f"{path}: missing (run the previous `k2repro data` stage)")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                d = json.loads(line)
                out.append({"doc_id": d["doc_id"], "domain": d["domain"], "text": d["text"]})
            except (json.JSONDecodeError, KeyError, TypeError):
                raise BadInputError(f"{path}:{lineno}: not a document record (doc_id, domain, text)") from None
    return out


def read_manifest(directory: Path, stage: str) -> dict:
    path = directory / MANIFEST
    if not path.exists():
        raise BadInputError(f"{path}: missing (run `k2repro data {stage}` first)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if m.get("stage") != stage:
        raise BadInputError(f"{path}: not the output of `k2repro data {stage}` (stage={m.get('stage')!r})")
    fmt = m.get("format", "")
    if fmt.startswith("k2repro-docs") and fmt != DOCS_FORMAT:
        raise BadInputError(f"{path}: written in format {fmt}, this k2repro reads {DOCS_FORMAT} (rerun `k2repro data {stage}`)")
    return m


def artifact(directory: Path, name: str, artifact_name: str, n_docs: int = 0, n_tokens: int = 0) -> dict:
    """A data_manifest row for a file of a stage's output folder."""
    return {"artifact": artifact_name, "path": name, "sha256": sha256_file(directory / name),
            "n_docs": int(n_docs), "n_tokens": int(n_tokens)}


def shard_artifacts(directory: Path, stage: str, tasks: int, n_docs: dict[str, list[int]]) -> list[dict]:
    """Manifest rows of a docs folder's shards, in (split, task) order: the order every later
    stage reads them in."""
    from k2repro.data.engine import shard_name

    rows = []
    for s in SPLITS:
        for k in range(tasks):
            name = shard_name(s, k)
            rows.append({**artifact(directory, name, f"{stage}/{s}/{k:05d}", n_docs=n_docs[s][k]),
                         "split": s, "bytes": (directory / name).stat().st_size})
    return rows


def relpath(path: str | os.PathLike, base: str | os.PathLike) -> str:
    """`path` relative to the folder `base` (POSIX separators), whatever the working dir."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(base)).replace(os.sep, "/")


def rebase(rows: Iterable[dict], old_dir: str | os.PathLike, new_dir: str | os.PathLike) -> list[dict]:
    """Artefact rows whose `path` is relative to `old_dir`, made relative to `new_dir`."""
    return [{**r, "path": relpath(Path(old_dir) / r["path"], new_dir)} for r in rows]


def domain_counts(docs: Iterable[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in docs:
        out[d["domain"]] = out.get(d["domain"], 0) + 1
    return dict(sorted(out.items()))
