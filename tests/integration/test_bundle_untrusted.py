"""A bundle is untrusted input (issue 24): forged bundles, built here from a real export and
resealed with k2repro's own manifest code (a checksum is no signature), must not delete,
write or read anything outside the store, nor add rows to another run; `gc` must not delete
outside the store on a stored row's word; `export --out` into the store, an incomplete run,
a bundle.json that is not what it should be are refused cleanly; signatures prove origin.
Also issue 23: a run recorded through the audit API exports in one go, with a model card that
describes what was recorded. One real bundle (tests/integration/bundle_fixture.py) is shared;
forgeries are hard-linked copies whose changed files are replaced, never edited in place."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
import pytest

from k2repro.errors import BadInputError
from tests.conftest import k2
from tests.integration.bundle_fixture import real_bundle
from tests.integration.forge import (
    edit_json,
    forge,
    forge_absolute_dcp,
    forge_after_signing,
    forge_symlinked_data,
    forge_takeover,
    forge_victim_runs_row,
    forge_walk_out,
    make_keys,
    nothing_imported,
    put,
    reseal,
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    return real_bundle(tmp_path_factory)


def import_(b: Path, store: Path, **kw):  # noqa: ANN003, ANN201
    from k2repro.bundle.importer import import_bundle

    return import_bundle(b, store, **kw)


# ----------------------------------------------------------------------------- escapes (items 1-5)

def test_forged_runs_row_is_refused_and_gc_never_deletes_outside_the_store(exported, tmp_path) -> None:  # noqa: ANN001
    """Item 1: a second runs segment naming `victim_project` with ckpt.dir outside."""
    rid = exported["rid"]
    outside = tmp_path / "outside"
    (outside / "victim_project").mkdir(parents=True)
    (outside / "victim_project" / "notes.txt").write_text("someone's work")
    b = forge_victim_runs_row(exported["bundle"], tmp_path / "b", rid, outside)
    old = datetime.now(timezone.utc) - timedelta(days=90)
    store = tmp_path / "store"
    with pytest.raises(BadInputError, match="rows of run 'victim_project'"):
        import_(b, store)
    assert nothing_imported(store)
    # A row that got into a store anyway (written by hand here, as an older import did):
    # gc removes the run's own folder, never `<ckpt.dir>/<run_id>` that is not its checkpoints.
    from k2repro.audit.writer import write_run_tables

    write_run_tables(store, "victim_project", {
        "runs": {"name": ["x"], "started_at": [old], "config_json": [json.dumps({"ckpt": {"dir": str(outside)}})]},
        "run_end": {"rank": [0], "status": ["completed"], "ended_at": [old]}})
    r = k2("gc", "--store", str(store), "--older-than", "30d", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["removed_run_ids"] == ["victim_project"] and not (store / "victim_project").exists()
    assert (outside / "victim_project" / "notes.txt").read_text() == "someone's work"
    assert any(str(outside / "victim_project") in n and "notes.txt" in n for n in out["notes"])


def test_run_ids_cannot_walk_out_of_the_store(exported, tmp_path) -> None:  # noqa: ANN001
    """Item 2: chain ids used as paths."""
    for where in ("chain", "checkpoint"):
        b = forge_walk_out(exported["bundle"], tmp_path / f"b-{where}", where)
        store = tmp_path / "stores" / where / "store"
        with pytest.raises(BadInputError, match="run id|not to the chain"):
            import_(b, store)
        assert nothing_imported(store)
    assert not list(tmp_path.rglob("escaped"))


def test_import_reads_nothing_outside_the_bundle(exported, tmp_path) -> None:  # noqa: ANN001
    """Item 3: an absolute checkpoint path; a symlinked data folder."""
    from k2repro.bundle.verify import verify_bundle

    theirs = next((exported["store"] / exported["rid"] / "checkpoints").glob("step_*"))
    b = forge_absolute_dcp(exported["bundle"], tmp_path / "abs", theirs)
    with pytest.raises(BadInputError, match="not the folder dcp/"):
        import_(b, tmp_path / "s1")
    assert nothing_imported(tmp_path / "s1")

    b = forge_symlinked_data(exported["bundle"], tmp_path / "link", tmp_path / "elsewhere")
    out = verify_bundle(b)  # the listing used to skip the linked folder: every file "verified"
    assert not out["ok"] and {"file": "data/packed", "problem": "a symbolic link (a bundle holds plain files only)"} \
        in out["problems"]
    v = k2("verify-bundle", str(b))
    assert v.returncode == 1 and "data/packed" in v.stdout
    with pytest.raises(BadInputError, match="symbolic link"):
        import_(b, tmp_path / "s2")
    assert nothing_imported(tmp_path / "s2")


def test_rows_cannot_take_over_an_existing_run(exported, tmp_path) -> None:  # noqa: ANN001
    """Item 4: a bundle whose chain id is new but whose steps rows carry the victim's id."""
    from k2repro.audit.store import open_store

    rid, store = exported["rid"], tmp_path / "store"
    import_(exported["bundle"], store)  # the victim
    b = forge_takeover(exported["bundle"], tmp_path / "b", rid, "forged-1")
    with pytest.raises(BadInputError, match=f"holds rows of run '{rid}'"):
        import_(b, store)
    with open_store(store) as s:
        assert len(s.steps(rid)) == 12
        assert s.execute("SELECT count(*) FROM runs_raw WHERE run_id = ?", [rid]).fetchone()[0] == 1
        assert s.execute("SELECT count(*) FROM runs_raw WHERE run_id = 'forged-1'").fetchone()[0] == 0


def test_export_into_the_store_is_refused(exported, tmp_path) -> None:  # noqa: ANN001
    """Item 5: the store's globs would read the bundle's tables as more rows of the run."""
    from k2repro.audit.store import open_store
    from k2repro.bundle.export import export_run

    store = exported["store"]
    for out in (store / "bundle", store / "deeper" / "bundle"):
        with pytest.raises(BadInputError, match="inside store"):
            export_run(store, exported["rid"], out, checkpoints="none", data=False, reports_dir=None)
        assert not out.exists() and not list(out.parent.glob(f".{out.name}.k2tmp-*"))
    with open_store(store) as s:
        assert len(s.steps(exported["rid"])) == 12


# ----------------------------------------------------------------------------- bundle.json, incomplete runs

@pytest.mark.parametrize("body,why", [
    (b"{not json", "is not JSON"), (b"[]", "holds a list"), (b"{}", "schema_version None"),
    (b'{"schema_version": "2", "run": {"chain": [{"run_id": "a"}], "head": "a"}}', "schema_version '2'"),
    (b'{"schema_version": 2, "run": {"chain": [], "head": "a"}}', "names no launch"),
])
def test_bundle_json_that_is_not_a_bundle_is_refused(exported, tmp_path, body, why) -> None:  # noqa: ANN001
    """Item 11's bundle.json part: exit 2 naming the file, nothing written."""
    b = forge(exported["bundle"], tmp_path / "b")
    put(b / "bundle.json", body)
    reseal(b)
    store = tmp_path / "store"
    r = k2("import", "bundle", str(b), "--store", str(store)) if why == "is not JSON" else None
    if r is not None:
        assert r.returncode == 2 and "bundle.json is not JSON" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(BadInputError, match=f"bundle.json.*{why}"):
        import_(b, store)
    assert nothing_imported(store)


def test_export_refuses_an_incomplete_run(exported, tmp_path) -> None:  # noqa: ANN001
    """Item 12's export part: a folder in place of a segment is skipped by every query."""
    from k2repro.bundle.export import export_run

    store = tmp_path / "store"
    shutil.copytree(exported["store"] / exported["rid"], store / exported["rid"], ignore=shutil.ignore_patterns(
        "checkpoints"))
    sdir = store / exported["rid"] / "steps"
    segs = sorted(sdir.glob("*.parquet"))
    steps = pa.concat_tables([pq.read_table(p) for p in segs])
    for p in segs:
        p.unlink()
    for k, lo in enumerate((1, 5, 9)):  # three segments of 4 steps; the middle one becomes a folder
        part = steps.filter(pa.compute.and_(pa.compute.greater_equal(steps["step"], lo),
                                            pa.compute.less(steps["step"], lo + 4)))
        pq.write_table(part, sdir / f"r0-{k:08d}.parquet")
    (sdir / "r0-00000001.parquet").unlink()
    (sdir / "r0-00000001.parquet").mkdir()
    with pytest.raises(BadInputError, match="is incomplete.*not a segment file"):
        export_run(store, exported["rid"], tmp_path / "b", checkpoints="none", data=False, reports_dir=None)
    assert not (tmp_path / "b").exists()
    info = export_run(store, exported["rid"], tmp_path / "b", checkpoints="none", data=False, reports_dir=None,
                      allow_incomplete=True)
    assert any("not a segment file" in p for p in info["incomplete"])
    assert "4 of steps 1..12 are missing (first: 5)" in info["incomplete"]
    assert json.loads((tmp_path / "b" / "bundle.json").read_text())["incomplete"] == info["incomplete"]
    assert "Incomplete run" in (tmp_path / "b" / "README.md").read_text()


# ----------------------------------------------------------------------------- tokenizer, old bundles

def test_export_fails_loudly_without_the_tokenizer(exported, tmp_path) -> None:  # noqa: ANN001
    """Issue 23 item 1: what batch/eval need must ship; a missing tokenizer stops the export."""
    from k2repro.bundle.export import export_run

    tok = exported["tokenizer"]
    moved = tok.with_name("moved.json")
    tok.rename(moved)
    try:
        with pytest.raises(BadInputError, match="tokenizer/tokenizer.json.*not here"):
            export_run(exported["store"], exported["rid"], tmp_path / "b", checkpoints="none", reports_dir=None)
    finally:
        moved.rename(tok)
    assert not (tmp_path / "b").exists()


def test_a_bundle_of_the_previous_release_still_imports(exported, tmp_path) -> None:  # noqa: ANN001
    """No tokenizer, no signature, no bundle_version: what k2repro bundles held before."""
    from k2repro.bundle.verify import verify_bundle

    b = forge(exported["bundle"], tmp_path / "old")
    shutil.rmtree(b / "data" / "tokenizer")

    def older(info: dict) -> None:
        for k in ("bundle_version", "incomplete", "what_ships"):
            info.pop(k, None)
        info["data"] = {k: v for k, v in info["data"].items() if k not in ("tokenizer", "not_shipped")}
        info["data"]["artifacts"] = [a for a in info["data"]["artifacts"] if "tokenizer" not in a["artifact"]]
    edit_json(b / "bundle.json", older)
    reseal(b)
    assert verify_bundle(b)["ok"]
    out = import_(b, tmp_path / "store")
    assert out["run_ids"] == [exported["rid"]] and out["checkpoints"] == [4, 8, 12]


# ----------------------------------------------------------------------------- signatures (item 8)

def test_signed_bundle_proves_origin(exported, tmp_path) -> None:  # noqa: ANN001
    from k2repro.bundle.verify import verify_bundle

    priv, pub, other = make_keys(tmp_path)
    b = tmp_path / "signed"
    e = k2("export", exported["rid"], "--store", str(exported["store"]), "--out", str(b), "--checkpoints", "none",
           "--no-data", "--sign", str(priv), cwd=exported["root"])
    assert e.returncode == 0, e.stderr[-2000:]
    assert (b / "MANIFEST.sig").is_file()
    ok = k2("verify-bundle", str(b), "--key", str(pub))
    assert ok.returncode == 0 and "signed by key" in ok.stdout
    bad = verify_bundle(b, other)
    assert not bad["ok"] and bad["problems"][0]["file"] == "MANIFEST.sig"
    assert bad["problems"][0]["problem"].startswith("does not verify")
    with pytest.raises(BadInputError, match="not an ed25519 public key"):
        verify_bundle(b, priv)
    with pytest.raises(BadInputError, match="MANIFEST.sig: does not verify"):
        import_(b, tmp_path / "s1", key=other)
    assert nothing_imported(tmp_path / "s1")
    # a forgery resealed after signing: the checksums agree, the signature does not
    f = forge_after_signing(b, tmp_path / "forged")
    assert verify_bundle(f)["ok"]  # integrity alone cannot tell
    assert not verify_bundle(f, pub)["ok"]
    # unsigned bundles are refused when a key is given
    with pytest.raises(BadInputError, match="MANIFEST.sig: missing"):
        import_(exported["bundle"], tmp_path / "s2", key=pub)
    assert nothing_imported(tmp_path / "s2")
    out = import_(b, tmp_path / "s3", key=pub)
    assert out["run_ids"] == [exported["rid"]] and out["signed_by"]


# ----------------------------------------------------------------------------- runs k2repro did not train

def test_api_run_exports_at_once_with_a_card_of_what_was_recorded(tmp_path, capsys) -> None:  # noqa: ANN001
    """Issue 23 item 7: no `--no-data`, no `--checkpoints none` to discover; the card describes
    the recorded config, not k2repro's model."""
    from k2repro.audit import start
    from k2repro.bundle.export import export_run

    store = tmp_path / "store"
    ck = tmp_path / "hf-out" / "checkpoint-2"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(b"not k2repro's")
    run = start(store, name="my-loop", config={"model": {"hidden_size": 48, "arch": "MyNet"}, "lr": 0.003},
                source="api:transformers")
    for step in (1, 2, 3):
        run.log_step(step, loss=3.0 - step / 10)
    run.log_checkpoint(2, ck)
    run.close()
    b = tmp_path / "b"
    info = export_run(store, run.run_id, b, progress=lambda m: print(m))
    said = capsys.readouterr().out
    assert info["what_ships"] in said and "cannot replay" in info["what_ships"]
    assert "not its data" in info["what_ships"] and "1 recorded checkpoint(s)" in info["what_ships"]
    assert info["checkpoints"] == [] and not info["data"]["shipped"]
    card = (b / "README.md").read_text()
    assert "None layers" not in card and "lr None" not in card and "d_model None" not in card
    assert "`model.hidden_size` | 48" in card and "`lr` | 0.003" in card and "api:transformers" in card


def test_model_card_says_when_the_code_was_dirty() -> None:
    """The card says "uncommitted changes" from the run's `runs.git_dirty` boolean (facts.py
    records git.dirty as "true"; the card used to test the text for "True")."""
    from k2repro.bundle.card import render_model_card

    chain = [{"run_id": "r1", "source": "train", "world_size": 1, "config_hash": "h", "resumed_from_step": None,
              "parent_run_id": None}]
    info = {"run": {"head": "r1", "name": "r", "chain": chain}, "created_at": "2026-01-01T00:00:00",
            "k2repro_version": "0", "schema_version": 2, "checkpoints": [], "figures": [], "notes": [],
            "steps": {"count": 1, "first": 1, "last": 1, "final_loss": 1.0}, "data": {"shipped": False},
            "data_order": {}}
    for dirty, said in ((True, True), (False, False), (None, False)):
        card = render_model_card(info, {}, {"0": {"git.commit": "abc", "git.dirty": "true"}}, None, git_dirty=dirty)
        assert ("(with uncommitted changes)" in card) is said


def test_run_recorded_from_dirty_code_gets_a_card_that_says_so(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Issue 19: a run recorded (audit API, real git facts) from a working tree with uncommitted
    changes exports a README that says so, and one recorded after the commit does not. Through
    the whole path: facts.py's "true" -> runs.git_dirty -> export -> README.md."""
    import subprocess

    from k2repro.audit.api import start
    from k2repro.bundle.export import export_run
    from tests.conftest import dirty_repo

    repo = dirty_repo(tmp_path / "repo", "train.py", "x = 2\n")
    monkeypatch.chdir(repo)  # the facts describe the code of the working directory
    store = tmp_path / "store"
    cards = {}
    for label in ("dirty", "clean"):
        if label == "clean":
            subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qam", "two"],
                           cwd=repo, check=True, capture_output=True)
        run = start(store, name=label, config={"lr": 0.1}, source="api")
        run.log_step(1, loss=1.0)
        run.close()
        export_run(store, run.run_id, tmp_path / f"b-{label}", reports_dir=None)
        cards[label] = (tmp_path / f"b-{label}" / "README.md").read_text()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert "(with uncommitted changes)" in cards["dirty"]
    assert f"code `{commit}`." in cards["clean"] and "(with uncommitted changes)" not in cards["clean"]


def test_config_paths_are_moved_into_the_store() -> None:
    """Item 8: every config value that names a path becomes the imported copy, the store, or
    empty; other values stay as they were."""
    from k2repro.bundle.relocate import rewrite_config

    ctx = {"store": "S", "packed": "S/b/data/packed", "data": "S/b/data",
           "resumes": [("r1", "step_00000004", "S/b/r1/checkpoints/step_00000004")]}
    cfg = {"data": {"packed_dir": "/home/u/packed", "work_dir": "data/work", "source": "data/sample"},
           "ckpt": {"dir": "/scratch/ck"}, "audit": {"store": "/home/u/runs"}, "optim": {"lr": 0.1},
           "train": {"resume": "/scratch/ck/r1/checkpoints/step_00000004"},
           "run": {"tags": {"note": "/etc/elsewhere", "mood": "~fine"}}}
    new, changes = rewrite_config(cfg, ctx)
    assert new == {"data": {"packed_dir": "S/b/data/packed", "work_dir": "S/b/data", "source": ""},
                   "ckpt": {"dir": ""}, "audit": {"store": "S"}, "optim": {"lr": 0.1},
                   "train": {"resume": "S/b/r1/checkpoints/step_00000004"},
                   "run": {"tags": {"note": "", "mood": "~fine"}}}
    assert changes["run.tags.note"] == ["/etc/elsewhere", ""] and "optim.lr" not in changes
    assert cfg["data"]["packed_dir"] == "/home/u/packed"  # the input is not changed in place
