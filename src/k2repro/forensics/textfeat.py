"""Text features known to go with loss spikes: repeated n-grams (OLMo 2's culprit in web
data), the compression ratio (degenerate repetition compresses to nothing, random tokens
hardly at all), and the share of non-alphabetic characters.

Computed on the decoded text when a tokenizer is at hand, and on the token ids always (a
packed sample is all the run needs), so the verdict does not hang on the tokenizer.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np


def repeated_ngram_share(items: Sequence, n: int = 3) -> float:
    """Share of the n-grams that repeat an n-gram seen earlier in the same sequence
    (0: all distinct; close to 1: one n-gram over and over)."""
    if len(items) < n + 1:
        return 0.0
    grams = [tuple(items[i: i + n]) for i in range(len(items) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def compression_ratio(data: bytes) -> float:
    """zlib-compressed size / raw size: about 0.3-0.5 for prose, near 0 for repetition,
    near 1 (or above) for random bytes."""
    if not data:
        return float("nan")
    return len(zlib.compress(data, 6)) / len(data)


def non_alpha_share(text: str) -> float:
    """Share of characters that are neither letters nor whitespace."""
    if not text:
        return float("nan")
    n_other = sum(1 for ch in text if not (ch.isalpha() or ch.isspace()))
    return n_other / len(text)


def text_features(text: str) -> dict[str, float]:
    words = text.split()
    return {
        "text_repeated_3gram_share": round(repeated_ngram_share(words, 3), 4),
        "text_compression_ratio": round(compression_ratio(text.encode("utf-8")), 4),
        "text_non_alpha_share": round(non_alpha_share(text), 4),
    }


def token_features(tokens: np.ndarray) -> dict[str, float]:
    t = np.asarray(tokens, dtype=np.int64)
    # the narrowest fixed width, so random ids of a small vocabulary stay incompressible
    width = "<u2" if t.size == 0 or t.max() < 65536 else "<u4"
    raw = t.astype(width).tobytes()
    return {
        "tok_repeated_4gram_share": round(repeated_ngram_share(t.tolist(), 4), 4),
        "tok_compression_ratio": round(compression_ratio(raw), 4),
        "tok_distinct_share": round(float(np.unique(t).size / max(t.size, 1)), 4),
    }


# Flags shown next to a sample; loose on purpose: they point a reader at the text, they do not
# decide the verdict (the excess loss does). Compression is judged against the batch's
# median, since its absolute level depends on the tokenizer and the vocabulary.
def feature_flags(f: dict[str, float], batch_median: dict[str, float] | None = None) -> list[str]:
    med = batch_median or {}
    out = []
    rep = max(f.get("text_repeated_3gram_share") or 0.0, f.get("tok_repeated_4gram_share") or 0.0)
    if rep >= 0.5:
        out.append("repeated n-grams")
    comp, mcomp = f.get("tok_compression_ratio"), med.get("tok_compression_ratio")
    if _ok(comp) and _ok(mcomp):
        if comp < 0.5 * mcomp:
            out.append("highly compressible")
        elif comp > 1.3 * mcomp and (f.get("tok_distinct_share") or 0.0) >= 0.8:
            out.append("incompressible (random-like)")
    na, mna = f.get("text_non_alpha_share"), med.get("text_non_alpha_share")
    if _ok(na) and (na >= 0.5 or (_ok(mna) and mna > 0 and na >= 2 * mna and na >= 0.2)):
        out.append("mostly non-alphabetic" if na >= 0.5 else "many non-alphabetic characters")
    return out


def _ok(v: float | None) -> bool:
    return v is not None and bool(np.isfinite(v))
