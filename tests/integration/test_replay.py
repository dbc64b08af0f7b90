"""`k2repro replay` with real launches (gloo, 2 ranks): steps 11..30 of a run with checkpoints
at 10, 20, 30 replay bit for bit from the checkpoint of step 10, steps 1..5 from the initial
state; a tampered checkpoint, changed data, an unknown run and a missing starting state are
refused (exit 2, named) before anything trains; a 2 -> 1 rank replay of steps 13..20 is close,
not bit-exact (exit 1 at tolerance 1e-9).

One fleet of runs, built once per session (`fleet()`), serves this module and
tests/integration/test_batch.py: a 2-rank launch costs ~10-15 s here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, k2, tiny_overrides

_FLEET: dict = {}


def make_text_packed(out: Path, n_docs: int = 120, seed: int = 0) -> Path:
    """A packed corpus of short English-like documents with its own byte-level BPE, so that
    samples decode to readable text (`k2repro batch` shows it)."""
    from k2repro.core.hashing import sha256_file
    from k2repro.data.packed import Doc, write_packed
    from k2repro.data.tokenizer import TOKENIZER_FILE, build_trainer, eos_id

    rng = np.random.default_rng(seed)
    words = ("the cat sat on a mat while two dogs ran over green hills under a blue sky and small "
             "birds sang old songs near the river").split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(25, 70)))) + "." for _ in range(n_docs)]
    tok, trainer = build_trainer(320, 1)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tdir = out.parent / "tokenizer"
    tdir.mkdir(parents=True, exist_ok=True)
    tok.save(str(tdir / TOKENIZER_FILE))
    docs = [Doc(f"text/{i:04d}", "prose", np.asarray(tok.encode(t, add_special_tokens=False).ids))
            for i, t in enumerate(texts)]
    tok_row = {"artifact": "tokenizer/tokenizer.json", "path": f"../tokenizer/{TOKENIZER_FILE}",
               "sha256": sha256_file(tdir / TOKENIZER_FILE)}
    write_packed(out, {"train": docs[:-10], "val": docs[-10:]}, seq_len=32, vocab_size=tok.get_vocab_size(),
                 eos_id=eos_id(tok), extra_artifacts=[tok_row], meta={"tokenizer": f"tokenizer/{TOKENIZER_FILE}"})
    return out


def run_id_of(proc) -> str:  # noqa: ANN001
    m = re.search(r"run_id=(\S+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    return m.group(1)


def k2_without_torch(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a process where any torch import fails (query commands must not need it)."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from k2repro.cli.main import main\n"
            f"sys.exit(main({list(args)!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)


def k2_all(commands: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Run independent CLI commands at once (as `k2` does one): start-up and rendezvous
    waits overlap, so a fleet costs less wall time on few cores."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in commands]  # never a full pipe
    procs = [subprocess.Popen([sys.executable, "-m", "k2repro", *c], cwd=cwd, env=env, text=True,
                              stdout=o, stderr=e) for c, (o, e) in zip(commands, files)]
    out = []
    for c, p, (o, e) in zip(commands, procs, files):
        p.wait(timeout=600)
        o.seek(0)
        e.seek(0)
        out.append(subprocess.CompletedProcess(c, p.returncode, o.read(), e.read()))
        o.close()
        e.close()
    return out


def fleet(tmp_path_factory) -> dict:  # noqa: ANN001
    """P: a 2-rank run of 30 steps with checkpoints at 10, 20, 30 on a text corpus; then, at
    once, `k2repro replay P` of steps 11..30 (R), of steps 1..5 (R5), and of steps 11..20 at
    one rank with --allow-reshard --tolerance 1e-9 into another store (RS: from the checkpoint
    of step 10, so 11 and 12 are re-run but not compared)."""
    if _FLEET:
        return _FLEET
    root = tmp_path_factory.mktemp("replay")
    packed = make_text_packed(root / "data" / "packed")
    store = root / "store"
    # cwd outside the git checkout: git facts are the same for every launch
    r = k2("train", *tiny_overrides(packed, store, **{"parallel.nproc": 2, "ckpt.interval": 10,
                                                      "audit.flush_every": 5, "train.max_steps": 30}), cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    pid = run_id_of(r)
    base = ["replay", pid, "--store", str(store), "--json"]
    rep, rep5, reshard = k2_all([
        [*base, "--from-step", "11", "--to-step", "30"],
        [*base, "--from-step", "1", "--to-step", "5"],
        [*base, "--from-step", "13", "--to-step", "20", "--nproc", "1", "--allow-reshard", "--tolerance", "1e-9",
         "--out-store", str(root / "one_rank")],
    ], cwd=root)
    _FLEET.update(root=root, packed=packed, store=store, P=pid, R_proc=rep, R5_proc=rep5, RS_proc=reshard,
                  one_rank=root / "one_rank")
    return _FLEET


@pytest.fixture(scope="module")
def fl(tmp_path_factory) -> dict:  # noqa: ANN001
    return fleet(tmp_path_factory)


def _report(proc) -> dict:  # noqa: ANN001
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines, proc.stderr[-2000:]
    return json.loads(lines[-1])


def _refused(proc, *needles: str) -> str:  # noqa: ANN001
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("k2repro replay: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[-1], lines[-1]
    return lines[-1]


def _run_ids(store: Path) -> set[str]:
    import k2repro

    with k2repro.open_store(store) as s:
        return set(s.runs()["run_id"])


def test_replay_of_steps_11_to_30_is_bit_exact(fl: dict) -> None:
    proc = fl["R_proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = _report(proc)
    assert rep["bit_exact"] is True and rep["within_tolerance"] is True
    assert rep["start_step"] == 10 and rep["checkpoint"].endswith("step_00000010")
    assert rep["steps_compared"] == 20 and rep["rerun_not_compared"] == []
    assert rep["first_divergence_step"] is None and rep["max_abs_diff"] == 0.0
    assert rep["signals"]["batch_hash"]["compared"] == 20
    assert rep["signals"]["loss"]["bitwise_equal"] == 20
    # layer stats of steps 20 and 30 (layer_stats_every=10) were compared too
    assert rep["signals"]["layer_stats.update_norm"]["compared"] > 0
    assert "replay: step" in proc.stderr  # progress
    import k2repro

    with k2repro.open_store(fl["store"]) as s:
        row = s.run(rep["replay_run_id"])
        assert row["source"] == "replay" and row["parent_run_id"] == fl["P"]
        assert int(row["world_size"]) == 2 and int(row["resumed_from_step"]) == 10
        a = s.steps(fl["P"]).set_index("step")
        b = s.steps(rep["replay_run_id"]).set_index("step")
    assert list(b.index) == list(range(11, 31))
    assert np.array_equal(a.loc[11:30, "loss"].to_numpy().view(np.int64), b["loss"].to_numpy().view(np.int64))


def test_replay_of_steps_1_to_5_from_the_initial_state(fl: dict) -> None:
    proc = fl["R5_proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = _report(proc)
    assert rep["start_step"] == 0 and rep["checkpoint"] is None
    assert rep["bit_exact"] is True and rep["steps_compared"] == 5
    assert rep["signals"]["grad_norm"]["bitwise_equal"] == 5


def test_tampered_checkpoint_is_refused_naming_the_file(fl: dict, tmp_path: Path) -> None:
    copy = tmp_path / "store"
    shutil.copytree(fl["store"] / fl["P"], copy / fl["P"])  # a copied run carries its checkpoints
    victim = copy / fl["P"] / "checkpoints" / "step_00000020" / "__1_0.distcp"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    before = _run_ids(copy)
    proc = k2("replay", fl["P"], "--from-step", "21", "--to-step", "30", "--store", str(copy), cwd=fl["root"])
    _refused(proc, "__1_0.distcp", "step_00000020")
    assert _run_ids(copy) == before  # nothing was launched


def test_changed_data_artefact_is_refused_naming_it(fl: dict) -> None:
    victim = fl["packed"] / "train.bin"
    original = victim.read_bytes()
    before = _run_ids(fl["store"])
    try:
        data = bytearray(original)
        data[100] ^= 0x01  # same size: only the sha256 can tell
        victim.write_bytes(bytes(data))
        proc = k2("replay", fl["P"], "--from-step", "11", "--to-step", "12", "--store", str(fl["store"]),
                  cwd=fl["root"])
    finally:
        victim.write_bytes(original)
    _refused(proc, "packed/train.bin", "changed")
    assert _run_ids(fl["store"]) == before


def test_unknown_run_is_refused(fl: dict) -> None:
    proc = k2("replay", "no-such-run", "--from-step", "1", "--to-step", "2", "--store", str(fl["store"]),
              cwd=fl["root"])
    _refused(proc, "no run 'no-such-run'")


def test_missing_starting_state_is_refused(fl: dict) -> None:
    """The replay run R resumed from P's checkpoint of step 10: it has no steps before 11, and
    once that checkpoint is gone nothing before step 11 leads to its steps. P itself falls back
    to the initial state, with a note."""
    from k2repro.audit.store import open_store
    from k2repro.tools.replay import plan_replay

    rid = _report(fl["R_proc"])["replay_run_id"]
    proc = k2("replay", rid, "--from-step", "5", "--to-step", "8", "--store", str(fl["store"]), cwd=fl["root"])
    _refused(proc, "recorded steps 11..30", fl["P"])
    ck = fl["store"] / fl["P"] / "checkpoints" / "step_00000010"
    hidden = ck.with_name(".hidden_step_10")
    ck.rename(hidden)
    try:
        proc = k2("replay", rid, "--from-step", "11", "--to-step", "12", "--store", str(fl["store"]), cwd=fl["root"])
        with open_store(fl["store"]) as s:
            plan = plan_replay(s, fl["P"], 11, 12)
    finally:
        hidden.rename(ck)
    _refused(proc, "no usable checkpoint", "before step 11")
    assert plan.start_step == 0 and plan.not_compared == list(range(1, 11))
    assert any("step 10" in n and "gone" in n for n in plan.notes)


def test_reshard_needs_permission_and_is_close_not_bitwise(fl: dict) -> None:
    from k2repro.audit.store import open_store
    from k2repro.errors import BadInputError
    from k2repro.tools.replay import compare_replay, plan_replay

    with open_store(fl["store"]) as s:
        with pytest.raises(BadInputError, match="--allow-reshard"):
            plan_replay(s, fl["P"], 11, 20, nproc=1)
        with pytest.raises(BadInputError, match="--tolerance"):
            plan_replay(s, fl["P"], 11, 20, nproc=1, allow_reshard=True)
    out = fl["one_rank"]
    proc = fl["RS_proc"]
    assert proc.returncode == 1, proc.stderr[-3000:]  # the reduction order changed
    rep = _report(proc)
    assert rep["bit_exact"] is False and rep["replay_world_size"] == 1
    assert rep["start_step"] == 10 and rep["rerun_not_compared"] == [11, 12] and rep["steps_compared"] == 8
    assert rep["first_divergence_step"] is not None and 13 <= rep["first_divergence_step"] <= 20
    assert rep["first_divergence_signal"] != "batch_hash"  # same data at any world size
    assert rep["signals"]["batch_hash"]["bitwise_equal"] == 8
    assert "NOT REPRODUCED" not in proc.stdout  # --json prints only the object
    with open_store(fl["store"]) as s, open_store(out) as o:
        plan = plan_replay(s, fl["P"], 13, 20, tolerance=1e-3, allow_reshard=True, nproc=1)
        close = compare_replay(s, plan, o, rep["replay_run_id"])
    assert close.within_tolerance and not close.bit_exact
    assert 0 < close.max_rel_diff < 1e-3
