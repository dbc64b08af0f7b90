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

from k2repro.core.atomic import atomic_dir
from k2repro.core.hashing import sha256_file
from k2repro.data import engine as eng
from k2repro.data.packed import FORMAT, MANIFEST, PackedDataset
from k2repro.data.tokenizer import TOKENIZER_FILE, eos_id, eos_token, load_tokenizer
from k2repro.data.workdir import SPLITS, read_manifest, rebase, relpath
from k2repro.errors import BadInputError

STAGE = "pack"
# A batch handed to the tokenizer at once: enough documents that its thread pool has work for
# every thread (the batch is split between them), few enough bytes that the batch's encodings
# stay small (measured: ~45 bytes of memory per text byte while a batch is encoded).
ENCODE_BATCH = 1024
ENCODE_BATCH_BYTES = 4 << 20
COPY_TOKENS = 1 << 22  # tokens per chunk when the driver joins the task shards


def encode_docs(tok, texts: list[str], eos: int) -> tuple[np.ndarray, list[int]]:  # noqa: ANN001 - tokenizers.Tokenizer
    """The token stream of `texts` (each document's ids, then EOS) as uint32, and each
    document's token count (EOS not included).

    `encode_batch_fast` gives the same ids as `encode_batch` without computing character
    offsets, which pack never reads (a third of the encoding time on this corpus); one
    Python list then one array per batch, not an array and two writes per document."""
    flat: list[int] = []
    lens: list[int] = []
    for e in tok.encode_batch_fast(texts, add_special_tokens=False):
        ids = e.ids
        lens.append(len(ids))
        flat += ids
        flat.append(eos)
    return np.array(flat, dtype=np.uint32), lens


class PackShards(eng.Step):
    """One task: encode its dedup shards; per shard a raw token stream (EOS after every
    document, uint32) and a document table (doc_id, domain, n_tokens)."""

    name = "pack: encode shards"

    def __init__(self, scratch: str, src: str, shards: list[str], n_docs: list[int], tokenizer: str,
                 redraw: bool) -> None:
        super().__init__(scratch)
        self.src, self.shards, self.n_docs, self.tokenizer, self.redraw = src, shards, n_docs, tokenizer, redraw

    def _encode(self, tok, eos: int, batch: list[dict], nbytes: int, fbin, fdocs, stats: dict, prog) -> None:  # noqa: ANN001
        ids, lens = encode_docs(tok, [d["text"] for d in batch], eos)
        fbin.write(ids.tobytes())
        fdocs.write("".join(json.dumps([d["doc_id"], d["domain"], n]) + "\n" for d, n in zip(batch, lens)))
        for d, n in zip(batch, lens):
            st = stats.setdefault(d["domain"], {"n_docs": 0, "n_tokens": 0})
            st["n_docs"] += 1
            st["n_tokens"] += n + 1  # + EOS
        prog.update(len(batch), nbytes)

    def work(self, rank: int, world_size: int) -> None:
        tok = load_tokenizer(self.tokenizer)
        eos = eos_id(tok)
        sc = Path(self.scratch)
        mine = range(rank, len(self.shards), world_size)
        prog = eng.task_progress(STAGE, rank, world_size, sum(self.n_docs[j] for j in mine), self.redraw)
        for j in mine:
            stats: dict[str, dict[str, int]] = {}
            with open(sc / f"{j:05d}.bin", "wb") as fbin, open(sc / f"{j:05d}.docs", "w", encoding="utf-8") as fdocs:
                batch: list[dict] = []
                nbytes = 0
                for d in eng.iter_shard(Path(self.src) / self.shards[j]):
                    batch.append(d)
                    nbytes += len(d["text"].encode("utf-8"))
                    if len(batch) == ENCODE_BATCH or nbytes >= ENCODE_BATCH_BYTES:
                        self._encode(tok, eos, batch, nbytes, fbin, fdocs, stats, prog)
                        batch, nbytes = [], 0
                if batch:
                    self._encode(tok, eos, batch, nbytes, fbin, fdocs, stats, prog)
            (sc / f"{j:05d}.json").write_text(json.dumps(stats), encoding="utf-8")
        prog.close()


def _join_split(sc: Path, idx: list[int], tmp: Path, split: str, window: int, dtype: type, vocab_size: int) -> dict:
    """Concatenate the split's shard streams into `<split>.bin` (whole windows only) and their
    document tables into `<split>.docs.parquet`, streaming."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    total = sum((sc / f"{j:05d}.bin").stat().st_size // 4 for j in idx)
    n_samples = total // window
    keep = n_samples * window
    written, pos, n_docs = 0, 0, 0
    schema = pa.schema([("doc_id", pa.string()), ("domain", pa.string()), ("token_start", pa.int64()),
                        ("n_tokens", pa.int64())])
    with open(tmp / f"{split}.bin", "wb") as fout, pq.ParquetWriter(tmp / f"{split}.docs.parquet", schema) as pw:
        for j in idx:
            # read in chunks, not memory-mapped: the pages of a mapped shard would count in this
            # process's resident memory until unmapped (a whole shard, GBs on a large corpus)
            with open(sc / f"{j:05d}.bin", "rb") as fin:
                while (chunk := np.fromfile(fin, dtype=np.uint32, count=COPY_TOKENS)).size:
                    if int(chunk.max()) >= vocab_size:
                        raise BadInputError(f"pack: shard {j} has token ids outside [0, {vocab_size})")
                    take = chunk[: max(0, keep - written)]
                    fout.write(take.astype(dtype).tobytes())
                    written += take.size
            ids, doms, starts, lens = [], [], [], []
            with open(sc / f"{j:05d}.docs", encoding="utf-8") as f:
                for line in f:
                    doc_id, dom, nt = json.loads(line)
                    ids.append(doc_id)
                    doms.append(dom)
                    starts.append(pos)
                    lens.append(nt)
                    pos += nt + 1
            n_docs += len(ids)
            pw.write_table(pa.table([pa.array(ids, pa.string()), pa.array(doms, pa.string()),
                                     pa.array(starts, pa.int64()), pa.array(lens, pa.int64())], schema=schema))
    return {"n_samples": int(n_samples), "n_docs": n_docs, "n_tokens": int(keep), "dropped_tail_tokens": int(total - keep),
            "stream_tokens": int(pos)}


def pack(in_dir: str | os.PathLike, tokenizer: str | os.PathLike, out: str | os.PathLike, seq_len: int,
         engine: eng.Engine | None = None) -> dict:
    """Encode dedup's shards with the tokenizer (`data.tasks` tasks), then join them in shard
    order into the packed folder `out` (format k2repro.data.packed: windows of seq_len + 1
    tokens, EOS after every document); returns the manifest."""
    if seq_len < 2:
        raise BadInputError(f"train.seq_len must be >= 2 (got {seq_len})")
    engine = (engine or eng.Engine()).checked()
    src, out = Path(in_dir), Path(out)
    tok_path = Path(tokenizer)
    if tok_path.is_dir():
        tok_path = tok_path / TOKENIZER_FILE
    dedup_m = read_manifest(src, "dedup")
    tok_m = read_manifest(tok_path.parent, "tokenize")
    tok = load_tokenizer(tok_path)
    eos = eos_id(tok)
    vocab_size = tok.get_vocab_size()
    tok_sha = sha256_file(tok_path)
    if tok_sha != tok_m["artifacts"][0]["sha256"]:
        raise BadInputError(f"{tok_path}: sha256 differs from {tok_path.parent / 'manifest.json'} (rerun `k2repro data tokenize`)")
    shards = eng.shards_of(dedup_m, SPLITS)
    split_of = [a["split"] for a in dedup_m["artifacts"] if a.get("split") in SPLITS]
    dtype = np.uint16 if vocab_size <= 65535 else np.uint32
    window = seq_len + 1
    with eng.scratch_dir(out) as sc, atomic_dir(out) as tmp:
        n_docs = [a["n_docs"] for a in dedup_m["artifacts"] if a.get("split") in SPLITS]
        step = PackShards(str(sc), str(src), shards, n_docs, str(tok_path.resolve()), engine.redraw())
        eng.run_pipeline([step], engine, engine.tasks, sc)
        shard_stats = [json.loads((sc / f"{j:05d}.json").read_text(encoding="utf-8")) for j in range(len(shards))]
        manifest: dict = {"format": FORMAT, "seq_len": seq_len, "vocab_size": vocab_size, "eos_id": eos,
                          "dtype": np.dtype(dtype).name, "splits": {}, "artifacts": []}
        stats: dict[str, dict] = {}
        for s in SPLITS:
            idx = [j for j in range(len(shards)) if split_of[j] == s]
            info = _join_split(sc, idx, tmp, s, window, dtype, vocab_size)
            stream_tokens = info.pop("stream_tokens")
            manifest["splits"][s] = info
            manifest["artifacts"] += [
                {"artifact": f"packed/{s}.bin", "path": f"{s}.bin", "sha256": sha256_file(tmp / f"{s}.bin"),
                 "n_docs": info["n_docs"], "n_tokens": info["n_tokens"], "bytes": (tmp / f"{s}.bin").stat().st_size},
                {"artifact": f"packed/{s}.docs", "path": f"{s}.docs.parquet",
                 "sha256": sha256_file(tmp / f"{s}.docs.parquet"), "n_docs": info["n_docs"],
                 "n_tokens": stream_tokens, "bytes": (tmp / f"{s}.docs.parquet").stat().st_size}]
            per_dom: dict[str, dict[str, int]] = {}
            for j in idx:
                for dom, v in shard_stats[j].items():
                    st = per_dom.setdefault(dom, {"n_docs": 0, "n_tokens": 0})
                    st["n_docs"] += v["n_docs"]
                    st["n_tokens"] += v["n_tokens"]
            stats[s] = dict(sorted(per_dom.items()))

        base = out.parent
        extra = rebase(dedup_m.get("inputs", []), src, base)
        tokens_of_shard = {shards[j]: sum(v["n_tokens"] for v in shard_stats[j].values()) for j in range(len(shards))}
        for row in rebase(dedup_m["artifacts"], src, base):
            own = next((p for p in shards if row["artifact"] == f"dedup/{p.removesuffix('.jsonl.gz')}"), None)
            if own is not None:  # now known: the tokens of the deduplicated documents
                row["n_tokens"] = tokens_of_shard[own]
            extra.append(row)
        extra += rebase(tok_m["artifacts"], tok_path.parent, base)
        manifest["artifacts"].extend(extra)
        manifest |= {
            "stage": STAGE,
            "tokenizer": relpath(tok_path, base), "tokenizer_sha256": tok_sha, "tokenizer_relative_to": "packed_dir_parent",
            "eos_token": eos_token(tok), "domains": sorted({d for s in stats.values() for d in s}), "domain_stats": stats,
            "dedup": {k: dedup_m["counts"][k] for k in ("input_docs", "kept_docs", "dedup_ratio")},
            **({"tokenizer_supplied": {"source": tok_m["source"], "sha256": tok_m["sha256"]}} if tok_m.get("supplied") else {}),
            "datatrove": eng.datatrove_version(), "tasks": engine.tasks,
            # every stage's parameters (what `data_manifest` records with the packed manifest)
            "lineage": dedup_m.get("lineage", {}) | {
                "tokenize": {**tok_m.get("params", {}), "vocab_size": vocab_size, "sha256": tok_sha},
                STAGE: {"seq_len": seq_len, "tasks": engine.tasks, "datatrove": eng.datatrove_version()}},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        eng.write_execution(tmp, engine, STAGE, [src, tok_path.parent])
    return manifest


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
