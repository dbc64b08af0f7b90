"""Other training loops audited through k2repro.audit.start, end to end in real processes: the
plain-PyTorch example, a tiny Transformers Trainer run and a tiny Lightning run each fill runs,
hparams, env, steps, layer_stats and checkpoints; a resumed run names its parent; an exception
marks the run failed; `k2repro diff` compares the example with a k2repro run; `k2repro forensics`
runs on each; a SIGKILL loses only what was not flushed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning  # noqa: E402,F401
import numpy as np
import pytest
import transformers  # noqa: E402,F401  (the dev extra installs it: no silent skip)

from k2repro.audit.api import ABSENT_EVENT
from k2repro.audit.store import open_store
from tests.conftest import REPO, tiny_overrides

HF_SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
    from k2repro.integrations.hf import K2ReproCallback

    store, work = sys.argv[1], Path(sys.argv[2])
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": x, "labels": x} for x in torch.randint(0, 64, (64, 16), generator=g)]

    def args(steps):
        return TrainingArguments(output_dir=str(work / "hf"), max_steps=steps, per_device_train_batch_size=4,
                                 logging_steps=1, save_steps=5, report_to=[], use_cpu=True, disable_tqdm=True,
                                 learning_rate=1e-3, dataloader_num_workers=0, seed=0,
                                 include_num_input_tokens_seen="all")

    class Boom(Trainer):
        def compute_loss(self, model, inputs, **kw):
            if self.state.global_step == 3:
                raise RuntimeError("boom at step 4")
            return super().compute_loss(model, inputs, **kw)

    out = {}
    torch.manual_seed(0)
    cb = K2ReproCallback(store, name="hf-tiny", layer_stats_every=2)
    with cb:
        tr = Trainer(model=LlamaForCausalLM(cfg), args=args(10), train_dataset=data, callbacks=[cb])
        tr.train()
    out["main"] = cb.run_id
    out["main_run"] = None if cb.run is None else cb.run.run_id  # the run stays on the callback
    out["hf_losses"] = [h["loss"] for h in tr.state.log_history if "loss" in h]
    out["n_params"] = sum(1 for p in tr.model.parameters() if p.requires_grad)
    cb = K2ReproCallback(store, name="hf-tiny-resumed")
    with cb:
        Trainer(model=LlamaForCausalLM(cfg), args=args(12), train_dataset=data,
                callbacks=[cb]).train(resume_from_checkpoint=str(work / "hf" / "checkpoint-10"))
    out["resumed"] = cb.run_id
    cb = K2ReproCallback(store, name="hf-boom")
    try:
        with cb:
            Boom(model=LlamaForCausalLM(cfg), args=args(10), train_dataset=data, callbacks=[cb]).train()
    except RuntimeError:
        pass
    out["failed"] = cb.run_id
    print("RESULT " + json.dumps(out))
''')

PL_SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from k2repro.integrations.lightning import K2ReproCallback

    store, work = sys.argv[1], Path(sys.argv[2])

    class Tiny(L.LightningModule):
        def __init__(self, vocab=64, d=16, lr=1e-2, boom_at=-1):
            super().__init__()
            self.save_hyperparameters()
            self.emb = torch.nn.Embedding(vocab, d)
            self.out = torch.nn.Linear(d, vocab)
            self.seen = []

        def training_step(self, batch, i):
            if self.global_step == self.hparams.boom_at:
                raise RuntimeError("boom in training_step")
            x = batch[0]
            logits = self.out(self.emb(x[:, :-1]))
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
            self.seen.append(float(loss))
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    ds = torch.utils.data.TensorDataset(torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0)))
    dl = lambda: torch.utils.data.DataLoader(ds, batch_size=4)

    def fit(module, steps, name, ckpt_path=None):
        cb = K2ReproCallback(store, name=name)
        ck = ModelCheckpoint(dirpath=str(work / "pl"), every_n_train_steps=5, save_top_k=-1)
        tr = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, callbacks=[cb, ck],
                       enable_progress_bar=False, enable_model_summary=False)
        try:
            tr.fit(module, dl(), ckpt_path=ckpt_path)
        except RuntimeError:
            pass
        assert cb.run is not None and cb.run.run_id == cb.run_id, "cb.run after fit"
        return cb.run_id

    torch.manual_seed(0)
    m = Tiny()
    out = {"main": fit(m, 10, "pl-tiny"), "pl_losses": m.seen}
    out["n_params"] = sum(1 for p in m.parameters() if p.requires_grad)
    out["resumed"] = fit(Tiny(), 12, "pl-tiny-resumed", ckpt_path=str(work / "pl" / "epoch=0-step=10.ckpt"))
    out["failed"] = fit(Tiny(boom_at=2), 10, "pl-boom")
    print("RESULT " + json.dumps(out))
''')

KILL_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    import torch
    import k2repro.audit

    run = k2repro.audit.start(sys.argv[1], name="killed", config={"a": 1}, flush_every=5)
    print(run.run_id, flush=True)
    for s in range(1, 13):
        run.log_step(s, loss=torch.tensor(1.0 / s))
        if s == 10:
            run.flush(wait=True)
    os.kill(os.getpid(), signal.SIGKILL)
''')


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _spawn(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen, what: str, ok: tuple[int, ...] = (0,)) -> str:
    out, err = p.communicate(timeout=300)
    assert p.returncode in ok, f"{what} exited {p.returncode}:\n{err[-3000:]}"
    return out


def _result(out: str) -> dict:
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, packed_dir) -> dict:
    """Every training process at once (the machine has few cores, but most of the time is
    imports): the example, Transformers, Lightning, a k2repro run and a killed loop."""
    work = tmp_path_factory.mktemp("audit_api")
    store = work / "store"
    (work / "hf.py").write_text(HF_SCRIPT)
    (work / "pl.py").write_text(PL_SCRIPT)
    (work / "kill.py").write_text(KILL_SCRIPT)
    py = sys.executable
    procs = {
        # from the repository: the run records its git commit and diff
        "plain": _spawn([py, str(REPO / "examples" / "plain_pytorch.py"), str(store), "--steps", "40"], REPO),
        "hf": _spawn([py, str(work / "hf.py"), str(store), str(work)], work),
        "pl": _spawn([py, str(work / "pl.py"), str(store), str(work)], work),
        "k2": _spawn([py, "-m", "k2repro", "train",
                      *tiny_overrides(packed_dir, store, **{"train.max_steps": 6, "run.name": "k2-tiny"})], work),
        "kill": _spawn([py, str(work / "kill.py"), str(store / "killed")], work),
    }
    out = {k: _finish(p, k, ok=(-9,) if k == "kill" else (0,)) for k, p in procs.items()}
    return {
        "store": store, "work": work,
        "plain": out["plain"].split("run_id=")[1].split()[0],
        "k2": out["k2"].split("run_id=")[1].split()[0],
        "hf": _result(out["hf"]), "pl": _result(out["pl"]),
        "killed": out["kill"].split()[0],
    }


def _k2(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "k2repro", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=300)


def _absent(st, rid: str) -> set[str]:
    out: set[str] = set()
    for d in st.events(rid, kind=ABSENT_EVENT)["detail"]:
        out |= set(json.loads(d)["absent"])
    return out


def _check_filled(st, rid: str, source: str, n_steps: int, layer_steps: list[int], n_params: int,
                  ckpt_steps: list[int]) -> None:
    run = st.run(rid)
    assert run["status"] == "completed" and run["source"] == source and run["world_size"] == 1
    assert len(run["config_hash"]) == 16 and run["k2repro_version"]
    env = st.env(rid)
    assert env["torch.version"].startswith("2.13") and env["launcher"] == "python"
    steps = st.steps(rid)
    assert steps["step"].tolist() == list(range(1, n_steps + 1))
    assert np.isfinite(steps["loss"]).all() and (steps["grad_norm"] > 0).all() and (steps["lr"] > 0).all()
    ls = st.layer_stats(rid)
    assert sorted(set(ls["step"])) == layer_steps
    assert len(ls) == len(layer_steps) * n_params
    assert (ls["grad_norm"] >= 0).all() and (ls["param_norm"] > 0).any()
    assert ls["update_norm"].notna().all() and (ls["update_norm"] > 0).mean() > 0.9
    ck = st.checkpoints(rid)
    assert ck["step"].tolist() == ckpt_steps and (ck["bytes"] > 0).all()
    assert all(Path(p).exists() for p in ck["path"])


def test_plain_example_fills_every_table(runs) -> None:
    with open_store(runs["store"]) as st:
        rid = runs["plain"]
        _check_filled(st, rid, "api", 40, list(range(1, 41)), 3, [10, 20, 30, 40])
        assert st.hparams(rid) == {"seed": 0, "vocab": 64, "d_model": 32, "seq_len": 16, "batch": 8, "lr": 3e-3,
                                   "steps": 40}
        steps = st.steps(rid)
        assert steps["tokens"].tolist() == [128] * 40 and steps["batch_hash"].str.len().eq(16).all()
        assert (steps["loss_max"] >= steps["loss"]).all() and (steps["loss_min"] <= steps["loss"]).all()
        ss = st.sample_stats(rid)
        assert len(ss) == 40 * 8 and set(ss["n_tokens"]) == {16}
        assert _absent(st, rid) == {"data_manifest"}
        assert len(st.run(rid)["git_commit"]) == 40 and len(st.events(rid, kind="git_diff")) == 1


def test_transformers_trainer_run(runs) -> None:
    r = runs["hf"]
    with open_store(runs["store"]) as st:
        rid = r["main"]
        _check_filled(st, rid, "api:transformers", 10, [2, 4, 6, 8, 10], r["n_params"], [5, 10])
        assert r["main_run"] == rid  # cb.run is the run after training, not None (issue 23 item 15)
        assert st.steps(rid)["loss"].tolist() == r["hf_losses"]  # the Trainer's own numbers, exactly
        hp = st.hparams(rid)
        assert hp["trainer.max_steps"] == 10 and hp["trainer.learning_rate"] == 1e-3
        assert hp["model.hidden_size"] == 16 and hp["model.model_type"] == "llama"
        assert hp["audit.adapter"] == "transformers" and hp["audit.layer_stats_every"] == 2
        assert st.env(rid)["audit.adapter"] == "transformers"
        assert {"sample_stats", "steps.batch_hash", "data_manifest"} <= _absent(st, rid)
        assert "layer_stats" not in _absent(st, rid)
        resumed = st.run(r["resumed"])
        assert resumed["parent_run_id"] == rid and resumed["resumed_from_step"] == 10
        assert st.steps(r["resumed"])["step"].tolist() == [11, 12]
        assert st.run(r["resumed"])["config_hash"] != st.run(rid)["config_hash"]  # max_steps differs
        failed = st.run(r["failed"])
        assert failed["status"] == "failed" and "boom at step 4" in failed["error"]
        assert "Traceback" in failed["error"]
        assert st.steps(r["failed"])["step"].tolist() == [1, 2, 3]


def test_lightning_run(runs) -> None:
    r = runs["pl"]
    with open_store(runs["store"]) as st:
        rid = r["main"]
        _check_filled(st, rid, "api:lightning", 10, list(range(1, 11)), r["n_params"], [5, 10])
        assert st.steps(rid)["loss"].tolist() == r["pl_losses"]
        assert st.steps(rid)["tokens"].tolist() == [64] * 10
        hp = st.hparams(rid)
        assert hp["module.lr"] == 1e-2 and hp["trainer.max_steps"] == 10 and hp["optimizer.0.type"] == "AdamW"
        assert {"sample_stats", "steps.batch_hash"} <= _absent(st, rid)
        resumed = st.run(r["resumed"])
        assert resumed["parent_run_id"] == rid and resumed["resumed_from_step"] == 10
        assert st.steps(r["resumed"])["step"].tolist() == [11, 12]
        failed = st.run(r["failed"])
        assert failed["status"] == "failed" and "boom in training_step" in failed["error"]
        assert st.steps(r["failed"])["step"].tolist() == [1, 2]


def test_diff_compares_the_example_with_a_k2repro_run(runs) -> None:
    p = _k2("diff", runs["plain"], runs["k2"], "--store", str(runs["store"]), "--json", cwd=runs["work"])
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert "lr" in d["config"]["removed"] and "optim.lr" in d["config"]["added"]
    changed_env = {k for group in d["env"].values() for k in group.get("changed", {})}
    assert "torch.version" not in changed_env and "python" not in changed_env
    assert d["first_loss_divergence_step"] == 1 and d["first_batch_divergence_step"] == 1


def test_forensics_runs_on_each(runs) -> None:
    out = runs["work"] / "reports"
    procs = {k: _spawn([sys.executable, "-m", "k2repro", "forensics", rid, "--store", str(runs["store"]),
                        "--out", str(out), "--json", "--no-html"], runs["work"])
             for k, rid in (("plain", runs["plain"]), ("hf", runs["hf"]["main"]), ("pl", runs["pl"]["main"]))}
    res = {k: json.loads(_finish(p, f"forensics {k}")) for k, p in procs.items()}
    for k, o in res.items():
        assert isinstance(o["spikes"], list), k
    assert not any("sample_stats" in x or "layer_stats" in x for x in res["plain"]["impossible"])
    for k in ("hf", "pl"):
        assert any("sample_stats" in x for x in res[k]["impossible"]), res[k]["impossible"]


def test_sigkill_keeps_what_was_flushed(runs) -> None:
    with open_store(runs["store"] / "killed") as st:
        rid = runs["killed"]
        assert st.run(rid)["status"] == "crashed"
        assert st.steps(rid)["step"].tolist() == list(range(1, 11))
