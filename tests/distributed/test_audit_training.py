"""Issue 3's must-shows against real training runs: a 2-rank 50-step run fills every table
consistently, another process queries it live, crashes at every kill phase (and a SIGKILL of
the whole process group from outside) leave a consistent store that resumes, two runs write
into one store at once, and planted secrets reach no value of any table."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import k2repro
from k2repro.config.load import flatten, load_config, to_dict
from tests.conftest import REPO, k2, tiny_overrides

FULL = {"parallel.nproc": 2, "train.max_steps": 50, "audit.layer_stats_every": 1, "audit.flush_every": 10}


def _rid(out: str) -> str:
    m = re.search(r"run_id=(\S+)", out)
    assert m, out
    return m.group(1)


def _popen(args: list[str], cwd: Path = REPO, env: dict | None = None) -> subprocess.Popen:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "k2repro", *args], cwd=cwd, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.fixture(scope="module")
def full_run(packed_dir: Path, tmp_path_factory) -> dict:
    """One 2-rank, 50-step run with full statistics, queried live while it trains."""
    store = tmp_path_factory.mktemp("audit_full")
    args = ["train", *tiny_overrides(packed_dir, store, **FULL)]
    proc = _popen(args)
    seen, errors = [], []
    while proc.poll() is None:
        r = k2("sql", "SELECT coalesce(max(step), 0) AS m FROM steps", "--store", str(store), "--json")
        if r.returncode != 0:
            errors.append(r.stderr)
        else:
            seen.append(json.loads(r.stdout)[0]["m"])
        time.sleep(0.5)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    final = k2("sql", "SELECT max(step) AS m FROM steps", "--store", str(store), "--json")
    seen.append(json.loads(final.stdout)[0]["m"])
    return {"store": store, "run_id": _rid(out), "seen": seen, "errors": errors,
            "overrides": tiny_overrides(packed_dir, store, **FULL)}


def test_every_table_is_populated(full_run: dict) -> None:
    rid, store = full_run["run_id"], full_run["store"]
    with k2repro.open_store(store) as s:
        n = lambda q: int(s.sql(q, [rid]).iloc[0, 0])  # noqa: E731
        assert n("SELECT count(*) FROM steps WHERE run_id = ?") == 50
        assert n("SELECT count(DISTINCT step) FROM steps WHERE run_id = ?") == 50
        assert n("SELECT count(*) FROM sample_stats WHERE run_id = ?") == 50 * 8
        n_params = n("SELECT count(DISTINCT param) FROM layer_stats WHERE run_id = ?")
        assert n_params == 2 * 9 + 3  # 2 blocks of 9 tensors + embeddings, final norm, output
        assert n("SELECT count(*) FROM layer_stats WHERE run_id = ?") == 50 * n_params
        assert sorted(s.sql("SELECT DISTINCT rank FROM env WHERE run_id = ?", [rid])["rank"]) == [0, 1]
        env = s.env(rid, 0)
        assert env.get("determinism.use_deterministic_algorithms") == "True"
        assert n("SELECT count(*) FROM data_manifest WHERE run_id = ?") >= 2
        assert s.run(rid)["status"] == "completed" and int(s.run(rid)["world_size"]) == 2
        keys = set(s.sql("SELECT key FROM hparams WHERE run_id = ?", [rid])["key"])
    expected = set(flatten(to_dict(load_config(full_run["overrides"]))))
    assert expected <= keys, sorted(expected - keys)[:10]


def test_statistics_are_consistent(full_run: dict) -> None:
    rid = full_run["run_id"]
    with k2repro.open_store(full_run["store"]) as s:
        chk = s.sql("""
            SELECT st.step, st.loss, st.grad_norm,
                   sum(ss.loss * ss.n_tokens) / sum(ss.n_tokens) AS sample_loss,
                   min(ss.loss) AS lmin, max(ss.loss) AS lmax
            FROM steps st JOIN sample_stats ss USING (run_id, step)
            WHERE run_id = ? GROUP BY ALL ORDER BY step""", [rid])
        gn = s.sql("""SELECT step, sqrt(sum(grad_norm * grad_norm)) AS g FROM layer_stats
                      WHERE run_id = ? GROUP BY step ORDER BY step""", [rid])
        st = s.steps(rid)
        pos = s.sql("""SELECT step, list(batch_pos ORDER BY batch_pos) AS p, list(rank ORDER BY batch_pos) AS r
                       FROM sample_stats WHERE run_id = ? GROUP BY step""", [rid])
        ls = s.sql("SELECT param_norm, update_norm, update_ratio FROM layer_stats WHERE run_id = ?", [rid])
    # every sample has its place in the global batch, each rank its contiguous half
    assert all(list(p) == list(range(8)) for p in pos["p"]) and len(pos) == 50
    assert all(list(r) == [0] * 4 + [1] * 4 for r in pos["r"])
    np.testing.assert_allclose(ls["update_ratio"], ls["update_norm"] / ls["param_norm"], rtol=1e-12)
    assert (ls["update_norm"] > 0).all() and (ls["param_norm"] > 0).all()
    np.testing.assert_allclose(chk["loss"], chk["sample_loss"], rtol=1e-6)
    np.testing.assert_allclose(st["loss_min"], chk["lmin"], rtol=1e-6)
    np.testing.assert_allclose(st["loss_max"], chk["lmax"], rtol=1e-6)
    np.testing.assert_allclose(chk["grad_norm"], gn["g"], rtol=1e-6)
    assert (st["tokens"] == 8 * 32).all() and (st["logz_mean"] > st["loss"].min() * 0).all()


def test_live_queries_during_training(full_run: dict) -> None:
    seen = full_run["seen"]
    assert not full_run["errors"], full_run["errors"][:2]
    assert len(seen) >= 3
    assert all(b >= a for a, b in zip(seen, seen[1:])), seen
    assert seen[-1] == 50


def _check_crashed(store: Path, rid: str, flush_every: int, max_step: int) -> list[int]:
    with k2repro.open_store(store) as s:
        assert s.run(rid)["status"] == "crashed"
        steps = list(s.sql("SELECT step FROM steps WHERE run_id = ? ORDER BY step", [rid])["step"])
        dup = s.sql("SELECT step, count(*) c FROM steps WHERE run_id = ? GROUP BY step HAVING c > 1", [rid])
        samples = s.sql("SELECT rank, step, count(*) c FROM sample_stats WHERE run_id = ? "
                        "GROUP BY rank, step ORDER BY rank, step", [rid])
    assert dup.empty, "every flushed step exactly once"
    assert steps == list(range(1, len(steps) + 1)), "no gaps, no torn rows"
    assert len(steps) % flush_every == 0 and len(steps) <= max_step
    # sample_stats are written by the rank that computed them: a kill can land between two
    # ranks' flushes, so each rank holds whole flushes, the same number of samples every
    # step, from step 1 with no gap; steps every writer reached have all 8 samples
    per_rank = {}
    for r, g in samples.groupby("rank"):
        own = g["step"].tolist()
        assert own == list(range(1, len(own) + 1)) and len(own) % flush_every == 0, own
        assert g["c"].nunique() == 1, g
        per_rank[r] = len(own)
    if per_rank:
        common = samples[samples["step"] <= min(per_rank.values())].groupby("step")["c"].sum()
        assert (common == 8).all(), common
    return steps


@pytest.mark.parametrize("phase,step", [("step", 7), ("flush", 10), ("checkpoint", 15)])
def test_kill_phases_leave_a_consistent_store_and_resume(packed_dir: Path, tmp_path: Path, phase: str,
                                                         step: int) -> None:
    store = tmp_path / "s"
    extra = {"train.max_steps": 20, "audit.flush_every": 5, "ckpt.interval": 5,
             "faults.kill_step": step, "faults.kill_phase": phase}
    r = k2("train", *tiny_overrides(packed_dir, store, **extra))
    assert r.returncode != 0
    rid = _rid(r.stdout)
    steps = _check_crashed(store, rid, 5, step)
    ck = sorted((store / rid / "checkpoints").glob("step_*"))
    assert all((c / "manifest.json").exists() for c in ck), "checkpoints are whole or absent"
    assert not any(c.name.startswith("step_") and c.name.endswith(".tmp") for c in ck)
    resumed = k2("train", *tiny_overrides(packed_dir, store, **{**extra, "faults.kill_step": 0,
                                                                "train.resume": rid}))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    child = _rid(resumed.stdout)
    with k2repro.open_store(store) as s:
        row = s.run(child)
        assert row["parent_run_id"] == rid and row["status"] == "completed"
        assert int(row["resumed_from_step"]) <= max(steps[-1] if steps else 0, step)


def test_sigkill_of_the_process_group_from_outside(packed_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "s"
    proc = _popen(["train", *tiny_overrides(packed_dir, store, **{
        "parallel.nproc": 2, "train.max_steps": 400, "audit.flush_every": 5})])
    deadline = time.time() + 120
    rid = None
    while time.time() < deadline:
        hits = list(store.glob("*/steps/*.parquet")) if store.exists() else []
        if hits:
            rid = hits[0].parent.parent.name
            break
        time.sleep(0.2)
    assert rid, "the run started writing steps"
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(0.5)
    _check_crashed(store, rid, 5, 400)


def test_two_runs_into_one_store_at_once(packed_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "shared"
    procs = [_popen(["train", *tiny_overrides(packed_dir, store, **{"train.max_steps": 30, "train.seed": seed,
                                                                   "audit.flush_every": 5})])
             for seed in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1000:] for o in outs]
    ids = [_rid(o[0]) for o in outs]
    with k2repro.open_store(store) as s:
        for rid in ids:
            assert s.run(rid)["status"] == "completed"
            assert int(s.sql("SELECT count(*) FROM steps WHERE run_id = ?", [rid]).iloc[0, 0]) == 30
            assert int(s.sql("SELECT count(*) FROM sample_stats WHERE run_id = ?", [rid]).iloc[0, 0]) == 30 * 8


SECRET = "s3cr3t-VALUE-9f8e7d6c"


def test_planted_secrets_reach_no_table(packed_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "proj"
    shutil.copytree(REPO / "conf", work / "conf")
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@e", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@e")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "x"]):
        subprocess.run(cmd, cwd=work, check=True, env=env, capture_output=True)
    with open(work / "conf" / "run" / "default.yaml", "a") as f:  # the secret in an uncommitted diff
        f.write(f"# deploy with {SECRET}\n")
    store = tmp_path / "store"
    r = k2("train", *tiny_overrides(packed_dir, store, **{"train.max_steps": 5}), f"+run.tags.api_key={SECRET}",
           cwd=work, env={"AWS_SECRET_ACCESS_KEY": SECRET + "-aws", "HF_TOKEN": "hf_" + SECRET,
                          "WANDB_API_KEY": "wandb" + SECRET})
    assert r.returncode == 0, r.stderr[-2000:]
    rid = _rid(r.stdout)
    with k2repro.open_store(store) as s:
        diff = s.events(rid, "git_diff")
        assert len(diff) == 1 and "deploy with" in diff["detail"].iloc[0], "the diff itself is stored"
        keys = set(s.env(rid, 0))
        assert any("HF_TOKEN" in k for k in keys), "the variable is recorded, its value is not"
        for table in s.tables():
            cols = s.sql(f"DESCRIBE {table}")
            for col in cols[cols["column_type"].str.contains("VARCHAR|JSON")]["column_name"]:
                hits = s.sql(f'SELECT count(*) FROM {table} WHERE CAST("{col}" AS VARCHAR) LIKE ?',
                             [f"%{SECRET}%"]).iloc[0, 0]
                assert hits == 0, f"secret found in {table}.{col}"
    reports = tmp_path / "reports"
    for cmd in (["forensics", rid, "--out", str(reports)], ["report", rid, "--out", str(reports)]):
        r = k2(*cmd, "--store", str(store))
        assert r.returncode == 0, r.stderr[-2000:]
    files = [p for p in reports.rglob("*") if p.is_file()]
    assert files, "reports were written"
    for p in files:
        assert SECRET.encode() not in p.read_bytes(), f"secret in {p}"
