"""`k2repro data prepare`: read the inputs, normalise, split train/validation by document.

A datatrove pipeline of `data.tasks` tasks (k2repro.data.engine): task `r` reads input files
`r, r + T, ...` (in the inputs' sorted order), streams their records, and writes its shard
`{train,val}/<r>.jsonl.gz`; the driver then writes the manifest from the tasks' counts. Nothing
holds the corpus in memory, and the output depends on `data.tasks`, never on `data.workers`.

The split is a pure function of (document id, split seed): a document's side never changes
when other documents are added or removed, and near-duplicate removal later runs over both
sides together, so no document leaks from train into validation through a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from k2repro.core.atomic import atomic_dir
from k2repro.data import engine as eng
from k2repro.data.readers import (
    ID_FIELD,
    InputFile,
    fingerprint,
    normalize_text,
    read_file,
    resolve_inputs,
)
from k2repro.data.workdir import DOCS_FORMAT, SPLITS, relpath, shard_artifacts, write_json
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


def _quota(max_docs: int, n_files: int, i: int) -> int:
    """File i's share of `max_docs` (0: all): an equal cut, the remainder to the first files."""
    if max_docs <= 0:
        return -1
    return max_docs // n_files + (1 if i < max_docs % n_files else 0)


class PrepareShard(eng.Step):
    """One task: read its input files, normalise, drop empty texts, split, write its shards."""

    name = "prepare: read, normalise, split"

    def __init__(self, scratch: str, out: str, files: list[InputFile], text_field: str, id_field: str,
                 val_fraction: float, split_seed: int, max_docs: int, redraw: bool = True) -> None:
        super().__init__(scratch)
        self.out, self.files, self.text_field, self.id_field = out, files, text_field, id_field
        self.redraw = redraw
        self.val_fraction, self.split_seed, self.max_docs = val_fraction, split_seed, max_docs

    def work(self, rank: int, world_size: int) -> None:
        out = Path(self.out)
        st: dict = {"n_read": 0, "n_empty": 0, "per_file": {}, "min": None,
                    "splits": {s: {"n_docs": 0, "n_bytes": 0, "domains": {}} for s in SPLITS}}
        quota = [_quota(self.max_docs, len(self.files), i) for i in range(rank, len(self.files), world_size)]
        prog = eng.task_progress(STAGE, rank, world_size, sum(quota) if self.max_docs > 0 else None, self.redraw)
        with prog, eng.gzip_writer(out / eng.shard_name("train", rank)) as ftrain, \
                eng.gzip_writer(out / eng.shard_name("val", rank)) as fval:
            sink = {"train": ftrain, "val": fval}
            for i in range(rank, len(self.files), world_size):
                quota, n_file = _quota(self.max_docs, len(self.files), i), 0
                seen: dict[str, str] = {}
                for r in read_file(self.files[i], self.text_field, self.id_field):
                    if n_file == quota:
                        break
                    n_file += 1
                    st["n_read"] += 1
                    if r.doc_id in seen:
                        raise BadInputError(f"{r.origin}: duplicate document id '{r.doc_id}' (first at {seen[r.doc_id]})")
                    seen[r.doc_id] = r.origin
                    text = normalize_text(r.text)
                    prog.update(1, len(text.encode("utf-8")))
                    if not text.strip():
                        st["n_empty"] += 1
                        continue
                    score = val_score(r.doc_id, self.split_seed)
                    split = "val" if score < self.val_fraction else "train"
                    if split == "train" and (st["min"] is None or (score, r.doc_id) < tuple(st["min"])):
                        st["min"] = [score, r.doc_id]
                    sink[split].write(eng.dump_doc({"doc_id": r.doc_id, "domain": r.domain, "text": text}))
                    s = st["splits"][split]
                    s["n_docs"] += 1
                    s["n_bytes"] += len(text.encode("utf-8"))
                    s["domains"][r.domain] = s["domains"].get(r.domain, 0) + 1
                st["per_file"][str(i)] = n_file
        (Path(self.scratch) / "stats").mkdir(exist_ok=True)
        (Path(self.scratch) / "stats" / f"{rank:05d}.json").write_text(json.dumps(st), encoding="utf-8")


def _move_to_val(out: Path, rank: int, doc_id: str) -> dict:
    """Move one document from task `rank`'s train shard to its val shard (the tiny-corpus rule
    of `assign_splits`); returns it."""
    moved = None
    train, val = out / eng.shard_name("train", rank), out / eng.shard_name("val", rank)
    kept = [d for d in eng.iter_shard(train) if d["doc_id"] != doc_id or (moved := d) is None]
    with eng.gzip_writer(train) as f:
        f.writelines(eng.dump_doc(d) for d in kept)
    vals = list(eng.iter_shard(val)) + [moved]
    with eng.gzip_writer(val) as f:
        f.writelines(eng.dump_doc(d) for d in vals)
    assert moved is not None
    return moved


def prepare(
    source: str | os.PathLike | list[str],
    out: str | os.PathLike,
    text_field: str = "text",
    fmt: str = "auto",
    val_fraction: float = 0.05,
    split_seed: int = 1234,
    max_docs: int = 0,
    engine: eng.Engine | None = None,
    id_field: str = ID_FIELD,
) -> dict:
    """Read `source` (one input or a list: files, folders, globs), write
    `<out>/{train,val}/<task>.jsonl.gz` and `manifest.json`; returns the manifest.

    The output folder appears whole or not at all (bad input anywhere: nothing is written)."""
    if not 0 <= val_fraction < 1:
        raise BadInputError(f"data.val_fraction must be in [0, 1) (got {val_fraction})")
    engine = (engine or eng.Engine()).checked()
    inputs = [str(s) for s in source] if isinstance(source, list | tuple) else [str(source)]
    files = resolve_inputs(inputs, fmt)
    out = Path(out)
    with eng.scratch_dir(out) as scratch, atomic_dir(out) as tmp:
        step = PrepareShard(str(scratch), str(tmp), files, text_field, id_field, val_fraction, split_seed, max_docs,
                            engine.redraw())
        eng.run_pipeline([step], engine, engine.tasks, scratch)
        stats = [json.loads((scratch / "stats" / f"{r:05d}.json").read_text(encoding="utf-8"))
                 for r in range(engine.tasks)]
        n_docs = sum(s["splits"][k]["n_docs"] for s in stats for k in SPLITS)
        n_read = sum(s["n_read"] for s in stats)
        if not n_docs:
            raise BadInputError(f"{', '.join(inputs)}: empty corpus (no document with text; read {n_read} records)")
        splits = {k: {"n_docs": sum(s["splits"][k]["n_docs"] for s in stats),
                      "n_bytes": sum(s["splits"][k]["n_bytes"] for s in stats),
                      "domains": _merge_counts(s["splits"][k]["domains"] for s in stats)} for k in SPLITS}
        if val_fraction > 0 and n_docs >= 2 and splits["val"]["n_docs"] == 0:
            rank, (_, doc_id) = min(((r, s["min"]) for r, s in enumerate(stats) if s["min"]), key=lambda x: x[1])
            d = _move_to_val(tmp, rank, doc_id)
            for k, sign in (("train", -1), ("val", 1)):
                splits[k]["n_docs"] += sign
                splits[k]["n_bytes"] += sign * len(d["text"].encode("utf-8"))
                splits[k]["domains"][d["domain"]] = splits[k]["domains"].get(d["domain"], 0) + sign
                splits[k]["domains"] = {a: b for a, b in sorted(splits[k]["domains"].items()) if b}
        per_file: dict[int, int] = {int(i): n for s in stats for i, n in s["per_file"].items()}
        params = {"inputs": [relpath(i, out) for i in inputs], "text_field": text_field, "id_field": id_field,
                  "format": fmt, "val_fraction": val_fraction, "split_seed": split_seed, "max_docs": max_docs,
                  "tasks": engine.tasks}
        manifest: dict = {
            "stage": STAGE, "format": DOCS_FORMAT, "params": params,
            "lineage": {STAGE: params | {"datatrove": eng.datatrove_version()}},
            "datatrove": eng.datatrove_version(),
            "inputs": [_input_row(f, out, per_file.get(i, 0)) for i, f in enumerate(files)],
            "n_read": n_read, "n_empty_dropped": sum(s["n_empty"] for s in stats), "n_docs": n_docs,
            "splits": splits,
            "artifacts": shard_artifacts(tmp, "prepared", engine.tasks,
                                         {k: [s["splits"][k]["n_docs"] for s in stats] for k in SPLITS}),
        }
        write_json(tmp / "manifest.json", manifest)
        eng.write_execution(tmp, engine, STAGE)
    return manifest


def _merge_counts(dicts) -> dict[str, int]:  # noqa: ANN001 - an iterable of {name: count}
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def _input_row(f: InputFile, out: Path, n_docs: int) -> dict:
    """A corpus file's lineage row: its name below its input, path relative to the output
    folder, sha256 (or, above 64 MiB, a sampled fingerprint: `fingerprint` says which), size,
    reader and documents read."""
    fp = fingerprint(f)
    return {"artifact": f"corpus/{f.rel or f.path.name}", "path": relpath(f.path, out),
            "sha256": fp.get("sha256") or fp["digest"], "fingerprint": fp["algo"], "bytes": f.size,
            "reader": f.format, "n_docs": n_docs, "n_tokens": 0}
