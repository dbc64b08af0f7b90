"""Documents/s and MB/s of k2repro's dedup (exact + rensa MinHash + tuned LSH + verification)
against a plain datasketch MinHashLSH baseline (same shingles, 128 permutations, threshold
0.8, datasketch's own bands x rows, every LSH candidate merged), on the same corpus (the
bundled sample, normalised as `k2repro data prepare` does), in ABBA pairs, plus precision and
recall of both on the constructed set with known duplicates (k2repro.data.dedup_eval), and
signature speed and estimation error of the two MinHash libraries. Writes
reports/bench/dedup.json. Goal: ours at least as fast as the baseline, same or better quality.

    .venv/bin/python bench/dedup.py [--pairs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, abba, bootstrap_ci, write  # noqa: E402
from k2repro.data.dedup import (  # noqa: E402
    DedupParams,
    _UnionFind,
    candidate_pairs,
    dedup,
    find_duplicates,
    shingles,
)
from k2repro.data.dedup_eval import constructed_set, jaccard, precision_recall  # noqa: E402
from k2repro.data.prepare import prepare  # noqa: E402
from k2repro.data.readers import normalize_text, read_source  # noqa: E402

NUM_PERM, THRESHOLD, NGRAM = 128, 0.8, 5


def corpus_texts() -> list[str]:
    docs = sorted(read_source(REPO / "data" / "sample"), key=lambda d: d.doc_id)
    return [t for t in (normalize_text(d.text) for d in docs) if t.strip()]


def datasketch_signatures(texts: list[str]) -> list:
    from datasketch import MinHash

    out = []
    for t in texts:
        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch([s.encode("utf-8") for s in shingles(t, NGRAM)])
        out.append(m)
    return out


def baseline(texts: list[str]) -> set[tuple[int, int]]:
    """Plain datasketch: MinHash per document, MinHashLSH(threshold=0.8), query every
    document, merge every candidate into one cluster. Returns the duplicate pairs."""
    from datasketch import MinHashLSH

    mhs = datasketch_signatures(texts)
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    for i, m in enumerate(mhs):
        lsh.insert(i, m)
    uf = _UnionFind(len(texts))
    for i, m in enumerate(mhs):
        for j in lsh.query(m):
            uf.union(i, int(j))
    groups: dict[int, list[int]] = {}
    for i in range(len(texts)):
        groups.setdefault(uf.find(i), []).append(i)
    return {(a, b) for g in groups.values() for x, a in enumerate(g) for b in g[x + 1:]}


def ours(texts: list[str]) -> set[tuple[int, int]]:
    return find_duplicates(texts, DedupParams(NUM_PERM, THRESHOLD, NGRAM)).duplicate_pairs()


def n_removed(pairs: set[tuple[int, int]]) -> int:
    return len({j for _, j in pairs})


def quality(fn, seeds: tuple[int, ...]) -> dict:  # noqa: ANN001
    rows = []
    for seed in seeds:
        cs = constructed_set(seed)
        pred = fn(cs.texts)
        p, r = precision_recall(pred, cs.true_pairs)
        _, near_r = precision_recall(pred, cs.near_pairs)
        rows.append({"seed": seed, "precision": p, "recall": r, "near_recall": near_r,
                     "distinct_pairs_merged": len(pred & cs.distinct_pairs)})
    return {"per_seed": rows, **{k: min(x[k] for x in rows) for k in ("precision", "recall", "near_recall")},
            "distinct_pairs_merged": sum(x["distinct_pairs_merged"] for x in rows),
            "n_docs": len(cs.texts), "n_true_pairs": len(cs.true_pairs), "n_near_pairs": len(cs.near_pairs),
            "n_distinct_pairs": len(cs.distinct_pairs)}


def libraries(texts: list[str]) -> dict:
    """Signatures only, from the same precomputed shingles: hashing time, and error of the
    estimated Jaccard against the exact one on every pair that either library's loose
    32 x 4 banding proposes (exact Jaccard >= 0.3)."""
    from datasketch import MinHash
    from rensa import RMinHash

    sh = [shingles(t, NGRAM) for t in texts]
    has = [bool(s) for s in sh]
    sh = [s for s in sh if s]
    texts = [t for t, h in zip(texts, has) if h]
    t0 = time.perf_counter()
    rs = np.asarray(RMinHash.digest_matrix_from_token_sets(sh, NUM_PERM, 1).to_rows(), dtype=np.uint32)
    t_r = time.perf_counter() - t0
    enc = [[x.encode("utf-8") for x in s] for s in sh]
    t0 = time.perf_counter()
    ds = []
    for e in enc:
        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch(e)
        ds.append(m.hashvalues)
    t_d = time.perf_counter() - t0
    ds = np.array(ds, dtype=np.uint64)
    idx = np.arange(len(texts))
    pairs = np.unique(np.concatenate([candidate_pairs(rs, 32, 4, idx), candidate_pairs(ds, 32, 4, idx)]), axis=0)
    exact = np.array([jaccard(texts[i], texts[j], NGRAM) for i, j in pairs])
    keep = exact >= 0.3
    out: dict = {"pairs_compared": int(keep.sum())}
    for name, sig, secs in (("rensa_rminhash", rs, t_r), ("datasketch", ds, t_d)):
        err = ((sig[pairs[:, 0]] == sig[pairs[:, 1]]).mean(axis=1) - exact)[keep]
        out[name] = {"hash_s": round(secs, 3), "docs_per_s": round(len(texts) / secs, 1),
                     "jaccard_rmse": round(float(np.sqrt((err**2).mean())), 4),
                     "jaccard_bias": round(float(err.mean()), 4),
                     "jaccard_max_abs_err": round(float(np.abs(err).max()), 4)}
    return out


def disagreement(texts: list[str]) -> dict:
    """Pairs on the real corpus that one method merges and the other does not, with their
    exact Jaccard: shows whether the difference is recall or false merges."""
    a, b = ours(texts), baseline(texts)

    def describe(pairs: set[tuple[int, int]]) -> dict:
        js = sorted(jaccard(texts[i], texts[j], NGRAM) for i, j in pairs)
        return {"pairs": len(js), "exact_jaccard_min": round(js[0], 4) if js else None,
                "exact_jaccard_median": round(statistics.median(js), 4) if js else None,
                "below_threshold": sum(j < THRESHOLD for j in js)}

    return {"both": len(a & b), "only_ours": describe(a - b), "only_baseline": describe(b - a)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    args = ap.parse_args()
    texts = corpus_texts()
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    n = len(texts)

    removed = {}

    def timed(name: str, fn) -> float:  # noqa: ANN001
        t0 = time.perf_counter()
        removed[name] = n_removed(fn(texts))
        return time.perf_counter() - t0

    ours_s, base_s = abba(lambda: timed("ours", ours), lambda: timed("baseline", baseline), args.pairs)
    ratios = [b / a for a, b in zip(ours_s, base_s)]
    lo, hi = bootstrap_ci(ratios)

    # The whole stage as `k2repro data dedup` runs it: read prepared files, write outputs.
    with tempfile.TemporaryDirectory() as tmp:
        prepare(REPO / "data" / "sample", Path(tmp) / "prepared")
        stage_s = []
        for _ in range(args.pairs):
            t0 = time.perf_counter()
            dedup(Path(tmp) / "prepared", Path(tmp) / "dedup")
            stage_s.append(time.perf_counter() - t0)

    def speed(secs: list[float]) -> dict:
        m = statistics.median(secs)
        return {"seconds": [round(s, 3) for s in secs], "median_s": round(m, 3),
                "docs_per_s": round(n / m, 1), "mb_per_s": round(mb / m, 2)}

    from datasketch import MinHashLSH

    b = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    p = DedupParams(NUM_PERM, THRESHOLD, NGRAM).resolved()
    write("dedup", {
        "what": "dedup throughput on the bundled sample corpus and quality on the constructed set: "
                "k2repro (exact + rensa R-MinHash + LSH bands x rows tuned for recall + verification) "
                "vs plain datasketch MinHashLSH",
        "goal": "speedup >= 1 with precision and recall >= the baseline's (and >= 0.95)",
        "corpus": {"docs": n, "mb": round(mb, 2)},
        "settings": {"num_perm": NUM_PERM, "threshold": THRESHOLD, "ngram": NGRAM,
                     "ours_bands_rows": [p.bands, p.rows], "baseline_bands_rows": [b.b, b.r]},
        "ours": {**speed(ours_s), "docs_removed": removed["ours"]},
        "ours_full_stage_with_io": speed(stage_s),
        "baseline": {**speed(base_s), "docs_removed": removed["baseline"]},
        "speedup_ratios": [round(r, 3) for r in ratios], "median_speedup": round(statistics.median(ratios), 3),
        "speedup_ci95": [round(lo, 3), round(hi, 3)],
        "quality": {"ours": quality(ours, (0, 1, 2)), "baseline": quality(baseline, (0, 1, 2))},
        "corpus_disagreement": disagreement(texts),
        "libraries": libraries(texts),
    })


if __name__ == "__main__":
    main()
