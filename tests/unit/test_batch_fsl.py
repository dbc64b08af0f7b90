"""`k2repro batch` on a run whose data manifest records a fixed-length token layout (what the
OLMo-core callback writes): token ids read from the real token files, two files with their own
sample ranges, and no token ids once a file differs from what the run recorded."""

from __future__ import annotations

import json

import numpy as np

from k2repro.audit.store import open_store
from k2repro.audit.writer import write_run_tables
from k2repro.data.loader import batch_hash
from k2repro.data.packed import sha256_file
from k2repro.tools.batch import batch_lookup

SEQ = 4


def _run(tmp_path) -> tuple:  # noqa: ANN001
    files = []
    for i, n in enumerate((3, 5)):  # file 0 holds samples 0..2, file 1 samples 3..7
        arr = (np.arange(n * SEQ, dtype=np.uint16) + 1000 * (i + 1))
        p = tmp_path / f"part{i}.npy"
        arr.tofile(p)
        files.append(p)
    offs = [(0, 3), (3, 8)]
    manifest = {
        "artifact": [f"olmo_core/train/{i}" for i in range(2)], "path": [str(p) for p in files],
        "sha256": [sha256_file(p) for p in files],
        "bytes": [p.stat().st_size for p in files], "n_tokens": [p.stat().st_size // 2 for p in files],
        "detail": [json.dumps({"layout": "fsl", "dtype": "uint16", "sequence_length": SEQ, "first_sample": a,
                               "end_sample": b}) for a, b in offs],
    }
    ids = [6, 1, 3, 2]  # global batch order; rank r holds positions r, r + 2
    write_run_tables(tmp_path / "store", "fsl", {
        "runs": {"name": ["fsl"], "source": ["api:olmo_core"], "world_size": [2]},
        "steps": {"step": [1], "loss": [2.0], "batch_hash": [batch_hash(ids)]},
        "sample_stats": {"step": [1] * 4, "rank": [0, 1, 0, 1], "sample_id": ids, "loss": [None] * 4,
                         "batch_pos": [0, 1, 2, 3], "n_tokens": [SEQ] * 4},
        "data_manifest": manifest,
    })
    return files, ids


def test_token_ids_come_from_the_recorded_layout(tmp_path) -> None:
    files, ids = _run(tmp_path)
    with open_store(tmp_path / "store") as st:
        r = batch_lookup(st, "fsl", 1)
    assert r["logged_ids"] == ids and r["data_matches_run"] is True
    want = {6: [2000 + 3 * SEQ + k for k in range(SEQ)], 1: [1000 + SEQ + k for k in range(SEQ)],
            3: [2000 + k for k in range(SEQ)], 2: [1000 + 2 * SEQ + k for k in range(SEQ)]}
    assert [s["tokens"] for s in r["samples"]] == [want[i] for i in ids]
    assert [s["rank"] for s in r["samples"]] == [0, 1, 0, 1]


def test_a_changed_token_file_gives_no_token_ids(tmp_path) -> None:
    files, _ = _run(tmp_path)
    data = bytearray(files[1].read_bytes())
    data[0] ^= 1  # same size, other content: only the sha256 tells
    files[1].write_bytes(bytes(data))
    with open_store(tmp_path / "store") as st:
        r = batch_lookup(st, "fsl", 1)
    assert r["data_matches_run"] is False and all("tokens" not in s for s in r["samples"])
    assert any("differs from what the run recorded (sha256)" in n for n in r["notes"])
    files[1].write_bytes(bytes(data[:-2]))  # shorter: the size tells, with or without a hash
    with open_store(tmp_path / "store") as st:
        r = batch_lookup(st, "fsl", 1)
    assert r["data_matches_run"] is False and any("(size)" in n for n in r["notes"])
