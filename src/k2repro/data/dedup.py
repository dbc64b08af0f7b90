"""`k2repro data dedup`: exact, then near-duplicate removal with MinHash LSH.

1. Exact: documents whose normalised text has the same sha256 collapse to the first one
   (documents are in doc-id order, so "first" does not depend on how the input was listed).
2. Near: word n-gram shingles (lowercased `\\w+` words) -> 128-slot MinHash signatures from
   `rensa` (R-MinHash, Rust; docs/data.md says why not datasketch) -> LSH with `bands x rows`
   -> every candidate pair is verified by its estimated Jaccard (share of equal slots) >=
   threshold -> union-find clusters, each keeps its first document.

Defaults follow LLM360's TxT360 (128 permutations, Jaccard 0.8), but not its 9 bands x 13
rows, which finds a pair at Jaccard 0.9 only with probability 0.93: with bands = rows = 0 we
pick the largest `rows` whose LSH recall at a quarter of the way from the threshold to 1 is
>= 0.99 (16 x 8 for 128 slots at 0.8: 0.9999 at Jaccard 0.9, 0.994 at 0.85). The extra
candidates that more bands bring (6% of pairs at Jaccard 0.5) are removed by the verification.

Both splits are deduplicated together, so a validation document never has a copy in train.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np

from k2repro.core.atomic import atomic_dir
from k2repro.data import engine as eng
from k2repro.data.workdir import (
    DOCS_FORMAT,
    SPLITS,
    artifact,
    read_manifest,
    rebase,
    shard_artifacts,
    write_docs,
    write_json,
)
from k2repro.errors import BadInputError, ConfigError

STAGE = "dedup"
MINHASH_SEED = 1
# Buckets bigger than this are verified as a star around their first member plus a chain,
# not all pairs, so one huge template bucket cannot make the stage quadratic.
MAX_BUCKET_PAIRS = 256
SNIPPET_CHARS = 160
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class DedupParams:
    num_perm: int = 128
    threshold: float = 0.8
    ngram: int = 5
    bands: int = 0  # 0 with rows 0: choose_bands_rows
    rows: int = 0
    seed: int = MINHASH_SEED

    def resolved(self) -> DedupParams:
        """Validated, with bands x rows filled in."""
        if self.num_perm < 1:
            raise ConfigError(f"config key 'data.dedup_num_perm': must be >= 1 (got {self.num_perm})")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"config key 'data.dedup_threshold': must be in (0, 1] (got {self.threshold})")
        if self.ngram < 1:
            raise ConfigError(f"config key 'data.dedup_ngram': must be >= 1 (got {self.ngram})")
        if (self.bands == 0) != (self.rows == 0):
            raise ConfigError("config key 'data.dedup_bands': set data.dedup_bands and data.dedup_rows together (or both 0)")
        if self.bands < 0 or self.rows < 0:
            raise ConfigError(f"config key 'data.dedup_bands': bands and rows must be >= 0 (got {self.bands} x {self.rows})")
        if self.bands * self.rows > self.num_perm:
            raise ConfigError(f"config key 'data.dedup_bands': bands x rows = {self.bands * self.rows} "
                              f"exceeds data.dedup_num_perm = {self.num_perm}")
        if self.bands:
            return self
        b, r = choose_bands_rows(self.num_perm, self.threshold)
        return DedupParams(self.num_perm, self.threshold, self.ngram, b, r, self.seed)


def lsh_probability(s: float, bands: int, rows: int) -> float:
    """Probability that two documents with Jaccard `s` share at least one LSH bucket."""
    return 1.0 - (1.0 - s**rows) ** bands


def choose_bands_rows(num_perm: int, threshold: float, recall: float = 0.99) -> tuple[int, int]:
    """The largest `rows` (fewest false candidates) whose recall at
    threshold + (1 - threshold) / 4 is still >= `recall`, with bands = num_perm // rows."""
    target = threshold + (1.0 - threshold) / 4
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if lsh_probability(target, bands, rows) >= recall:
            best = (bands, rows)
    return best


def shingles(text: str, n: int) -> list[str]:
    """Word n-grams of the lowercased text (a text shorter than n words is one shingle)."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return [" ".join(words)] if words else []
    return list(map(" ".join, zip(*(words[i:] for i in range(n)))))


def signatures(texts: list[str], num_perm: int, ngram: int, seed: int = MINHASH_SEED) -> tuple[np.ndarray, np.ndarray]:
    """MinHash signatures (n x num_perm, uint32) and a mask of documents that have words."""
    from rensa import RMinHash

    sh = [shingles(t, ngram) for t in texts]
    has = np.array([bool(s) for s in sh], dtype=bool)
    if not has.any():
        return np.zeros((len(texts), num_perm), dtype=np.uint32), has
    m = RMinHash.digest_matrix_from_token_sets([s for s in sh if s], num_perm, seed)
    sig = np.zeros((len(texts), num_perm), dtype=np.uint32)
    sig[has] = np.asarray(m.to_rows(), dtype=np.uint32)
    return sig, has


def estimated_jaccard(sig: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    return (sig[i] == sig[j]).mean(axis=1)


def band_pairs(band: np.ndarray) -> list[np.ndarray]:
    """(a, b) row pairs of one band's columns (n x rows) that share a bucket. A bucket bigger
    than MAX_BUCKET_PAIRS gives a star around its first member plus a chain, not all pairs."""
    rows = band.shape[1]
    band = np.ascontiguousarray(band)
    keys = band.view(np.dtype((np.void, band.dtype.itemsize * rows))).ravel()
    _, inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
    if counts.max(initial=0) < 2:
        return []
    found: list[np.ndarray] = []
    order = np.argsort(inv, kind="stable")
    ends = np.cumsum(counts)
    for k in np.nonzero(counts > 1)[0]:
        members = order[ends[k] - counts[k] : ends[k]]
        if len(members) <= MAX_BUCKET_PAIRS:
            a, c = np.triu_indices(len(members), k=1)
            found.append(np.stack([members[a], members[c]], axis=1))
        else:
            found.append(np.stack([np.repeat(members[0], len(members) - 1), members[1:]], axis=1))
            found.append(np.stack([members[:-1], members[1:]], axis=1))
    return found


def unique_pairs(pairs: np.ndarray, n: int) -> np.ndarray:
    """Sorted unique (i, j), i < j, of index pairs below `n` (a deterministic order)."""
    if len(pairs) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.sort(pairs, axis=1).astype(np.int64)
    keys = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([keys // n, keys % n], axis=1)


def candidate_pairs(sig: np.ndarray, bands: int, rows: int, rows_of: np.ndarray) -> np.ndarray:
    """Unique (i, j), i < j, of documents that share a bucket in at least one band.
    `rows_of` maps signature rows back to document indices."""
    n = int(rows_of.max(initial=0)) + 1
    found = [f for b in range(bands) for f in band_pairs(sig[:, b * rows : (b + 1) * rows])]
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    return unique_pairs(rows_of[np.concatenate(found)], n)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller index (earlier document) stays the root: it is kept
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class DedupResult:
    """What to drop from a list of texts, and why."""

    params: DedupParams
    exact_of: dict[int, int] = field(default_factory=dict)  # removed -> kept (identical text)
    near_of: dict[int, tuple[int, float]] = field(default_factory=dict)  # removed -> (kept, est. Jaccard)
    n_candidates: int = 0
    n_verified: int = 0

    def keep_mask(self, n: int) -> np.ndarray:
        keep = np.ones(n, dtype=bool)
        keep[list(self.exact_of)] = False
        keep[list(self.near_of)] = False
        return keep

    def duplicate_pairs(self) -> set[tuple[int, int]]:
        """All (i, j), i < j, that end up in one cluster (for precision/recall)."""
        root: dict[int, int] = {}
        for i, k in self.exact_of.items():
            root[i] = k
        for i, (k, _) in self.near_of.items():
            root[i] = k

        def top(i: int) -> int:
            while i in root:
                i = root[i]
            return i

        groups: dict[int, list[int]] = {}
        for i in root:
            groups.setdefault(top(i), []).append(i)
        out = set()
        for r, members in groups.items():
            ms = sorted([r, *members])
            out.update((a, b) for x, a in enumerate(ms) for b in ms[x + 1 :])
        return out


def find_duplicates(texts: list[str], params: DedupParams | None = None) -> DedupResult:
    """Exact then near duplicates among `texts` (earlier texts are kept)."""
    p = (params or DedupParams()).resolved()
    res = DedupResult(p)
    first: dict[bytes, int] = {}
    survivors: list[int] = []
    for i, t in enumerate(texts):
        h = hashlib.sha256(t.encode("utf-8")).digest()
        if h in first:
            res.exact_of[i] = first[h]
        else:
            first[h] = i
            survivors.append(i)
    if len(survivors) < 2:
        return res
    surv = np.asarray(survivors, dtype=np.int64)
    sig_all, has = signatures([texts[i] for i in survivors], p.num_perm, p.ngram, p.seed)
    sig, idx = sig_all[has], surv[has]
    pairs = candidate_pairs(sig, p.bands, p.rows, np.arange(len(sig)))
    res.n_candidates = len(pairs)
    if len(pairs) == 0:
        return res
    est = estimated_jaccard(sig, pairs[:, 0], pairs[:, 1])
    ok = est >= p.threshold
    res.n_verified = int(ok.sum())
    uf = _UnionFind(len(sig))
    for a, b in pairs[ok]:
        uf.union(int(a), int(b))
    for k in range(len(sig)):
        r = uf.find(k)
        if r != k:
            j = float(estimated_jaccard(sig, np.array([k]), np.array([r]))[0])
            res.near_of[int(idx[k])] = (int(idx[r]), round(j, 4))
    return res


def _snippet(text: str, n: int = SNIPPET_CHARS) -> str:
    s = " ".join(text[: n * 2].split())
    return s[:n] + ("..." if len(s) > n or len(text) > n * 2 else "")


def _clusters(info: dict[int, tuple[str, str, str]], res: DedupResult) -> list[dict]:
    """Report clusters: one per kept document that has exact or near copies. `info` maps a
    document index to (doc_id, domain, snippet) for every document in a cluster."""
    by_kept: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for i, k in res.exact_of.items():
        by_kept.setdefault(("exact", k), []).append((i, 1.0))
    for i, (k, j) in res.near_of.items():
        by_kept.setdefault(("near", k), []).append((i, j))
    out = []
    for (kind, k), members in by_kept.items():
        members.sort()
        out.append({
            "kind": kind, "kept": info[k][0], "kept_domain": info[k][1],
            "kept_snippet": info[k][2], "size": len(members) + 1,
            "removed": [{"doc_id": info[i][0], "jaccard": j, "snippet": info[i][2]} for i, j in members],
        })
    out.sort(key=lambda c: (-c["size"], c["kind"], c["kept"]))
    return out


def _markdown(report: dict) -> str:
    c, p = report["counts"], report["params"]
    lines = [
        "# Dedup report", "",
        f"MinHash LSH with {p['library']}: {p['num_perm']} permutations, word {p['ngram']}-grams, "
        f"{p['bands']} bands x {p['rows']} rows, candidates verified by estimated Jaccard >= {p['threshold']}.",
        "",
        "| | documents | bytes |", "|---|---:|---:|",
        f"| input | {c['input_docs']} | {c['input_bytes']} |",
        f"| exact duplicates removed | {c['exact_removed']} | {c['exact_removed_bytes']} |",
        f"| near duplicates removed | {c['near_removed']} | {c['near_removed_bytes']} |",
        f"| kept | {c['kept_docs']} | {c['kept_bytes']} |",
        "",
        f"Dedup ratio (documents removed / input): {c['dedup_ratio']:.4f}. "
        f"LSH candidate pairs: {c['candidate_pairs']}, verified: {c['verified_pairs']}.",
        "",
    ]
    for kind in ("exact", "near"):
        cl = [x for x in report["clusters"] if x["kind"] == kind]
        lines += [f"## {kind.capitalize()} duplicate clusters ({len(cl)}; the largest 10)", ""]
        for x in cl[:10]:
            lines.append(f"- kept `{x['kept']}` ({x['kept_domain']}), {x['size'] - 1} removed: "
                         + ", ".join(f"`{r['doc_id']}` (J~{r['jaccard']:.2f})" for r in x["removed"][:5])
                         + (" ..." if len(x["removed"]) > 5 else ""))
            lines.append(f"  > {x['kept_snippet']}")
        lines.append("")
    return "\n".join(lines)


# --- the stage as a datatrove pipeline ----------------------------------------------------------------
# A. signatures (data.tasks tasks over the prepared shards): per shard, each document's exact key
#    (sha256 of its text), MinHash signature, and (doc_id, domain, bytes, has words);
# -  driver: exact groups (first copy kept), the survivors, one signature file to memory-map;
# B. buckets (one task per LSH band): candidate pairs of the band, verified by estimated Jaccard;
# -  driver: union-find over verified pairs (the earliest document of a cluster is kept);
# C. filter (data.tasks tasks): each shard without its removed documents, plus the snippets the
#    report shows. Documents are numbered in shard order (train shards, then val), so in a
#    cluster across the splits the train copy is kept and validation never shares text with train.

# A signature batch: at most this many documents or bytes of text (its shingle strings take
# ~13 bytes of memory per byte of text while rensa hashes them).
SIG_BATCH = 1024
SIG_BATCH_BYTES = 8 << 20
# Candidate pairs verified at a time (each reads two 512-byte signature rows).
VERIFY_CHUNK = 1 << 16


def _shard_tag(j: int) -> str:
    return f"{j:05d}"


class DedupSignatures(eng.Step):
    name = "dedup A: exact keys and MinHash signatures"

    def __init__(self, scratch: str, src: str, shards: list[str], params: DedupParams, n_docs: list[int],
                 redraw: bool = True) -> None:
        super().__init__(scratch)
        self.src, self.shards, self.params, self.n_docs, self.redraw = src, shards, params, n_docs, redraw

    def _flush(self, batch: list[dict], sizes: list[int], fsig, fkey, fmeta) -> None:  # noqa: ANN001 - open files
        p = self.params
        sig, has = signatures([d["text"] for d in batch], p.num_perm, p.ngram, p.seed)
        fsig.write(np.ascontiguousarray(sig, dtype=np.uint32).tobytes())
        fkey.write(b"".join(hashlib.sha256(d["text"].encode("utf-8")).digest()[:16] for d in batch))
        fmeta.write("".join(json.dumps([d["doc_id"], d["domain"], n, bool(h)]) + "\n"
                            for d, n, h in zip(batch, sizes, has)))

    def work(self, rank: int, world_size: int) -> None:
        sc = Path(self.scratch) / "sig"
        sc.mkdir(exist_ok=True)
        mine = range(rank, len(self.shards), world_size)
        prog = eng.task_progress(STAGE, rank, world_size, sum(self.n_docs[j] for j in mine), self.redraw)
        for j in mine:
            t = _shard_tag(j)
            with open(sc / f"{t}.u32", "wb") as fsig, open(sc / f"{t}.key", "wb") as fkey, \
                    open(sc / f"{t}.meta", "w", encoding="utf-8") as fmeta:
                batch: list[dict] = []
                sizes: list[int] = []
                nbytes = 0
                for d in eng.iter_shard(Path(self.src) / self.shards[j]):
                    n = len(d["text"].encode("utf-8"))
                    batch.append(d)
                    sizes.append(n)
                    nbytes += n
                    prog.update(1, n)
                    if len(batch) == SIG_BATCH or nbytes >= SIG_BATCH_BYTES:
                        self._flush(batch, sizes, fsig, fkey, fmeta)
                        batch, sizes, nbytes = [], [], 0
                if batch:
                    self._flush(batch, sizes, fsig, fkey, fmeta)
        prog.close()


class DedupBands(eng.Step):
    name = "dedup B: LSH buckets of one band, verified"

    def __init__(self, scratch: str, n: int, params: DedupParams) -> None:
        super().__init__(scratch)
        self.n, self.params = n, params

    def work(self, rank: int, world_size: int) -> None:
        p, sc = self.params, Path(self.scratch)
        sig = np.memmap(sc / "sig.u32", dtype=np.uint32, mode="r", shape=(self.n, p.num_perm))
        surv = np.load(sc / "survivors.npy")
        for b in range(rank, p.bands, world_size):
            band = np.asarray(sig[surv, b * p.rows : (b + 1) * p.rows])
            found = band_pairs(band)
            pairs = unique_pairs(surv[np.concatenate(found)], self.n) if found else np.zeros((0, 2), np.int64)
            ok = np.zeros(len(pairs), bool)
            for k in range(0, len(pairs), VERIFY_CHUNK):  # bounded memory however many candidates
                c = pairs[k : k + VERIFY_CHUNK]
                ok[k : k + len(c)] = estimated_jaccard(sig, c[:, 0], c[:, 1]) >= p.threshold
            np.save(sc / f"band{b:05d}.npy", np.concatenate([pairs, ok[:, None].astype(np.int64)], axis=1))


class DedupFilter(eng.Step):
    name = "dedup C: drop duplicates, keep snippets for the report"

    def __init__(self, scratch: str, src: str, out: str, shards: list[str]) -> None:
        super().__init__(scratch)
        self.src, self.out, self.shards = src, out, shards

    def work(self, rank: int, world_size: int) -> None:
        sc = Path(self.scratch)
        for j in range(rank, len(self.shards), world_size):
            t = _shard_tag(j)
            drop = set(np.load(sc / f"drop{t}.npy").tolist())
            need = set(np.load(sc / f"need{t}.npy").tolist())
            # The kept lines are copied as they are: prepare wrote each with `dump_doc`, which is
            # what re-encoding the parsed document would give (signature pass A parsed every
            # line, so a corrupt one has already failed the stage); only report snippets parse.
            # They go through the same text writer as before, as text: gzip's bytes depend on
            # how the content reaches zlib, not only on the content.
            with eng.gzip_writer(Path(self.out) / self.shards[j]) as f, \
                    open(sc / f"snip{t}.jsonl", "w", encoding="utf-8") as fs:
                for i, line in enumerate(eng.iter_shard_lines(Path(self.src) / self.shards[j])):
                    if i in need:
                        fs.write(json.dumps([i, _snippet(json.loads(line)["text"])]) + "\n")
                    if i not in drop:
                        f.write(line)


def _read_meta(sc: Path, n_shards: int) -> tuple[list[list], np.ndarray]:
    """Per document (global index): [doc_id, domain, bytes, has words], and the shard offsets."""
    meta: list[list] = []
    offsets = [0]
    for j in range(n_shards):
        with open(sc / "sig" / f"{_shard_tag(j)}.meta", encoding="utf-8") as f:
            meta += [json.loads(line) for line in f]
        offsets.append(len(meta))
    return meta, np.asarray(offsets, dtype=np.int64)


def _concat(parts: list[Path], dest: Path) -> None:
    with open(dest, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)


def dedup(in_dir: str | os.PathLike, out: str | os.PathLike, params: DedupParams | None = None,
          engine: eng.Engine | None = None) -> dict:
    """Deduplicate the output of `prepare` into `out` (same shards, duplicates removed, plus
    removed.jsonl and report.{json,md}); returns the report."""
    src, out = Path(in_dir), Path(out)
    p = (params or DedupParams()).resolved()
    engine = (engine or eng.Engine()).checked()
    upstream = read_manifest(src, "prepare")
    shards = eng.shards_of(upstream, SPLITS)
    split_of_shard = [a["split"] for a in upstream["artifacts"] if a.get("split") in SPLITS]
    if not sum(a["n_docs"] for a in upstream["artifacts"] if a.get("split") in SPLITS):
        raise BadInputError(f"{src}: no documents to deduplicate")
    with eng.scratch_dir(out) as sc, atomic_dir(out) as tmp:
        n_in = [a["n_docs"] for a in upstream["artifacts"] if a.get("split") in SPLITS]
        eng.run_pipeline([DedupSignatures(str(sc), str(src), shards, p, n_in, engine.redraw())], engine, engine.tasks, sc)
        meta, offsets = _read_meta(sc, len(shards))
        n = len(meta)
        _concat([sc / "sig" / f"{_shard_tag(j)}.u32" for j in range(len(shards))], sc / "sig.u32")
        _concat([sc / "sig" / f"{_shard_tag(j)}.key" for j in range(len(shards))], sc / "keys.bin")
        keys = np.fromfile(sc / "keys.bin", dtype=np.dtype((np.void, 16)))
        _, first, inv = np.unique(keys, return_index=True, return_inverse=True)
        rep = first[inv.ravel()]  # the earliest document with the same text
        res = DedupResult(p)
        res.exact_of = {int(i): int(rep[i]) for i in np.nonzero(rep != np.arange(n))[0]}
        has = np.array([m[3] for m in meta], dtype=bool)
        survivors = np.nonzero((rep == np.arange(n)) & has)[0].astype(np.int64)
        np.save(sc / "survivors.npy", survivors)
        if len(survivors) >= 2:
            eng.run_pipeline([DedupBands(str(sc), n, p)], engine, min(engine.tasks, p.bands), sc)
            got = [np.load(sc / f"band{b:05d}.npy") for b in range(p.bands)]
            allp = np.concatenate(got) if got else np.zeros((0, 3), np.int64)
            cand = unique_pairs(allp[:, :2], n)
            ok_pairs = unique_pairs(allp[allp[:, 2] == 1][:, :2], n)
            res.n_candidates, res.n_verified = len(cand), len(ok_pairs)
            sig = np.memmap(sc / "sig.u32", dtype=np.uint32, mode="r", shape=(n, p.num_perm))
            uf = _UnionFind(n) if len(ok_pairs) else None
            for a, b in ok_pairs:
                uf.union(int(a), int(b))
            for k in sorted({int(x) for x in ok_pairs.ravel()}):
                r = uf.find(k)
                if r != k:
                    j = float(estimated_jaccard(sig, np.array([k]), np.array([r]))[0])
                    res.near_of[k] = (r, round(j, 4))
            del sig
        removed_idx = sorted(res.exact_of) + sorted(res.near_of)
        need = set(removed_idx) | set(res.exact_of.values()) | {k for k, _ in res.near_of.values()}
        shard_of = lambda i: int(np.searchsorted(offsets, i, side="right") - 1)  # noqa: E731
        for j in range(len(shards)):
            lo, hi = offsets[j], offsets[j + 1]
            np.save(sc / f"drop{_shard_tag(j)}.npy", np.array(sorted(i - lo for i in removed_idx if lo <= i < hi), np.int64))
            np.save(sc / f"need{_shard_tag(j)}.npy", np.array(sorted(i - lo for i in need if lo <= i < hi), np.int64))
        eng.run_pipeline([DedupFilter(str(sc), str(src), str(tmp), shards)], engine, engine.tasks, sc)
        info: dict[int, tuple[str, str, str]] = {}
        for j in range(len(shards)):
            with open(sc / f"snip{_shard_tag(j)}.jsonl", encoding="utf-8") as f:
                for line in f:
                    i, snip = json.loads(line)
                    g = int(offsets[j]) + i
                    info[g] = (meta[g][0], meta[g][1], snip)
        report, removed = _report(p, res, meta, offsets, split_of_shard, info, shard_of)
        kept_per_shard = [int(offsets[j + 1] - offsets[j]) - sum(1 for i in removed_idx if shard_of(i) == j)
                          for j in range(len(shards))]
        n_sh = len(shards) // len(SPLITS)
        # Upstream artefacts (corpus files, prepared documents), paths relative to this folder.
        params = report["params"] | {"tasks": engine.tasks}
        manifest = {"stage": STAGE, "format": DOCS_FORMAT, "params": params,
                    "lineage": upstream.get("lineage", {}) | {STAGE: params | {"datatrove": eng.datatrove_version()}},
                    "datatrove": eng.datatrove_version(), "counts": report["counts"],
                    "inputs": rebase(upstream.get("inputs", []) + upstream["artifacts"], src, out),
                    "artifacts": shard_artifacts(tmp, STAGE, n_sh, {s: kept_per_shard[k * n_sh:(k + 1) * n_sh]
                                                                  for k, s in enumerate(SPLITS)})}
        write_docs(tmp / "removed.jsonl", removed)
        write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(_markdown(report), encoding="utf-8")
        for name in ("removed.jsonl", "report.json", "report.md"):
            manifest["artifacts"].append(artifact(tmp, name, f"dedup/{name.removesuffix('.jsonl')}",
                                                  n_docs=len(removed) if name == "removed.jsonl" else 0))
        write_json(tmp / "manifest.json", manifest)
        eng.write_execution(tmp, engine, STAGE, [src])
    return report


def _report(p: DedupParams, res: DedupResult, meta: list[list], offsets: np.ndarray, split_of_shard: list[str],
            info: dict[int, tuple[str, str, str]], shard_of) -> tuple[dict, list[dict]]:  # noqa: ANN001
    n = len(meta)
    keep = res.keep_mask(n)
    nbytes = [m[2] for m in meta]
    split_of = [split_of_shard[shard_of(i)] for i in range(n)] if n else []
    counts: dict = {
        "input_docs": n, "input_bytes": sum(nbytes),
        "exact_removed": len(res.exact_of), "exact_removed_bytes": sum(nbytes[i] for i in res.exact_of),
        "near_removed": len(res.near_of), "near_removed_bytes": sum(nbytes[i] for i in res.near_of),
        "kept_docs": int(keep.sum()), "kept_bytes": int(sum(b for b, k in zip(nbytes, keep) if k)),
        "dedup_ratio": round(1 - keep.sum() / n, 6),
        "candidate_pairs": res.n_candidates, "verified_pairs": res.n_verified,
    }
    counts["splits"] = {}
    for s in SPLITS:
        kept_dom: dict[str, int] = {}
        for i in range(n):
            if keep[i] and split_of[i] == s:
                kept_dom[meta[i][1]] = kept_dom.get(meta[i][1], 0) + 1
        counts["splits"][s] = {"input_docs": split_of.count(s), "kept_docs": sum(kept_dom.values()),
                               "domains": dict(sorted(kept_dom.items()))}
    doms: dict[str, dict[str, int]] = {}
    for i in range(n):
        d = doms.setdefault(meta[i][1], {"input_docs": 0, "kept_docs": 0})
        d["input_docs"] += 1
        d["kept_docs"] += int(keep[i])
    counts["domains"] = dict(sorted(doms.items()))
    report = {
        "stage": STAGE,
        "params": {"num_perm": p.num_perm, "threshold": p.threshold, "ngram": p.ngram, "bands": p.bands,
                   "rows": p.rows, "seed": p.seed, "library": f"rensa {version('rensa')} RMinHash",
                   "lsh_recall_at": {str(s): round(lsh_probability(s, p.bands, p.rows), 6)
                                     for s in (0.5, 0.7, p.threshold, 0.9, 0.95)}},
        "counts": counts,
        "clusters": _clusters(info, res),
    }
    removed = [{"doc_id": meta[i][0], "split": split_of[i], "kind": "exact", "kept": meta[k][0], "jaccard": 1.0}
               for i, k in res.exact_of.items()]
    removed += [{"doc_id": meta[i][0], "split": split_of[i], "kind": "near", "kept": meta[k][0], "jaccard": j}
                for i, (k, j) in res.near_of.items()]
    removed.sort(key=lambda r: r["doc_id"])
    return report, removed
