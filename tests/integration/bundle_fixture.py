"""One real exported bundle, shared by test_export_bundle.py and test_bundle_untrusted.py (a
2-rank gloo run is the expensive part): 12 steps, checkpoints 4, 8, 12, an evals row, a
forensics report, and packed data made with a real tokenizer that lives beside the packed
folder (`data/tokenizer/`, as `k2repro data` lays it out), so the bundle must ship it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.conftest import k2, make_packed, tiny_overrides

_CACHE: dict = {}


def run_id_of(proc) -> str:  # noqa: ANN001
    m = re.search(r"run_id=(\S+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    return m.group(1)


def add_tokenizer(packed: Path) -> Path:
    """Train a small byte-level BPE (the project's own trainer) into `<packed>/../tokenizer/`
    and record it in the packed manifest as `k2repro data pack` does (relative to the packed
    folder's parent), with an earlier-stage artefact that is named but never shipped."""
    import random

    from k2repro.core.hashing import sha256_file
    from k2repro.data.tokenizer import TOKENIZER_FILE, build_trainer

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "tensor", "shard", "replay", "bundle", "store", "token"]
    text = [" ".join(rng.choice(words) + str(rng.randint(0, 99)) for _ in range(12)) for _ in range(400)]
    tok, trainer = build_trainer(320, 1)
    tok.train_from_iterator(text, trainer=trainer, length=len(text))
    tdir = packed.parent / "tokenizer"
    tdir.mkdir(parents=True, exist_ok=True)
    tok.save(str(tdir / TOKENIZER_FILE))
    sha = sha256_file(tdir / TOKENIZER_FILE)
    m = json.loads((packed / "manifest.json").read_text())
    m.update(tokenizer="tokenizer/tokenizer.json", tokenizer_sha256=sha, tokenizer_relative_to="packed_dir_parent")
    m["artifacts"] += [{"artifact": "tokenizer/tokenizer.json", "path": "tokenizer/tokenizer.json", "sha256": sha,
                        "n_docs": 0, "n_tokens": 0},
                       {"artifact": "dedup/train", "path": "dedup/train.jsonl", "sha256": "0" * 64,
                        "n_docs": 0, "n_tokens": 0}]
    (packed / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    return tdir / TOKENIZER_FILE


def real_bundle(tmp_path_factory) -> dict:  # noqa: ANN001
    """Train, export with every checkpoint; cached for the whole session."""
    if _CACHE:
        return _CACHE
    root = tmp_path_factory.mktemp("export")
    packed = make_packed(root / "data" / "packed")
    tokenizer = add_tokenizer(packed)
    store = root / "store"
    r = k2("train", *tiny_overrides(packed, store, **{"parallel.nproc": 2, "ckpt.interval": 4,
                                                      "audit.flush_every": 4, "train.max_steps": 12,
                                                      "run.name": "bundle-demo"}), cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    rid = run_id_of(r)
    from k2repro.audit.writer import append_table

    append_table(store, rid, "evals", {"step": [12, 12], "metric": ["val/loss", "val/ppl"],
                                       "value": [5.25, 190.5], "n_tokens": [320, 320]})
    (root / "reports" / rid).mkdir(parents=True)
    (root / "reports" / rid / "forensics.md").write_text("# forensics\nno spikes\n")
    bundle = root / "bundle"
    e = k2("export", rid, "--store", str(store), "--out", str(bundle), "--checkpoints", "every:4",
           "--reports", str(root / "reports"), "--json", cwd=root)
    assert e.returncode == 0, e.stderr[-3000:]
    _CACHE.update(root=root, store=store, rid=rid, bundle=bundle, info=json.loads(e.stdout), packed=packed,
                  tokenizer=tokenizer)
    return _CACHE
