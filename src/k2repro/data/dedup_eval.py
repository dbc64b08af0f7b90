"""A constructed dedup benchmark with known answers, shared by the tests and bench/dedup.py.

Base documents are random word sequences (so their word 5-grams are distinct); from them we
make exact copies, near copies (a few word edits, Jaccard >= 0.9 on the same shingles the
dedup uses) and distinct partners (a third of the text replaced, Jaccard about 0.5). The true
Jaccard of every constructed pair is computed exactly and returned, so a test can check the
construction as well as the dedup.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from k2repro.data.dedup import shingles


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    """Exact Jaccard of the two texts' shingle sets (what MinHash estimates)."""
    sa, sb = set(shingles(a, ngram)), set(shingles(b, ngram))
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


@dataclass
class ConstructedSet:
    texts: list[str]
    true_pairs: set[tuple[int, int]]  # (i, j), i < j: should end up in one cluster
    near_pairs: set[tuple[int, int]]  # the subset made by word edits (not identical)
    distinct_pairs: set[tuple[int, int]]  # Jaccard about 0.5: must stay apart
    pair_jaccard: dict[tuple[int, int], float]


def _edit(rng: np.random.Generator, words: list[str], vocab: np.ndarray, n_edits: int) -> list[str]:
    out = list(words)
    for _ in range(n_edits):
        k = int(rng.integers(0, len(out)))
        op = rng.integers(0, 3)
        if op == 0:
            out[k] = str(rng.choice(vocab))
        elif op == 1:
            out.insert(k, str(rng.choice(vocab)))
        elif len(out) > 10:
            del out[k]
    return out


def constructed_set(seed: int = 0, n_exact: int = 150, n_near: int = 150, n_both: int = 50,
                    n_distinct: int = 150, n_single: int = 100, ngram: int = 5) -> ConstructedSet:
    """Documents with known duplicate structure, in a seeded shuffled order."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(20000)])
    groups: list[list[tuple[str, str]]] = []  # per base: (role, text)

    def base() -> list[str]:
        return [str(w) for w in rng.choice(vocab, size=int(rng.integers(200, 600)))]

    def near_of(words: list[str]) -> str:
        text = " ".join(words)
        # about J = 0.91: each edit changes up to `ngram` shingles; fewer edits if J < 0.9
        for n_edits in range(max(1, len(words) // 110), 0, -1):
            cand = " ".join(_edit(rng, words, vocab, n_edits))
            if cand != text and jaccard(cand, text, ngram) >= 0.9:
                return cand
        raise AssertionError("could not construct a near duplicate")

    def distinct_of(words: list[str]) -> str:
        cut = int(len(words) * rng.uniform(0.64, 0.69))  # J = cut / (2L - cut), about 0.5
        return " ".join(words[:cut] + [str(w) for w in rng.choice(vocab, size=len(words) - cut)])

    for kind, n in (("exact", n_exact), ("near", n_near), ("both", n_both), ("distinct", n_distinct),
                    ("single", n_single)):
        for _ in range(n):
            w = base()
            t = " ".join(w)
            g = [("base", t)]
            if kind in ("exact", "both"):
                g.append(("exact", t))
            if kind in ("near", "both"):
                g.append(("near", near_of(w)))
            if kind == "distinct":
                g.append(("distinct", distinct_of(w)))
            groups.append(g)

    flat = [(gi, role, t) for gi, g in enumerate(groups) for role, t in g]
    order = rng.permutation(len(flat))
    texts = [flat[k][2] for k in order]
    pos: dict[int, list[tuple[int, str]]] = {}
    for new_i, k in enumerate(order):
        pos.setdefault(flat[k][0], []).append((new_i, flat[k][1]))
    true_pairs, near_pairs, distinct_pairs = set(), set(), set()
    pair_j: dict[tuple[int, int], float] = {}
    for members in pos.values():
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                (i, ri), (j, rj) = members[x], members[y]
                pair = (min(i, j), max(i, j))
                pair_j[pair] = jaccard(texts[i], texts[j], ngram)
                if "distinct" in (ri, rj):
                    distinct_pairs.add(pair)
                else:
                    true_pairs.add(pair)
                    if "near" in (ri, rj):
                        near_pairs.add(pair)
    return ConstructedSet(texts, true_pairs, near_pairs, distinct_pairs, pair_j)


def precision_recall(predicted: set[tuple[int, int]], truth: set[tuple[int, int]]) -> tuple[float, float]:
    """Pairwise precision and recall (1.0 where there is nothing to find or nothing found)."""
    hit = len(predicted & truth)
    return (hit / len(predicted) if predicted else 1.0, hit / len(truth) if truth else 1.0)
