"""Issue 2's must-shows with real torchrun launches (gloo, 2 ranks): bit-identical reruns,
bit-exact resume after SIGKILL and after stop_at_step, 2 -> 1 rank resharding, corrupt
checkpoints refused, bad configs rejected before any worker starts.

One module-scoped fleet of short runs serves every test (a 2-rank launch costs ~9 s here).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import k2, tiny_overrides


def _run(packed: Path, store: Path, **extra: object) -> tuple[str, object]:
    r = k2("train", *tiny_overrides(packed, store, **{"parallel.nproc": 2, "ckpt.interval": 10,
                                                      "audit.flush_every": 5, **extra}))
    m = re.search(r"run_id=(\S+)", r.stdout)
    assert m, r.stdout + r.stderr
    return m.group(1), r


def bits(values) -> np.ndarray:  # noqa: ANN001
    return np.asarray(values, dtype=np.float64).view(np.int64)


@pytest.fixture(scope="module")
def fleet(packed_dir: Path, tmp_path_factory) -> dict:
    store = tmp_path_factory.mktemp("store2")
    out: dict = {"store": store}
    out["A"], ra = _run(packed_dir, store)
    assert ra.returncode == 0, ra.stderr[-2000:]
    out["K"], out["K_proc"] = _run(packed_dir, store, **{"faults.kill_step": 13})
    out["R"], rr = _run(packed_dir, store, **{"train.resume": out["K"]})
    assert rr.returncode == 0, rr.stderr[-2000:]
    # a name with a leading underscore (issue 19: the launcher's id was refused by the sink)
    out["S"], rs = _run(packed_dir, store, **{"train.stop_at_step": 10, "run.name": "_ablation"})
    assert rs.returncode == 0, rs.stderr[-2000:]
    out["S2"], rs2 = _run(packed_dir, store, **{"train.resume": out["S"]})
    assert rs2.returncode == 0, rs2.stderr[-2000:]
    return out


def _steps(store: Path, run_id: str):  # noqa: ANN202
    import k2repro

    with k2repro.open_store(store) as s:
        return s.steps(run_id).sort_values("step").reset_index(drop=True)


def test_a_run_name_with_a_leading_underscore_trains_and_resumes(fleet: dict) -> None:
    import k2repro

    assert fleet["S"].startswith("ablation-"), fleet["S"]
    with k2repro.open_store(fleet["store"]) as s:
        runs = s.sql("SELECT run_id, name, status, parent_run_id FROM runs").set_index("run_id")
    assert runs.loc[fleet["S"], "name"] == "_ablation"
    assert runs.loc[fleet["S"], "status"] == "completed"
    assert runs.loc[fleet["S2"], "parent_run_id"] == fleet["S"]


def test_same_seed_runs_are_bit_identical(fleet: dict) -> None:
    a = _steps(fleet["store"], fleet["A"])
    s = _steps(fleet["store"], fleet["S"])
    assert list(a["step"]) == list(range(1, 21))
    assert list(s["step"]) == list(range(1, 11))
    assert np.array_equal(bits(a["loss"][:10]), bits(s["loss"]))
    assert np.array_equal(bits(a["grad_norm"][:10]), bits(s["grad_norm"]))
    assert list(a["batch_hash"][:10]) == list(s["batch_hash"])


def test_resume_after_sigkill_is_bit_exact(fleet: dict) -> None:
    assert fleet["K_proc"].returncode != 0, "the run must have been killed"
    k = _steps(fleet["store"], fleet["K"])
    assert k["step"].max() < 13, "steps after the kill cannot have been recorded"
    a = _steps(fleet["store"], fleet["A"])
    r = _steps(fleet["store"], fleet["R"])
    assert list(r["step"]) == list(range(11, 21))
    assert np.array_equal(bits(a["loss"][10:]), bits(r["loss"]))
    assert np.array_equal(bits(a["grad_norm"][10:]), bits(r["grad_norm"]))
    import k2repro

    with k2repro.open_store(fleet["store"]) as s:
        row = s.run(fleet["R"])
        assert row["parent_run_id"] == fleet["K"] and int(row["resumed_from_step"]) == 10
        assert s.run(fleet["K"])["status"] == "crashed"


def test_stop_at_step_then_resume_is_bit_exact(fleet: dict) -> None:
    a = _steps(fleet["store"], fleet["A"])
    r = _steps(fleet["store"], fleet["S2"])
    assert list(r["step"]) == list(range(11, 21))
    assert np.array_equal(bits(a["loss"][10:]), bits(r["loss"]))


def _ckpt(fleet: dict, run: str, step: int) -> Path:
    return fleet["store"] / run / "checkpoints" / f"step_{step:08d}"


def test_two_rank_checkpoint_resumes_at_one_rank(fleet: dict, packed_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "s1"
    r = k2("train", *tiny_overrides(packed_dir, store, **{
        "parallel.nproc": 1, "train.resume": str(_ckpt(fleet, fleet["A"], 10))}))
    assert r.returncode == 0, r.stderr[-2000:]
    rid = re.search(r"run_id=(\S+)", r.stdout).group(1)
    one = _steps(store, rid)
    a = _steps(fleet["store"], fleet["A"])
    assert list(one["step"]) == list(range(11, 21))
    # Same math, different reduction order: close, not bitwise (docs/reproducibility.md).
    np.testing.assert_allclose(one["loss"], a["loss"][10:], rtol=1e-4)


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_corrupt_checkpoint_is_refused_naming_the_file(fleet: dict, packed_dir: Path, tmp_path: Path,
                                                        damage: str) -> None:
    bad = tmp_path / "step_00000010"
    shutil.copytree(_ckpt(fleet, fleet["A"], 10), bad)
    victim = bad / ("__1_0.distcp" if damage == "flip" else "rank1.pt")
    if damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    else:
        victim.unlink()
    store = tmp_path / "s"
    r = k2("train", *tiny_overrides(packed_dir, store, **{"parallel.nproc": 1, "train.resume": str(bad)}))
    assert r.returncode == 2, r.stderr[-2000:]
    assert victim.name in r.stderr
    assert "Traceback" not in r.stderr
    v = k2("verify-checkpoint", str(bad))
    assert v.returncode == 1 and victim.name in v.stderr
    ok = k2("verify-checkpoint", str(_ckpt(fleet, fleet["A"], 10)), "--json")
    assert ok.returncode == 0 and '"ok": true' in ok.stdout


def test_bad_config_exits_2_before_any_worker(tmp_path: Path) -> None:
    store = tmp_path / "never"
    r = k2("train", "parallel.nproc=2", "optim.lr=-1", f"audit.store={store}")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "optim.lr" in lines[0], r.stderr
    assert "torch.distributed" not in r.stderr and not store.exists()


def test_changed_training_data_is_refused(packed_dir: Path, tmp_path: Path) -> None:
    """The trainer re-hashes the packed data before step 1: the recorded sha256 is what it trains on."""
    bad = tmp_path / "packed"
    shutil.copytree(packed_dir, bad)
    data = bytearray((bad / "train.bin").read_bytes())
    data[100] ^= 0x01
    (bad / "train.bin").write_bytes(bytes(data))
    r = k2("train", *tiny_overrides(bad, tmp_path / "s", **{"train.max_steps": 2}))
    assert r.returncode == 2 and "train.bin" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def _signalled(packed: Path, store: Path, sig: int, **extra: object) -> tuple[int, str, str]:
    """`k2repro train` in its own session (a terminal's foreground group), sent `sig` as a
    terminal's Ctrl-C is, to the whole group, once rank 0 says it is building the model."""
    import os
    import signal as _signal  # noqa: F401
    import subprocess
    import sys
    import threading

    cmd = [sys.executable, "-m", "k2repro", "train", *tiny_overrides(packed, store, **{
        "parallel.nproc": 2, "ckpt.interval": 10, "audit.flush_every": 5, **extra})]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    err: list[str] = []

    def read_err() -> None:
        for line in p.stderr:
            err.append(line)
            if "building model" in line:
                os.killpg(p.pid, sig)

    t = threading.Thread(target=read_err)
    t.start()
    out = p.stdout.read()
    p.wait(timeout=120)
    t.join()
    return p.returncode, out, "".join(err)


@pytest.fixture(scope="module")
def interrupted(fleet: dict, packed_dir: Path) -> dict:
    import signal

    store = fleet["store"]
    code, out, err = _signalled(packed_dir, store, signal.SIGINT)
    rid = re.search(r"run_id=(\S+)", out).group(1)
    # the resume writes no periodic checkpoints: its last step's comes from ckpt.final's default
    r = k2("train", *tiny_overrides(packed_dir, store, **{"parallel.nproc": 2, "audit.flush_every": 5,
                                                          "train.resume": rid}))
    assert r.returncode == 0, r.stderr[-2000:]
    return {"code": code, "out": out, "err": err, "I": rid, "R": re.search(r"run_id=(\S+)", r.stdout).group(1)}


def test_ctrl_c_stops_cleanly_and_resume_is_bit_exact(fleet: dict, interrupted: dict) -> None:
    """Issue 23 item 2: Ctrl-C (SIGINT to the process group) -> ranks agree on a stop step,
    flush, checkpoint, status `interrupted`, one line, exit 130; the resume continues bit-exactly."""
    import k2repro

    assert interrupted["code"] == 130, interrupted["err"][-3000:]
    err = interrupted["err"]
    assert "Traceback" not in err and "SignalException" not in err and "death signal" not in err, err
    said = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert len(said) == 1 and "SIGINT" in said[0] and f"train.resume={interrupted['I']}" in said[0], err
    i = _steps(fleet["store"], interrupted["I"])
    stop = int(i["step"].max())
    assert 1 <= stop < 20 and list(i["step"]) == list(range(1, stop + 1))
    assert _ckpt(fleet, interrupted["I"], stop).joinpath("manifest.json").exists()
    with k2repro.open_store(fleet["store"]) as s:
        assert s.run(interrupted["I"])["status"] == "interrupted"
        assert s.run(interrupted["R"])["status"] == "completed"
        assert int(s.run(interrupted["R"])["resumed_from_step"]) == stop
    a = _steps(fleet["store"], fleet["A"])
    r = _steps(fleet["store"], interrupted["R"])
    assert list(r["step"]) == list(range(stop + 1, 21))
    assert np.array_equal(bits(a["loss"][stop:]), bits(r["loss"]))
    assert np.array_equal(bits(a["grad_norm"][stop:]), bits(r["grad_norm"]))


def test_final_checkpoint_by_default(fleet: dict, interrupted: dict) -> None:
    """Issue 23 item 2: ckpt.interval=0 (the default) still leaves the last step's checkpoint."""
    ck = sorted(p.name for p in (fleet["store"] / interrupted["R"] / "checkpoints").glob("step_*"))
    assert ck == ["step_00000020"]


def test_training_shows_its_phases(interrupted: dict) -> None:
    """Issue 23 item 13: the ~10 s before the first step are named, phase by phase (plain lines
    off a terminal), then the steps."""
    err = interrupted["err"]
    for phase in ("launching 2 ranks", "loading data", "building model", "training steps 1..20"):
        assert f"k2repro train: {phase}" in err, err
    assert err.index("launching") < err.index("loading data") < err.index("building model")


def test_sigterm_stops_cleanly_with_143(packed_dir: Path, tmp_path: Path) -> None:
    """Issue 23 item 2: SIGTERM (a preemption) -> status interrupted, a checkpoint, exit 143."""
    import signal

    import k2repro

    store = tmp_path / "s"
    code, out, err = _signalled(packed_dir, store, signal.SIGTERM, **{"parallel.nproc": 1})
    assert code == 143, err[-3000:]
    assert "Traceback" not in err and sum("interrupted by SIGTERM" in ln for ln in err.splitlines()) == 1
    rid = re.search(r"run_id=(\S+)", out).group(1)
    with k2repro.open_store(store) as s:
        assert s.run(rid)["status"] == "interrupted"
        last = int(s.steps(rid)["step"].max())
    assert (store / rid / "checkpoints" / f"step_{last:08d}" / "manifest.json").exists()


def test_resuming_a_finished_run_is_refused(fleet: dict, packed_dir: Path, tmp_path: Path) -> None:
    """Its final checkpoint is at max_steps: say there is nothing to train (exit 2, no run
    recorded), rather than record an empty run (the fresh-clone trial of issue 23)."""
    store = tmp_path / "s"
    r = k2("train", *tiny_overrides(packed_dir, store, **{"parallel.nproc": 2,
                                                          "train.resume": str(_ckpt(fleet, fleet["A"], 20))}))
    assert r.returncode == 2, r.stderr[-2000:]
    # one line from rank 0, not torchrun's failure table and traceback (ChildFailedError)
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and "nothing to train" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr
    assert "run_id=" not in r.stdout
