"""`k2repro batch`: for every step of a 2-rank run, the ids recomputed from seed, manifest and
step equal the ids both ranks logged; each sample carries its logged loss, documents and text.
Uses the session's fleet of tests/integration/test_replay.py."""

from __future__ import annotations

import json

import pytest

from tests.conftest import k2
from tests.integration.test_replay import fleet, k2_without_torch


@pytest.fixture(scope="module")
def fl(tmp_path_factory) -> dict:  # noqa: ANN001
    return fleet(tmp_path_factory)


def test_batch_agrees_with_logged_ids_for_every_step(fl: dict) -> None:
    from k2repro.audit.store import open_store
    from k2repro.tools.batch import batch_lookup

    with open_store(fl["store"]) as s:
        logged = s.sql("SELECT step, rank, sample_id, loss FROM sample_stats WHERE run_id = ?", [fl["P"]])
        hashes = dict(s.execute("SELECT step, batch_hash FROM steps WHERE run_id = ?", [fl["P"]]).fetchall())
        assert sorted(hashes) == list(range(1, 31))
        for step in range(1, 31):
            r = batch_lookup(s, fl["P"], step, text=False)
            assert r["agree"] is True and r["batch_hash_agrees"] is True, step
            assert r["data_matches_run"] is True
            ids = r["recomputed_ids"]
            assert len(ids) == 8 and r["batch_hash"] == hashes[step]
            day = logged[logged["step"] == step]
            for rank in (0, 1):  # each rank logged its contiguous half of the global batch
                assert sorted(day[day["rank"] == rank]["sample_id"]) == sorted(ids[rank * 4:(rank + 1) * 4])
            got = {(x["rank"], x["sample_id"]): x["loss"] for x in r["samples"]}
            want = {(int(a), int(b)): float(c) for a, b, c in day[["rank", "sample_id", "loss"]].itertuples(index=False)}
            assert got == want


def test_batch_cli_shows_text_and_needs_no_torch(fl: dict) -> None:
    proc = k2_without_torch("batch", fl["P"], "--step", "7", "--store", str(fl["store"]), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    assert r["agree"] is True and r["step"] == 7 and len(r["samples"]) == 8
    for s in r["samples"]:
        assert s["loss"] is not None and s["docs"], s
        for d in s["docs"]:
            assert d["doc_id"].startswith("text/") and d["domain"] == "prose"
            assert isinstance(d["snippet"], str) and d["snippet"].strip()
    # the words of the corpus, decoded back from the packed tokens
    text = " ".join(d["snippet"] for s in r["samples"] for d in s["docs"])
    assert any(w in text.split() for w in ("cat", "dogs", "river", "birds"))
    t = k2("batch", fl["P"], "--step", "7", "--store", str(fl["store"]))
    assert t.returncode == 0 and "logged ids == recomputed from seed/manifest/step: yes" in t.stdout


def test_batch_refuses_a_step_the_run_did_not_record(fl: dict) -> None:
    r = k2("batch", fl["P"], "--step", "31", "--store", str(fl["store"]))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no step 31" in lines[0] and "1..30" in lines[0], r.stderr
