"""bench/data_scale.py's corpus: the injected truth is what the corpus holds (exact copies
identical, near copies close but not equal), and the quality score reads it right."""

from __future__ import annotations

import json
import random
from pathlib import Path

from bench.data_scale import build_corpus, quality
from k2repro.data.dedup_eval import jaccard


def _texts(root: Path, n: int) -> Path:
    rng = random.Random(1)
    words = [f"tok{i}" for i in range(5000)]
    for i in range(n):
        d = root / f"pkg{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        lines = [" ".join(rng.choices(words, k=12)) for _ in range(rng.randint(25, 60))]
        (d / f"m{i}.py").write_text("\n".join(lines) + "\n")
    (root / "pkg0" / "blob.txt").write_bytes(b"\xff\xfe not utf-8 " * 40)  # skipped
    (root / "pkg0" / "tiny.md").write_text("too few words " * 20)  # 60 words: kept
    return root


def test_corpus_holds_its_truth(tmp_path: Path) -> None:
    src = _texts(tmp_path / "src", 120)
    t = build_corpus(tmp_path / "corpus", 0.3, seed=3, exact_frac=0.1, near_frac=0.1, sources=[("test", src)])
    docs = {}
    for p in sorted((tmp_path / "corpus").glob("part-*.jsonl")):
        for line in p.read_text().splitlines():
            d = json.loads(line)
            assert d["id"] not in docs and d["domain"] in ("code", "prose")
            docs[d["id"]] = d["text"]
    assert sorted(docs) == t["all_ids"] and len(docs) == t["docs"]
    assert 0.25 <= t["text_mb"] <= 0.4
    assert t["exact_copies"] > 0 and t["near_copies"] > 0
    for g in t["groups"]:
        a, b = (docs[i] for i in g["ids"])
        if g["kind"] == "exact":
            assert a == b
        else:
            assert a != b and jaccard(a, b) >= 0.85 and abs(jaccard(a, b) - g["jaccard"]) < 1e-3
    assert not any(i.startswith("b") and "\ufffd" in docs[i] for i in docs)

    # a perfect dedup: one member of every group kept, nothing else removed
    kept = set(docs) - {g["ids"][1] for g in t["groups"]}
    q = quality(t, kept)
    assert q["exact_recall"] == q["near_recall"] == 1.0 and q["removed_outside_injected"] == 0
    assert q["injected_share_of_removed"] == 1.0
    # no dedup at all, then one that also drops a whole group and an unrelated document
    assert quality(t, set(docs))["near_recall"] == 0.0
    g0 = t["groups"][0]
    other = next(i for i in docs if i.startswith("b") and all(i not in g["ids"] for g in t["groups"]))
    q = quality(t, kept - set(g0["ids"]) - {other})
    assert q[f"{g0['kind']}_groups_all_removed"] == 1 and q["removed_outside_injected"] == 1
    # where that group's text went: kept as `other` (a natural duplicate) or lost with it
    replaced = {i: (other, 0.9) for i in g0["ids"]}
    q = quality(t, kept - set(g0["ids"]), replaced)
    assert q[f"{g0['kind']}_groups_all_removed_text_kept"] == 1 and q[f"{g0['kind']}_groups_text_lost"] == 0
    assert q[f"{g0['kind']}_groups_all_removed_min_jaccard_to_kept"] == 0.9
    q = quality(t, kept - set(g0["ids"]) - {other}, replaced)
    assert q[f"{g0['kind']}_groups_all_removed_text_kept"] == 0 and q[f"{g0['kind']}_groups_text_lost"] == 1
