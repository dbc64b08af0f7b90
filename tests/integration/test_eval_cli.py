"""Issue 8's must-shows with the real CLI: `k2repro eval` over a tiny run with 4 checkpoints at
world size 1 and 2 (torchrun, FSDP, resharded from the world size 1 checkpoints), skipping and
deterministic rows, a corrupt checkpoint refused with nothing written, and `k2repro report`.

One module-scoped run serves every test: a corpus where 4 random-token documents repeat 16
times each (memorized) beside motif documents of two domains (held out: code and prose).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import k2, tiny_overrides

VOCAB, SEQ = 320, 32
METRICS = {"val/loss", "val/ppl", "val/ppl/code", "val/ppl/prose", "mem/exact_match", "mem/matched_prefix"}


def make_mem_packed(out: Path, n_repeat: int = 4, copies: int = 16, n_motif: int = 30, n_val: int = 12,
                    seed: int = 0) -> Path:
    """Repeated random documents, each exactly one window long (SEQ tokens + EOS), then motif
    documents; the val split holds unseen motif documents of two domains."""
    from k2repro.data.packed import Doc, write_packed

    rng = np.random.default_rng(seed)
    motifs = [rng.integers(3, VOCAB, size=rng.integers(5, 12)) for _ in range(8)]

    def motif_doc(i: int) -> Doc:
        toks = np.resize(motifs[i % len(motifs)], int(rng.integers(40, 120))).copy()
        noise = rng.random(toks.size) < 0.1
        toks[noise] = rng.integers(3, VOCAB, size=int(noise.sum()))
        return Doc(f"motif/{i:04d}", "code" if i % 3 == 0 else "prose", toks)

    reps = [rng.integers(3, VOCAB, size=SEQ) for _ in range(n_repeat)]
    train = [Doc(f"repeat/{j}/{c}", "repeat", reps[j]) for c in range(copies) for j in range(n_repeat)]
    train += [motif_doc(i) for i in range(n_motif)]
    write_packed(out, {"train": train, "val": [motif_doc(1000 + i) for i in range(n_val)]}, seq_len=SEQ,
                 vocab_size=VOCAB, eos_id=0)
    return out


def _json(r) -> dict:  # noqa: ANN001
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("eval")
    packed = make_mem_packed(base / "packed")
    store = base / "store"
    r = k2("train", *tiny_overrides(packed, store, **{
        "model.d_model": 64, "model.ffn_dim": 128, "train.micro_batch_size": 4, "train.max_steps": 80,
        "optim.lr": 0.01, "optim.min_lr": 0.001, "ckpt.interval": 20, "run.name": "evaltest"}))
    assert r.returncode == 0, r.stderr[-3000:]
    run_id = re.search(r"run_id=(\S+)", r.stdout).group(1)
    ws1 = k2("eval", run_id, "--store", str(store), "--out-store", str(base / "eval1"), "--json",
             "--batch-size", "32")
    ws2 = k2("eval", "evaltest", "--store", str(store), "--out-store", str(base / "eval2"), "--json",
             "--batch-size", "32", "--nproc", "2")
    return {"base": base, "packed": packed, "store": store, "run_id": run_id, "ws1": ws1, "ws2": ws2,
            "ws1_json": _json(ws1), "ws2_json": _json(ws2)}


def _evals(root: Path, run_id: str):  # noqa: ANN202
    import k2repro

    with k2repro.open_store(root) as s:
        return s.sql("SELECT * FROM evals WHERE run_id = ? ORDER BY step, metric", [run_id])


def test_evals_has_every_metric_for_every_checkpoint(world: dict) -> None:
    import k2repro

    ev = _evals(world["base"] / "eval1", world["run_id"])
    with k2repro.open_store(world["store"]) as s:
        ck = s.checkpoints(world["run_id"])
    assert list(ck["step"]) == [20, 40, 60, 80]
    for step, sha in zip(ck["step"], ck["manifest_sha256"]):
        rows = ev[ev["step"] == step]
        assert set(rows["metric"]) == METRICS, step
        assert len(rows) == len(METRICS)
        assert set(rows["manifest_sha256"]) == {sha}, "rows must name the weights they come from"
        assert rows["value"].notna().all() and np.isfinite(rows["value"]).all()
        assert rows["time"].isna().all(), "no timestamps in what eval writes"
        detail = json.loads(rows["detail"].iloc[0])
        assert detail["k"] == 16 and detail["k_requested"] == 32  # clamped: seq_len 32 -> (32 + 1) // 2
    # the progress lines
    for step in (20, 40, 60, 80):
        assert re.search(rf"step {step} \(\d/4\): val/loss", world["ws1"].stderr)
        # and the phases while it works (issue 23 item 13)
        for phase in ("loading weights", "perplexity over", r"memorization over \d+ training sequences"):
            assert re.search(rf"step {step} \(\d/4\): {phase}", world["ws1"].stderr), phase
    assert "4 checkpoint(s) to evaluate" in world["ws1"].stderr
    # the same rows are visible from a root above both stage folders
    assert len(_evals(world["base"], world["run_id"])) >= 2 * 4 * len(METRICS)


def test_held_out_perplexity_falls_over_training(world: dict) -> None:
    by_step = {c["step"]: c["metrics"] for c in world["ws1_json"]["checkpoints"]}
    assert by_step[80]["val/ppl"] < by_step[20]["val/ppl"]
    for dom in ("code", "prose"):
        assert by_step[80][f"val/ppl/{dom}"] < by_step[20][f"val/ppl/{dom}"]
    assert by_step[80]["val/ppl"] == pytest.approx(np.exp(by_step[80]["val/loss"]))


def test_memorization_of_repeated_sequences_is_high_and_of_unseen_random_ones_zero(world: dict) -> None:
    import torch

    import k2repro
    from k2repro.config.load import from_dict
    from k2repro.data.packed import PackedDataset
    from k2repro.eval.memorization import greedy_match
    from k2repro.eval.runner import load_model_weights
    from k2repro.model.build import build_model

    with k2repro.open_store(world["store"]) as s:
        cfg = from_dict(json.loads(s.run(world["run_id"])["config_json"]))
        last = s.checkpoints(world["run_id"])["path"].iloc[-1]
    ds = PackedDataset(world["packed"], "train")
    rep = ds.docs[ds.docs["domain"] == "repeat"]
    ids = (rep["token_start"].to_numpy() // (SEQ + 1))[:16]  # one repeated document per window
    repeated = ds.get(ids, SEQ)
    random = np.random.default_rng(123).integers(3, VOCAB, size=(64, SEQ + 1))
    model = build_model(cfg.model, cfg.train.seed, "cpu")
    load_model_weights(model, last)
    k = 16
    seen = greedy_match(model, repeated, k, torch.device("cpu"))
    unseen = greedy_match(model, random, k, torch.device("cpu"))
    assert np.mean(seen == k) > 0.5, seen
    assert np.mean(unseen == k) == 0.0
    # the CLI's sample (training sequences seen before each checkpoint) follows training
    by_step = {c["step"]: c["metrics"] for c in world["ws1_json"]["checkpoints"]}
    assert by_step[80]["mem/exact_match"] > by_step[20]["mem/exact_match"]
    assert by_step[80]["mem/matched_prefix"] > by_step[20]["mem/matched_prefix"]


def test_world_size_1_and_2_agree(world: dict) -> None:
    a = {c["step"]: c for c in world["ws1_json"]["checkpoints"]}
    b = {c["step"]: c for c in world["ws2_json"]["checkpoints"]}
    assert sorted(a) == sorted(b) == [20, 40, 60, 80]
    assert world["ws2_json"]["nproc"] == 2
    for step in a:
        for m in METRICS:
            if m.startswith("val/"):
                assert abs(a[step]["metrics"][m] - b[step]["metrics"][m]) <= 1e-5 * abs(a[step]["metrics"][m]), (step, m)
        ma, mb = a[step]["memorization"], b[step]["memorization"]
        assert ma["sample_ids"] == mb["sample_ids"]
        assert sum(x != y for x, y in zip(ma["matched"], mb["matched"])) <= 1
    ev2 = _evals(world["base"] / "eval2", world["run_id"])
    assert {json.loads(d)["world_size"] for d in ev2["detail"]} == {2}
    assert len(ev2) == 4 * len(METRICS)


def test_unchanged_checkpoints_are_skipped_other_settings_are_not(world: dict) -> None:
    out = world["base"] / "eval1"
    before = {f.name: f.read_bytes() for f in (out / world["run_id"] / "evals").glob("*.parquet")}
    assert len(before) == 4
    r = k2("eval", world["run_id"], "--store", str(world["store"]), "--out-store", str(out), "--json")
    obj = _json(r)
    assert [c["status"] for c in obj["checkpoints"]] == ["skipped"] * 4
    assert r.stderr.count("skipped") == 4
    first = {c["step"]: c["metrics"] for c in world["ws1_json"]["checkpoints"]}
    assert {c["step"]: c["metrics"] for c in obj["checkpoints"]} == first
    # other settings are another evaluation, in a segment of its own beside the first
    r = k2("eval", world["run_id"], "--store", str(world["store"]), "--out-store", str(out), "--steps", "80",
           "--k", "8", "--mem-samples", "16", "--json")
    assert [c["status"] for c in _json(r)["checkpoints"]] == ["evaluated"]
    after = {f.name: f.read_bytes() for f in (out / world["run_id"] / "evals").glob("*.parquet")}
    assert len(after) == 5 and all(after[n] == b for n, b in before.items())


def test_corrupt_checkpoint_exits_2_names_the_file_and_writes_nothing(world: dict, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(world["store"], store)
    ckdir = next(store.glob("**/checkpoints/step_00000040"))
    victim = sorted(ckdir.glob("*.distcp"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    # checkpoints are found under the store root even though the run recorded other paths
    r = k2("eval", world["run_id"], "--store", str(store))
    assert r.returncode == 2, r.stderr
    assert victim.name in r.stderr and "corrupt" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert len(_evals(store, world["run_id"])) == 0
    assert not list(store.glob(f"**/{world['run_id']}/evals"))
    # a selection without the bad checkpoint works, and recomputes world size 1's rows byte for
    # byte in another process and store (what lets `dvc repro` see an unchanged output)
    r = k2("eval", world["run_id"], "--store", str(store), "--steps", "80", "--batch-size", "32")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(set(_evals(store, world["run_id"])["step"])) == [80]
    (seg,) = (store / world["run_id"] / "evals").glob("step_00000080-*.parquet")
    assert seg.read_bytes() == (world["base"] / "eval1" / world["run_id"] / "evals" / seg.name).read_bytes()


def test_planning_refuses_other_data_and_absent_steps(world: dict, tmp_path: Path) -> None:
    from k2repro.errors import BadInputError
    from k2repro.eval.runner import plan_eval
    from tests.conftest import make_packed

    other = make_packed(tmp_path / "other", vocab=VOCAB, seq_len=SEQ)
    with pytest.raises(BadInputError, match=r"train\.bin is not the data run"):
        plan_eval(world["store"], world["run_id"], data_dir=other, out_store=tmp_path / "o")
    with pytest.raises(BadInputError, match=r"step\(s\) 30 \(on disk: 20, 40, 60, 80\)"):
        plan_eval(world["store"], world["run_id"], steps=[30])
    assert not (tmp_path / "o").exists()
    plan = plan_eval(world["store"], world["run_id"], steps=[20, 80], out_store=world["base"] / "eval2")
    assert [c.step for c in plan.skipped] == [20, 80] and plan.todo == []


def test_report_has_an_over_training_section_with_spikes_and_forensics_link(world: dict, tmp_path: Path) -> None:
    from k2repro.audit.writer import append_table

    root = tmp_path / "pipeline"
    shutil.copytree(world["store"], root / "train")
    shutil.copytree(world["base"] / "eval1", root / "eval")
    # what `k2repro forensics --out-store ... --out ...` leaves behind
    # the second spike has no lead signal and no layer (NULL text: pandas reads it back as NaN,
    # which once made the report's strict JSON refuse the whole report, in make run)
    append_table(root / "forensics", world["run_id"], "spikes", {
        "spike_id": [1, 2], "onset_step": [30, 50], "peak_step": [31, 51], "end_step": [34, 52],
        "magnitude": [9.5, 4.0], "class": ["transient", "transient"], "severity": ["benign", "benign"],
        "lead_signal": ["grad_norm", None], "top_layer": ["output.weight", None],
        "top_samples": ["[1, 2]", "[]"]})
    out = tmp_path / "reports"
    (out / world["run_id"]).mkdir(parents=True)
    (out / world["run_id"] / "forensics.html").write_text("<html></html>")
    r = k2("report", "evaltest", "--store", str(root), "--out", str(out), "--json")
    obj = _json(r)
    ot = obj["over_training"]
    assert [row["step"] for row in ot["rows"]] == [20, 40, 60, 80]
    assert [row["tokens"] for row in ot["rows"]] == [s * 8 * SEQ for s in (20, 40, 60, 80)]
    assert set(ot["metrics"]) == METRICS
    first = {c["step"]: c["metrics"] for c in world["ws1_json"]["checkpoints"]}
    assert all(row["val/ppl"] == first[row["step"]]["val/ppl"] for row in ot["rows"])
    assert all(row["train_loss"] is not None for row in ot["rows"])
    assert obj["spikes"][0]["onset_step"] == 30 and obj["spikes"][0]["class"] == "transient"
    assert obj["spikes"][1]["lead_signal"] is None and obj["spikes"][1]["top_layer"] is None
    assert obj["forensics"] == {"html": "forensics.html"}
    page = Path(obj["files"]["html"]).read_text()
    # the UI's charts, inlined (issue 20): loss + grad norm, lr; eval loss, perplexities, memorization
    assert 'id="over-training"' in page and page.count('class="k2chart"') >= 4 and "<img" not in page
    assert "http://" not in page and "https://" not in page
    assert 'href="forensics.html"' in page
    md = Path(obj["files"]["md"]).read_text()
    assert "## Over training" in md and "| 80 | 20,480 |" in md and "transient" in md
    # a run without evals or spikes still gets its report
    from k2repro.tools.report import write_report

    bare, paths = write_report(world["store"], world["run_id"], tmp_path / "r2")
    assert bare["over_training"]["rows"] == [] and bare["spikes"] == [] and bare["forensics"] == {}
    assert "No evals yet" in paths["md"].read_text() and paths["html"].exists()


def test_help_and_bad_options(world: dict) -> None:
    for cmd in ("eval", "report"):
        r = k2(cmd, "--help")
        assert r.returncode == 0 and "--store" in r.stdout and "--json" in r.stdout
    r = k2("eval", world["run_id"], "--store", str(world["store"]), "--steps", "4x")
    assert r.returncode == 2 and "--steps" in r.stderr
    r = k2("report", "x", "--store", str(world["base"] / "nope"))
    assert r.returncode == 2 and "no store" in r.stderr
