"""Restarts and forks in imports (importers/stitch.py), through the real CLI: a real OLMo-7B
W&B export split into restart segments becomes one lineage chain; a synthetic main run and its
restarted branch over the same steps become a fork; --no-stitch, --stitch and --parent do what
they say; an import never links to a run already in the store unless --parent names it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from k2repro.audit.lineage import branches_overlapping, family
from k2repro.audit.store import open_store
from k2repro.cli.main import main
from tests.conftest import REPO

OLMO = REPO / "tests" / "data" / "real-logs" / "olmo-7b-pile-validation-ce-37-segments.csv"


def snapshot(root: Path) -> dict[str, bytes]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def imp(capsys, store: Path, *args: str) -> dict:
    capsys.readouterr()
    assert main(["import", *args, "--store", str(store), "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def rows(store: Path, query: str, params: list | None = None) -> list[dict]:
    s = open_store(store)
    try:
        cur = s.execute(query, params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]
    finally:
        s.close()


def file_ranges(path: Path) -> dict[str, list[int]]:
    """run label -> its steps, read with the csv module (independently of the importer)."""
    with open(path, newline="") as f:
        r = csv.reader(f)
        header = next(r)
        data = list(r)
    out: dict[str, list[int]] = {}
    for j, col in enumerate(header[1:], 1):
        if col.endswith(("__MIN", "__MAX")):
            continue
        label = col.rpartition(" - ")[0]
        out.setdefault(label, [])
        out[label] = sorted(set(out[label]) | {int(float(row[0])) for row in data if row[j] != ""})
    return out


def write_wandb(path: Path, runs: dict[str, dict[int, float]]) -> Path:
    """A W&B chart export: `Step`, then `<run> - train/loss` (+ envelope) per run."""
    steps = sorted({s for v in runs.values() for s in v})
    with open(path, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(["Step"] + [f"{r} - train/loss{suf}" for r in runs for suf in ("", "__MIN", "__MAX")])
        for s in steps:
            row = [str(s)]
            for v in runs.values():
                row += [repr(v[s])] * 3 if s in v else [""] * 3
            w.writerow(row)
    return path


def curve(lo: int, hi: int, every: int, level: float = 3.0) -> dict[int, float]:
    return {s: level - s / 10_000 for s in range(lo, hi + 1, every)}


# ----------------------------------------------------------------------------- a real export

def test_real_olmo_segments_import_as_one_chain(tmp_path, capsys):
    store = tmp_path / "runs"
    out = imp(capsys, store, "wandb-csv", str(OLMO), "--name", "olmo7b")
    ranges = file_ranges(OLMO)
    # the file holds 36 W&B runs (OLMo-7B-run-002 ... run-038; run-028 is not in the export)
    assert len(ranges) == 36 and len(out["run_ids"]) == 36
    order = sorted(ranges, key=lambda k: ranges[k][0])
    # consecutive, disjoint step ranges: each segment continues the one before it from that
    # one's last step (the segments' names do not sort as their steps must: check both agree)
    assert order == sorted(ranges)
    got = {x["name"].split("/", 1)[1]: x for x in rows(
        store, "SELECT r.run_id, r.name, r.parent_run_id, r.resumed_from_step, r.status, "
               "p.name AS parent_name FROM runs r LEFT JOIN runs p ON p.run_id = r.parent_run_id")}
    assert got[order[0]]["parent_run_id"] is None
    for prev, cur in zip(order, order[1:], strict=False):
        assert got[cur]["parent_name"] == f"olmo7b/{prev}", cur
        assert got[cur]["resumed_from_step"] == ranges[prev][-1] < ranges[cur][0], cur
    assert {g["status"] for g in got.values()} == {"completed"}
    # the JSON output carries the same links
    by_id = {x["run_id"]: x for x in out["runs"]}
    assert by_id[got["OLMo-7B-run-034"]["run_id"]]["resumed_from_step"] == 492000
    assert by_id[got["OLMo-7B-run-034"]["run_id"]]["parent_run_id"] == got["OLMo-7B-run-033"]["run_id"]
    # the lineage view: one root, depths 0..35 in step order
    lin = rows(store, "SELECT r.name, l.lineage_root, l.depth FROM lineage l JOIN runs r USING (run_id)")
    assert {x["lineage_root"] for x in lin} == {got[order[0]]["run_id"]}
    assert sorted((x["depth"], x["name"]) for x in lin) == [(i, f"olmo7b/{k}") for i, k in enumerate(order)]
    # lineage_steps: the logical run holds every logged step once
    n = rows(store, "SELECT count(*) AS n, count(DISTINCT step) AS d FROM lineage_steps")[0]
    assert n["n"] == n["d"] == sum(len(v) for v in ranges.values())
    # one `stitch` event per link, citing parent, resume step and rule
    ev = rows(store, "SELECT e.run_id, e.step, e.detail FROM events e WHERE e.kind = 'stitch'")
    assert len(ev) == 35
    d = {e["run_id"]: (e["step"], json.loads(e["detail"])) for e in ev}
    step, det = d[got["OLMo-7B-run-035"]["run_id"]]
    assert step == 501000 and det["parent"] == got["OLMo-7B-run-034"]["run_id"]
    assert (det["resumed_from_step"], det["rule"], det["relation"], det["stem"]) == (
        501000, "auto", "continuation", "olmo-7b")
    assert (det["first_step"], det["last_step"], det["parent_last_step"]) == (502000, 512000, 501000)
    # the query-side helper sees the whole family; a segment's range overlaps no other
    s = open_store(store)
    try:
        mid = got["OLMo-7B-run-010"]["run_id"]
        fam = family(s, mid)
        assert [f["run_id"] for f in fam] == [got[k]["run_id"] for k in order]
        rel = {f["name"].split("/", 1)[1]: f["relation"] for f in fam}
        assert (rel["OLMo-7B-run-009"], rel["OLMo-7B-run-010"], rel["OLMo-7B-run-011"],
                rel["OLMo-7B-run-002"], rel["OLMo-7B-run-038"]) == (
            "parent", "self", "child", "ancestor", "descendant")
        assert branches_overlapping(s, mid) == []
        near = branches_overlapping(s, mid, 120_000, 150_000)
        assert [f["name"] for f in near] == ["olmo7b/OLMo-7B-run-009", "olmo7b/OLMo-7B-run-011"]
    finally:
        s.close()


# ----------------------------------------------------------------------------- a fork

@pytest.fixture()
def fork_csv(tmp_path) -> Path:
    """`llm-65b` every 10 steps to 3,000; `llm-65b restart` restarted from step 1,500 over the
    same steps (its first point 1,510); `other-7b`, an unrelated run that starts later."""
    return write_wandb(tmp_path / "fork.csv", {
        "llm-65b": curve(10, 3000, 10),
        "llm-65b restart": curve(1510, 3000, 10, level=2.9),
        "other-7b": curve(500, 2000, 10, level=4.0),
    })


def test_fork_is_linked_and_no_stitch_keeps_runs_apart(tmp_path, fork_csv, capsys):
    store = tmp_path / "runs"
    out = imp(capsys, store, "wandb-csv", str(fork_csv), "--name", "f")
    ids = dict(zip([r["source_run"] for r in out["runs"]], out["run_ids"], strict=True))
    got = {x["run_id"]: x for x in rows(store, "SELECT run_id, parent_run_id, resumed_from_step FROM runs")}
    assert (got[ids["llm-65b restart"]]["parent_run_id"], got[ids["llm-65b restart"]]["resumed_from_step"]) \
        == (ids["llm-65b"], 1500)
    # a run with an unrelated name is not linked by default, though it starts inside the other
    assert got[ids["other-7b"]]["parent_run_id"] is None and got[ids["llm-65b"]]["parent_run_id"] is None
    ev = rows(store, "SELECT run_id, step, detail FROM events WHERE kind = 'stitch'")
    assert [(e["run_id"], e["step"]) for e in ev] == [(ids["llm-65b restart"], 1500)]
    det = json.loads(ev[0]["detail"])
    assert (det["parent"], det["rule"], det["relation"], det["parent_last_step"]) == (
        ids["llm-65b"], "auto", "fork", 3000)
    # the logical run: the main run to 1,500, then the restart; the main run's later steps are
    # superseded there, and stay in its own rows
    ls = rows(store, "SELECT run_id, min(step) AS lo, max(step) AS hi FROM lineage_steps "
                     "WHERE lineage_root = ? GROUP BY run_id ORDER BY lo", [ids["llm-65b"]])
    assert [(x["run_id"], x["lo"], x["hi"]) for x in ls] == [
        (ids["llm-65b"], 10, 1500), (ids["llm-65b restart"], 1510, 3000)]
    s = open_store(store)
    try:
        br = branches_overlapping(s, ids["llm-65b"], 2000, 2100)
        assert [(b["run_id"], b["relation"], b["resumed_from_step"], b["first_step"]) for b in br] == [
            (ids["llm-65b restart"], "child", 1500, 1510)]
        assert [b["relation"] for b in branches_overlapping(s, ids["llm-65b restart"])] == ["parent"]
        assert branches_overlapping(s, ids["other-7b"]) == []
    finally:
        s.close()
    # the same content linked differently would be a different store: refused, nothing written
    before = snapshot(store)
    capsys.readouterr()
    assert main(["import", "wandb-csv", str(fork_csv), "--name", "f", "--no-stitch", "--store", str(store)]) == 2
    assert "other options" in capsys.readouterr().err and snapshot(store) == before
    # --no-stitch into a fresh store: three runs, no parent, no stitch event
    apart = tmp_path / "apart"
    imp(capsys, apart, "wandb-csv", str(fork_csv), "--name", "f", "--no-stitch")
    assert [x["p"] for x in rows(apart, "SELECT parent_run_id AS p FROM runs")] == [None] * 3
    assert rows(apart, "SELECT count(*) AS n FROM events WHERE kind = 'stitch'")[0]["n"] == 0
    assert rows(apart, "SELECT count(DISTINCT lineage_root) AS n FROM lineage")[0]["n"] == 3


def test_stitch_forces_links_and_refuses_what_cannot_chain(tmp_path, capsys, caplog):
    src = write_wandb(tmp_path / "ab.csv", {"alpha": curve(1, 400, 1), "beta": curve(201, 600, 1),
                                            "gamma": curve(601, 700, 1)})
    store = tmp_path / "runs"
    with caplog.at_level("WARNING", logger="k2repro.importers.stitch"):
        out = imp(capsys, store, "wandb-csv", str(src))
    # unrelated names: not linked by default, with a hint that their steps would chain
    assert [r["parent_run_id"] for r in out["runs"]] == [None, None, None]
    assert any("pass --stitch" in m for m in caplog.messages)
    forced = tmp_path / "forced"
    out = imp(capsys, forced, "wandb-csv", str(src), "--stitch")
    a, b, g = out["run_ids"]
    assert [(r["parent_run_id"], r["resumed_from_step"]) for r in out["runs"]] == [
        (None, None), (a, 200), (b, 600)]
    det = {e["run_id"]: json.loads(e["detail"]) for e in rows(forced, "SELECT run_id, detail FROM events "
                                                                      "WHERE kind = 'stitch'")}
    assert (det[b]["rule"], det[b]["relation"], det[g]["relation"]) == ("stitch", "fork", "continuation")
    # two runs that start at the same step: neither continues the other
    same = write_wandb(tmp_path / "same.csv", {"x": curve(1, 50, 1), "y": curve(1, 80, 1)})
    capsys.readouterr()
    assert main(["import", "wandb-csv", str(same), "--stitch", "--store", str(tmp_path / "s2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--stitch: runs 'x', 'y' all start at step 1" in err[0]
    assert not (tmp_path / "s2").exists()


# ----------------------------------------------------------------------------- --parent

def test_parent_links_to_a_store_run_only_when_named(tmp_path, capsys):
    store = tmp_path / "runs"
    (tmp_path / "stage1.csv").write_text("step,loss\n" + "".join(f"{s},{3 - s / 1000!r}\n" for s in range(1, 101)))
    (tmp_path / "stage2.csv").write_text("step,loss\n" + "".join(f"{s},{3 - s / 1000!r}\n" for s in range(101, 201)))
    first = imp(capsys, store, "csv", str(tmp_path / "stage1.csv"), "--name", "stage1")["run_ids"][0]
    # by default an import never links to a run already in the store
    other = tmp_path / "other"
    imp(capsys, other, "csv", str(tmp_path / "stage1.csv"), "--name", "stage1")
    plain = imp(capsys, other, "csv", str(tmp_path / "stage2.csv"), "--name", "stage2")
    assert plain["runs"][0]["parent_run_id"] is None
    assert rows(other, "SELECT count(*) AS n FROM runs WHERE parent_run_id IS NOT NULL")[0]["n"] == 0
    # a missing parent: one line, exit 2, nothing written
    before = snapshot(store)
    capsys.readouterr()
    assert main(["import", "csv", str(tmp_path / "stage2.csv"), "--parent", "nosuchrun",
                 "--store", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no run 'nosuchrun'" in err[0]
    assert snapshot(store) == before
    # --parent by name: stage 2 continues stage 1 from its last step before 101
    second = imp(capsys, store, "csv", str(tmp_path / "stage2.csv"), "--name", "stage2", "--parent", "stage1")
    rid = second["run_ids"][0]
    assert (second["runs"][0]["parent_run_id"], second["runs"][0]["resumed_from_step"]) == (first, 100)
    assert rows(store, "SELECT parent_run_id AS p, resumed_from_step AS k FROM runs WHERE run_id = ?",
                [rid]) == [{"p": first, "k": 100}]
    det = json.loads(rows(store, "SELECT detail FROM events WHERE kind = 'stitch'")[0]["detail"])
    assert (det["parent"], det["rule"], det["resumed_from_step"]) == (first, "parent", 100)
    lin = rows(store, "SELECT run_id, lineage_root, depth FROM lineage ORDER BY depth")
    assert [(x["lineage_root"], x["depth"]) for x in lin] == [(first, 0), (first, 1)]
    # a parent with no step before the import's first step cannot be continued
    capsys.readouterr()
    assert main(["import", "csv", str(tmp_path / "stage1.csv"), "--name", "again", "--parent", rid,
                 "--store", str(tmp_path / "other")]) == 2
    assert "no run" in capsys.readouterr().err
    assert main(["import", "csv", str(tmp_path / "stage1.csv"), "--name", "again", "--parent", "stage2",
                 "--store", str(store)]) == 2
    assert "has no step before step 1" in capsys.readouterr().err
    # several unlinked runs: which one continues RUN is not said, so it is refused
    two = write_wandb(tmp_path / "two.csv", {"p": curve(101, 150, 1), "q": curve(101, 160, 1)})
    assert main(["import", "wandb-csv", str(two), "--parent", "stage1", "--store", str(store)]) == 2
    assert "this import holds 2 unlinked runs ('p', 'q')" in capsys.readouterr().err
    assert len(rows(store, "SELECT run_id FROM runs")) == 2
