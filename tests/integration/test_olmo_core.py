"""The OLMo-core callback on real OLMo-core training runs: a tiny transformer, 2 gloo ranks under
torchrun, a token file built here, 20 steps (tests/integration/olmo_core_harness.py).

One module fixture launches four runs: A and B (identical seeds), C (the same, SIGKILLed while
held after step 13; its checkpoint of step 8 survives) and then D (OLMo-core's own resume of
C's save folder). The tests read the store against OLMo-core's own numbers and the batches it
fed (recorded by a test-only observer callback in the harness).

Without OLMo-core installed this module FAILS at collection with the install command: the
`dev` extra installs it (`make setup`), so a missing package is a broken setup, not a skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    import olmo_core  # noqa: F401
except ImportError:  # never a skip: the dev extra installs it
    pytest.fail("OLMo-core is not installed: .venv/bin/python -m pip install -e '.[olmo-core]' "
                "(or `make setup`, whose dev extra includes it)", pytrace=False)

from k2repro.audit.store import open_store
from k2repro.data.loader import batch_hash
from k2repro.integrations.olmo_core import VOLATILE
from tests.conftest import REPO, k2
from tests.integration.olmo_core_harness import token_file

pytestmark = pytest.mark.olmo_core

HARNESS = REPO / "tests" / "integration" / "olmo_core_harness.py"
STEPS = 20
LAYER_STEPS = [5, 10, 15, 20]
SKIPPED = 17  # TrainerConfig.steps_to_skip: OLMo-core consumes the batch but does not train on it
SAVE_EVERY = 8  # checkpoints at 8 and 16 and, at the end (post_train), 20
HOLD = 13  # the killed run is held (then SIGKILLed) after this step: its newest checkpoint is 8


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", LOGLEVEL="WARNING")


def _launch(work: Path, tokens: Path, store: Path, name: str, save: Path, rec: Path, *extra: str) -> subprocess.Popen:
    # own session: the test can kill torchrun's whole group (and then each worker's)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(HARNESS),
            "--work", str(work), "--tokens", str(tokens), "--store", str(store), "--name", name,
            "--save", str(save), "--record", str(rec), "--steps", str(STEPS), "--seed", "0",
            "--skip-step-adamw", "--skip-steps", str(SKIPPED), "--save-interval", str(SAVE_EVERY), *extra]
    log = open(work / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(args, cwd=work, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait(p: subprocess.Popen, work: Path, name: str, timeout: float = 240) -> None:
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    assert rc == 0, f"{name} exited {rc}:\n{(work / f'{name}.log').read_text()[-4000:]}"


def _kill_held(p: subprocess.Popen, work: Path, timeout: float = 240) -> None:
    """SIGKILL torchrun's group and each worker's: under torch 2.13 the workers run in their own
    sessions, so killing torchrun's group alone leaves them training."""
    t0 = time.monotonic()
    while not (work / "held").exists():
        assert p.poll() is None, f"the held run exited {p.returncode}:\n{(work / 'C.log').read_text()[-4000:]}"
        assert time.monotonic() - t0 < timeout, "the held run never reached its hold step"
        time.sleep(0.2)
    pids = [int((work / f"pid.r{r}").read_text()) for r in (0, 1)]
    for pid in pids:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    for pid in pids:  # gone before the store is read: `crashed` is decided from the pids
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)


def _rec(path: Path) -> dict:
    r0 = json.loads(Path(f"{path}.r0.json").read_text())
    r1 = json.loads(Path(f"{path}.r1.json").read_text())
    return {**r0, "consumed": {0: r0["consumed"], 1: r1["consumed"]}}


@pytest.fixture(scope="module")
def olmo(tmp_path_factory) -> dict:
    t0 = time.monotonic()
    work = tmp_path_factory.mktemp("olmo_core")
    store = work / "store"
    tokens = token_file(work / "tokens.npy")
    dirs = {k: work / k for k in "ABC"}
    for d in dirs.values():
        d.mkdir()
    procs = {k: _launch(dirs[k], tokens, store, k, dirs[k] / "ckpt", dirs[k] / "rec",
                        *(["--hold-at", str(HOLD)] if k == "C" else []))
             for k in "ABC"}
    _kill_held(procs["C"], dirs["C"])
    c_id = Path(f"{dirs['C'] / 'rec'}.runid").read_text()
    d_dir = work / "D"
    d_dir.mkdir()
    # OLMo-core's own resume: the same command on C's save folder (it loads the newest checkpoint)
    procs["D"] = _launch(d_dir, tokens, store, "C", dirs["C"] / "ckpt", d_dir / "rec")
    for k in "ABD":
        _wait(procs[k], d_dir if k == "D" else dirs[k], "C" if k == "D" else k)
    out = {"store": store, "work": work, "tokens": tokens, "C": c_id,
           **{k: _rec((d_dir if k == "D" else dirs[k]) / "rec") for k in "ABD"}}
    out["seconds"] = time.monotonic() - t0
    print(f"olmo_core runs: {out['seconds']:.1f} s")
    return out


def _steps(st, rid: str):  # noqa: ANN001
    return st.steps(rid).set_index("step")


def _vals(series) -> list:  # noqa: ANN001
    """NULL as None, so lists with a NULL compare equal (NaN != NaN)."""
    return [None if v != v else v for v in series.tolist()]


def test_every_table_the_callback_claims_is_filled(olmo) -> None:
    a = olmo["A"]
    rid = a["run_id"]
    with open_store(olmo["store"]) as st:
        run = st.run(rid)
        assert run["status"] == "completed" and run["source"] == "api:olmo_core" and run["world_size"] == 2
        hp = st.hparams(rid)
        assert hp["config.model.d_model"] == 64 and hp["config.seed"] == 0
        assert hp["olmo_core.data_loader.seed"] == 0 and hp["olmo_core.dataset.sequence_length"] == 32
        assert hp["olmo_core.dataset.fingerprint"] == a["fingerprint"]
        assert hp["olmo_core.train_module.n_params"] == a["n_params"] and hp["olmo_core.optim.type"] == "SkipStepAdamW"
        assert hp["audit.layer_stats_every"] == 5
        for r in (0, 1):
            env = st.env(rid, rank=r)
            assert env["olmo_core.version"] == "3.0.0" and env["audit.adapter"] == "olmo_core"
            assert env["torch.version"].startswith("2.13")
        dm = st.sql("SELECT * FROM data_manifest WHERE run_id = ?", [rid])
        assert len(dm) == 1 and dm["path"][0] == str(olmo["tokens"])
        assert dm["sha256"][0] == hashlib.sha256(olmo["tokens"].read_bytes()).hexdigest()
        assert dm["bytes"][0] == olmo["tokens"].stat().st_size and dm["n_tokens"][0] == dm["bytes"][0] // 2
        detail = json.loads(dm["detail"][0])
        assert detail["fingerprint"] == a["fingerprint"] and detail["seed"] == 0 and detail["layout"] == "fsl"
        steps = _steps(st, rid)
        assert steps.index.tolist() == list(range(1, STEPS + 1))
        assert (steps["tokens"] == 8 * 32).all() and (steps["lr"] == 3e-3).all()
        assert (steps["step_time_s"] > 0).all() and (steps["tokens_per_s"] > 0).all()
        # the trainer's steps_to_skip: no loss, skipped, an event; SkipStepAdamW's decisions elsewhere
        assert steps["skipped"].tolist() == [s == SKIPPED for s in range(1, STEPS + 1)]
        assert steps["loss"].isna().tolist() == [s == SKIPPED for s in range(1, STEPS + 1)]
        ev = st.events(rid, kind="step_skipped")
        assert ev["step"].tolist() == [SKIPPED, SKIPPED] and sorted(ev["rank"]) == [0, 1]
        assert json.loads(ev["detail"][0])["by"] == "trainer.steps_to_skip"
        for s in (1, 7, 20):  # batch_hash: the global batch's instance indices in order
            ids = [None] * 8
            for r in (0, 1):
                ids[r::2] = a["consumed"][r][str(s)]["index"]
            assert steps.loc[s, "batch_hash"] == batch_hash(ids)
        ls = st.layer_stats(rid)
        n_tensors = len(ls) // len(LAYER_STEPS)
        assert sorted(set(ls["step"])) == LAYER_STEPS and n_tensors > 10
        assert (ls.groupby("step")["numel"].sum() == a["n_params"]).all()  # FSDP shards counted once
        assert ls["update_norm"].notna().all() and (ls["update_norm"] > 0).mean() > 0.9
        assert (ls["grad_norm"] >= 0).all() and (ls["param_norm"] > 0).all()
        ss = st.sample_stats(rid)
        assert len(ss) == 8 * STEPS and ss["loss"].isna().all()
        s7 = ss[ss["step"] == 7].sort_values("batch_pos")
        assert s7["batch_pos"].tolist() == list(range(8)) and s7["rank"].tolist() == [0, 1] * 4
        ck = st.checkpoints(rid)
        # 20: OLMo-core's final save in post_train, after the last step (the run's last rows too)
        assert ck["step"].tolist() == [8, 16, 20] and (ck["bytes"] > 0).all()
        assert all(Path(p).is_dir() and Path(p).name == f"step{s}" for p, s in zip(ck["path"], ck["step"]))
        absent = st.events(rid, kind="audit_absent")
        assert [json.loads(d)["absent"] for d in absent["detail"]] == [["sample_stats"]]
        names = set(st.sql("SELECT DISTINCT name FROM metrics WHERE run_id = ?", [rid])["name"])
        assert {"train/Z loss", "throughput/device/TPS", "checkpoint/save_duration_s"} <= names


def test_steps_equal_olmo_cores_own_metrics(olmo) -> None:
    a = olmo["A"]
    m = {int(k): v for k, v in a["metrics"].items() if int(k) >= 1}  # step 0: set-up metrics
    assert sorted(m) == list(range(1, STEPS + 1))
    with open_store(olmo["store"]) as st:
        steps = _steps(st, a["run_id"])
        z = st.sql("SELECT step, value FROM metrics WHERE run_id = ? AND name = 'train/Z loss'", [a["run_id"]])
    trained = [s for s in range(1, STEPS + 1) if s != SKIPPED]
    assert "train/CE loss" not in m[SKIPPED]  # OLMo-core did not train on it
    assert steps.loc[trained, "loss"].tolist() == [m[s]["train/CE loss"] for s in trained]  # bit for bit
    assert steps.loc[trained, "grad_norm"].tolist() == [m[s]["optim/total grad norm"] for s in trained]
    assert [m[s]["optim/step skipped"] for s in trained] == [0.0] * len(trained)  # SkipStepAdamW's own call
    assert not steps.loc[trained, "skipped"].any()
    assert dict(zip(z["step"], z["value"])) == {s: m[s]["train/Z loss"] for s in trained}


_COMPARE = {
    "steps": "step, loss, grad_norm, lr, tokens, batch_hash, skipped",
    "layer_stats": "step, param, numel, grad_norm, param_norm, update_norm, update_ratio, grad_max_abs",
    "sample_stats": "step, rank, sample_id, batch_pos, n_tokens",
    "checkpoints": "step, bytes",
    "hparams": "key, value",
}


def _rows(st, table: str, rid: str) -> list:  # noqa: ANN001
    cols = _COMPARE[table]
    # paths of each run's own folders (not part of config_hash either)
    where = f" AND key NOT IN ({', '.join(repr(k) for k in VOLATILE)})" if table == "hparams" else ""
    return st.con.execute(f"SELECT {cols} FROM {table} WHERE run_id = ?{where} ORDER BY ALL", [rid]).fetchall()


def test_identical_seeds_give_identical_rows(olmo) -> None:
    a, b = olmo["A"]["run_id"], olmo["B"]["run_id"]
    assert a != b
    with open_store(olmo["store"]) as st:
        for table in _COMPARE:
            ra, rb = _rows(st, table, a), _rows(st, table, b)
            assert ra and ra == rb, table
        assert st.run(a)["config_hash"] == st.run(b)["config_hash"]


def test_sigkill_then_olmo_core_resume_is_a_crashed_run_and_a_linked_child(olmo) -> None:
    c, d, a = olmo["C"], olmo["D"]["run_id"], olmo["A"]["run_id"]
    with open_store(olmo["store"]) as st:
        assert st.run(c)["status"] == "crashed"
        sc, sa = _steps(st, c), _steps(st, a)
        # what the callback flushed at the checkpoint of step 8 survived the kill
        assert sc.index.tolist() == list(range(1, 9)) and st.checkpoints(c)["step"].tolist() == [8]
        assert _vals(sc["loss"]) == _vals(sa.loc[1:8, "loss"])
        child = st.run(d)
        assert child["status"] == "completed" and child["parent_run_id"] == c and child["resumed_from_step"] == 8
        ev = st.events(d, kind="resume")
        assert sorted(ev["rank"]) == [0, 1]  # every rank writes its own
        assert all(json.loads(x)["parent_run_id"] == c for x in ev["detail"])
        sd = _steps(st, d)
        assert sd.index.tolist() == list(range(9, STEPS + 1))
        # OLMo-core resumes bit-exactly, and the child's rows say so
        assert _vals(sd["loss"]) == _vals(sa.loc[9:, "loss"]) and _vals(sd["skipped"]) == _vals(sa.loc[9:, "skipped"])
        assert sd["batch_hash"].tolist() == sa.loc[9:, "batch_hash"].tolist()
        lin = st.con.execute("SELECT lineage_root, depth FROM lineage WHERE run_id = ?", [d]).fetchone()
        assert lin == (c, 1)
        stitched = st.con.execute("SELECT step, loss FROM lineage_steps WHERE lineage_root = ? ORDER BY step",
                                  [c]).fetchall()
        assert [s for s, _ in stitched] == list(range(1, STEPS + 1))
        assert [x for _, x in stitched] == _vals(sa["loss"])


def test_forensics_and_diff_run_on_it(olmo) -> None:
    s = str(olmo["store"])
    out = olmo["work"] / "reports"
    procs = [subprocess.Popen([sys.executable, "-m", "k2repro", "forensics", olmo["D"]["run_id"], "--store", s,
                               "--out", str(out), "--json", "--no-html"], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)]
    diff = k2("diff", olmo["A"]["run_id"], olmo["B"]["run_id"], "--store", s, "--json")
    diff_c = k2("diff", olmo["A"]["run_id"], olmo["C"], "--store", s, "--json")
    for p in procs:
        o, e = p.communicate(timeout=240)
        assert p.returncode == 0, e
        r = json.loads(o)
        assert isinstance(r["spikes"], list)
    assert diff.returncode == 0, diff.stderr
    d = json.loads(diff.stdout)
    assert d["first_loss_divergence_step"] is None and d["first_batch_divergence_step"] is None
    assert diff_c.returncode == 0, diff_c.stderr
    dc = json.loads(diff_c.stdout)
    assert dc["first_batch_divergence_step"] is None  # the killed run trained on the same data


@pytest.mark.parametrize("step", [1, 13])
def test_batch_returns_the_token_ids_the_trainer_consumed(olmo, step: int) -> None:
    a = olmo["A"]
    p = k2("batch", a["run_id"], "--step", str(step), "--store", str(olmo["store"]), "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    want_ids, want_tokens = [None] * 8, [None] * 8
    for rank in (0, 1):  # OLMo-core gives rank r the instances r, r + 2, ... of the global batch
        got = a["consumed"][rank][str(step)]
        want_ids[rank::2], want_tokens[rank::2] = got["index"], got["input_ids"]
    assert r["logged_ids"] == want_ids and r["data_matches_run"] is True
    assert [s["tokens"] for s in r["samples"]] == want_tokens
    assert [s["rank"] for s in r["samples"]] == [0, 1] * 4
    assert r["batch_hash"] == batch_hash(want_ids)


def test_k2repro_imports_without_olmo_core_and_the_adapter_names_the_install() -> None:
    code = ("import sys; sys.modules['olmo_core'] = None\n"
            "import k2repro, k2repro.audit, k2repro.integrations\n"
            "from k2repro.audit.api import start\n"
            "try:\n    import k2repro.integrations.olmo_core\n"
            "except ImportError as e:\n    print('ERR', e)\n")
    p = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "ERR" in p.stdout and "pip install 'k2repro[olmo-core]'" in p.stdout
