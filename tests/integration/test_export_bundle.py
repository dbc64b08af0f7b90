"""`k2repro export` / `verify-bundle` / `import bundle` with one real 2-rank launch (gloo):
the bundle holds every promised piece, its data order matches the recorded batch hashes, its
safetensors weights equal the DCP checkpoint's, a flipped byte in any file fails verification
naming that file and makes the import refuse (exit 2, nothing written), and the bundle
imported into a fresh store replays bit for bit there (`k2repro replay`, from the shipped DCP
checkpoint and data)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import k2
from tests.integration.bundle_fixture import real_bundle


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """tests/integration/bundle_fixture.py: one 2-rank run, exported with every checkpoint."""
    return real_bundle(tmp_path_factory)


def test_bundle_holds_every_piece(exported) -> None:  # noqa: ANN001
    b, info, rid = exported["bundle"], exported["info"], exported["rid"]
    for rel in ("README.md", "MANIFEST.json", "bundle.json", "config.yaml", "env.json", "k2repro.duckdb",
                "figures/loss.png", "data/order.parquet", "data/packed/manifest.json", "data/packed/train.bin",
                "logical/steps.parquet", "logical/evals.parquet", f"forensics/{rid}/forensics.md",
                f"tables/{rid}/steps/r0-00000000.parquet", f"tables/{rid}/env/r0-00000000.parquet"):
        assert (b / rel).is_file(), rel
    assert (b / "figures/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [c["step"] for c in info["checkpoints"]] == [4, 8, 12]
    for c in info["checkpoints"]:
        assert (b / c["safetensors"]).is_file() and (b / c["dcp"] / "manifest.json").is_file()
        assert len(list((b / c["dcp"]).glob("*.distcp"))) == 2  # both ranks' shards
    assert info["steps"] == {"count": 12, "first": 1, "last": 12, "final_loss": info["steps"]["final_loss"]}
    assert info["data"]["shipped"] and info["data_order"]["batch_hash_checked"] == 12
    # the tokenizer beside the packed folder ships (batch, eval need it), checked by sha256;
    # an earlier stage's artefact is named, not shipped
    assert (b / "data/tokenizer/tokenizer.json").read_bytes() == exported["tokenizer"].read_bytes()
    assert info["data"]["tokenizer"] == "data/tokenizer/tokenizer.json"
    assert "data/tokenizer/tokenizer.json" in [a["bundle_path"] for a in info["data"]["artifacts"]]
    assert info["data"]["not_shipped"] == ["dedup/train"]
    assert not (b / "tables" / rid / "sample_stats").exists()  # only with --with-samples
    manifest = json.loads((b / "MANIFEST.json").read_text())
    on_disk = {f.relative_to(b).as_posix() for f in b.rglob("*") if f.is_file()} - {"MANIFEST.json"}
    assert set(manifest["files"]) == on_disk
    readme = (b / "README.md").read_text()
    assert rid in readme and "figures/loss.png" in readme and "val/loss" in readme
    assert f"k2repro replay {rid}" in readme
    import yaml

    cfg = yaml.safe_load((b / "config.yaml").read_text())
    assert cfg["train"]["max_steps"] == 12 and cfg["parallel"]["nproc"] == 2


def test_data_order_and_tables_match_the_store(exported) -> None:  # noqa: ANN001
    import duckdb
    import pyarrow.parquet as pq

    from k2repro.audit.store import open_store
    from k2repro.data.loader import batch_hash

    b, rid = exported["bundle"], exported["rid"]
    order = pq.read_table(b / "data/order.parquet").to_pandas()
    with open_store(exported["store"]) as s:
        steps = s.steps(rid)
        samples = s.sample_stats(rid)
    assert sorted(order["step"].unique()) == list(range(1, 13))
    for step, g in order.groupby("step"):
        ids = g.sort_values("batch_pos")["sample_id"].tolist()
        assert batch_hash(ids) == steps.loc[steps.step == step, "batch_hash"].item()
        assert sorted(ids) == sorted(samples.loc[samples.step == step, "sample_id"].tolist())
    con = duckdb.connect(str(b / "k2repro.duckdb"), read_only=True, config={"file_search_path": str(b)})
    try:
        rows = con.execute("SELECT step, loss FROM steps ORDER BY step").fetchall()
        assert rows == list(zip(steps.step.tolist(), steps.loss.tolist()))  # exact floats
        assert con.execute("SELECT count(*) FROM logical_steps").fetchone()[0] == 12
        assert con.execute("SELECT status FROM runs").fetchall() == [("completed",)]
        assert con.execute("SELECT count(*) FROM data_order").fetchone()[0] == 12 * 8
    finally:
        con.close()


def test_safetensors_equal_the_dcp_weights(exported, tmp_path) -> None:  # noqa: ANN001
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    b, info = exported["bundle"], exported["info"]
    last = info["checkpoints"][-1]
    dcp_to_torch_save(str(b / last["dcp"]), str(tmp_path / "full.pt"))  # an independent reader
    full = torch.load(tmp_path / "full.pt", weights_only=False)["model"]
    weights = load_file(str(b / last["safetensors"]))
    assert set(weights) == set(full) and len(weights) > 5
    for k, v in weights.items():
        assert torch.equal(v, full[k]), k
    from k2repro.core.hashing import sha256_file

    assert sha256_file(b / last["safetensors"]) == last["safetensors_sha256"]


def test_verify_bundle_names_any_flipped_byte(exported) -> None:  # noqa: ANN001
    from k2repro.bundle.verify import verify_bundle

    b = exported["bundle"]
    assert k2("verify-bundle", str(b)).returncode == 0
    files = sorted(f for f in b.rglob("*") if f.is_file())
    assert len(files) > 30
    for f in files:  # every file of the bundle, MANIFEST.json included
        data = bytearray(f.read_bytes())
        pos = len(data) // 2
        data[pos] ^= 0x01
        f.write_bytes(bytes(data))
        try:
            out = verify_bundle(b)
        finally:
            data[pos] ^= 0x01
            f.write_bytes(bytes(data))
        rel = f.relative_to(b).as_posix()
        assert not out["ok"] and [p["file"] for p in out["problems"]] == [rel], (rel, out["problems"])
    assert verify_bundle(b)["ok"]


def test_cli_flip_fails_verify_and_import_refuses(exported, tmp_path) -> None:  # noqa: ANN001
    b = tmp_path / "bundle"
    shutil.copytree(exported["bundle"], b)
    target = next(b.glob("dcp/*/step_00000008/__1_0.distcp"))
    data = bytearray(target.read_bytes())
    data[100] ^= 0x80
    target.write_bytes(bytes(data))
    rel = target.relative_to(b).as_posix()
    v = k2("verify-bundle", str(b), "--json")
    assert v.returncode == 1
    out = json.loads(v.stdout)
    assert out["problems"] == [{"file": rel, "problem": "sha256 differs from the manifest"}]
    store = tmp_path / "store"
    i = k2("import", "bundle", str(b), "--store", str(store))
    assert i.returncode == 2 and rel in i.stderr and "nothing imported" in i.stderr
    assert not store.exists() or not any(p for p in store.iterdir() if p.name.startswith(("bundle-", ".k2imp")))
    (b / "extra.txt").write_text("x")
    target.write_bytes(bytes(data[:100]) + bytes([data[100] ^ 0x80]) + bytes(data[101:]))
    v = k2("verify-bundle", str(b))
    assert v.returncode == 1 and "extra.txt: not listed in the manifest" in v.stdout
    assert k2("verify-bundle", str(tmp_path / "nope")).returncode == 2


def test_import_into_fresh_store_replays_bit_exact(exported, tmp_path) -> None:  # noqa: ANN001
    rid, root = exported["rid"], exported["root"]
    store = tmp_path / "fresh"
    i = k2("import", "bundle", str(exported["bundle"]), "--store", str(store), "--json", cwd=root)
    assert i.returncode == 0, i.stderr[-2000:]
    out = json.loads(i.stdout)
    assert out["run_ids"] == [rid]
    folder = Path(out["folder"])
    new_packed = folder / "data" / "packed"
    assert out["rewrites"][rid]["data.packed_dir"] == [str(exported["packed"]), str(new_packed.resolve())]
    from k2repro.audit.store import open_store

    with open_store(store) as s:
        row = s.run(rid)
        assert row["status"] == "completed" and row["source"] == "train"
        assert json.loads(row["config_json"])["data"]["packed_dir"] == str(new_packed.resolve())
        assert s.hparams(rid)["data.packed_dir"] == str(new_packed.resolve())
        ev = s.events(rid, "import")
        assert len(ev) == 1 and "data.packed_dir" in json.loads(ev.detail[0])["rewrites"]
        paths = s.checkpoints(rid).path.tolist()
        assert all(str(folder.resolve()) in p for p in paths)
        with open_store(exported["store"]) as orig:
            assert s.steps(rid).loss.tolist() == orig.steps(rid).loss.tolist()
        # nothing in the imported config names a path outside the store (issue 24 item 8)
        cfg = json.loads(row["config_json"])
        assert cfg["data"]["work_dir"] == str((folder / "data").resolve()) and cfg["data"]["source"] == ""
        assert cfg["audit"]["store"] == str(store.resolve()) and cfg["ckpt"]["dir"] == ""
        # the shipped tokenizer is found through the imported packed folder: batch shows text
        from k2repro.tools.batch import batch_lookup

        bl = batch_lookup(s, rid, 5)
        assert not any("no text" in n for n in bl["notes"]), bl["notes"]
        assert bl["batch_hash_agrees"] and any(d["snippet"] for smp in bl["samples"] for d in smp["docs"])
        # exported without --with-samples: batch says why the per-sample losses are missing
        assert any("without --with-samples" in n and "recomputed" in n for n in bl["notes"]), bl["notes"]
    again = k2("import", "bundle", str(exported["bundle"]), "--store", str(store))
    assert again.returncode == 2 and "already in store" in again.stderr
    # move the original data away: the replay can only use the shipped copy
    moved = exported["packed"].with_name("packed-moved")
    exported["packed"].rename(moved)
    try:
        r = k2("replay", rid, "--from-step", "5", "--to-step", "8", "--store", str(store), "--json", cwd=tmp_path)
    finally:
        moved.rename(exported["packed"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rep = json.loads(r.stdout)
    assert rep["bit_exact"] is True and rep["steps_compared"] == 4 and rep["start_step"] == 4
    assert str(folder.resolve()) in str(Path(rep["checkpoint"]).resolve())
