"""`tools.diff` on stores written by the real AuditSink: an imported run with only a loss curve
is compared where it can be and says what cannot; volatile facts are set aside; env facts are
grouped."""

from __future__ import annotations

from pathlib import Path

from k2repro.audit.sink import AuditSink
from k2repro.audit.store import open_store
from k2repro.tools.diff import diff_runs, env_diff, render_md, render_text


def _write(store: Path, run_id: str, source: str, hparams: dict, env: dict, steps: dict) -> None:
    sink = AuditSink(store, run_id)
    manifest = [{"artifact": "packed/train.bin", "path": "/x/train.bin", "sha256": "ab" * 32}] if hparams else []
    sink.start({"name": run_id, "source": source}, hparams, env, manifest)
    sink.log_steps(steps)
    sink.flush()
    sink.close()


def test_imported_run_compares_what_it_has(tmp_path: Path) -> None:
    losses = [3.0, 2.5, 2.25, 2.0]
    _write(tmp_path, "ours", "train", {"optim.lr": 0.003, "train.seed": 1},
           {"cpu.model": "X", "pkg.torch": "2.13", "pid": "1"},
           {"step": [1, 2, 3, 4], "loss": losses, "grad_norm": [1.0] * 4, "batch_hash": list("abcd")})
    _write(tmp_path, "theirs", "import:csv", {}, {},
           {"step": [2, 3, 4, 5], "loss": [2.5, 2.25, 2.1, 1.9]})
    with open_store(tmp_path) as s:
        d = diff_runs(s, "ours", s, "theirs")
    assert d["curves"]["steps_common"] == 3 and d["curves"]["only_in_a"] == 1 and d["curves"]["only_in_b"] == 1
    assert d["first_loss_divergence_step"] == 4
    assert d["first_batch_divergence_step"] is None and d["curves"]["batch_hash_compared"] == 0
    cannot = " | ".join(d["cannot_compare"])
    for what in ("batch_hash: run B (import:csv)", "grad_norm: run B (import:csv)",
                 "config (hyperparameters): run B", "environment: run B", "data manifest: run B"):
        assert what in cannot, cannot
    assert d["config"]["changed"] == {} and d["identical"] is False
    assert "cannot compare" in render_text(d) and "## cannot compare" in render_md(d)


def test_volatile_env_facts_are_set_aside_and_the_rest_grouped() -> None:
    a = {"pid": "1", "host": "a", "env.MASTER_PORT": "1234", "env.K2REPRO_EXIT_FILE": "/tmp/x",
         "cpu.model": "EPYC", "pkg.numpy": "2.0", "torch.version": "2.13", "git.commit": "c1", "env.OMP_NUM_THREADS": "1"}
    b = dict(a, pid="2", host="b", **{"env.MASTER_PORT": "999", "env.K2REPRO_EXIT_FILE": "/tmp/y"})
    assert all(v == {"added": {}, "removed": {}, "changed": {}} for v in env_diff(a, b).values())
    c = dict(a, **{"cpu.model": "Xeon", "pkg.numpy": "2.1", "torch.version": "2.14", "git.commit": "c2",
                   "env.OMP_NUM_THREADS": "4", "gpu.name": "H100"})
    d = env_diff(a, c)
    assert d["hardware"]["changed"] == {"cpu.model": ["EPYC", "Xeon"]}
    assert d["hardware"]["added"] == {"gpu.name": "H100"}
    assert d["packages"]["changed"] == {"pkg.numpy": ["2.0", "2.1"]}
    assert d["software"]["changed"] == {"torch.version": ["2.13", "2.14"]}
    assert d["code"]["changed"] == {"git.commit": ["c1", "c2"]}
    assert d["variables"]["changed"] == {"env.OMP_NUM_THREADS": ["1", "4"]}
