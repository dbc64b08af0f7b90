"""k2repro.audit.start in-process: config forms, exact values from tensors without host syncs,
layer statistics against an independent computation, absent tables, failure, live reads."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import k2repro.audit
from k2repro.audit.api import ABSENT_EVENT, config_dict
from k2repro.audit.redact import REDACTED
from k2repro.audit.store import open_store
from k2repro.data.loader import batch_hash


def _absent(st, rid: str) -> set[str]:
    out: set[str] = set()
    for d in st.events(rid, kind=ABSENT_EVENT)["detail"]:
        out |= set(json.loads(d)["absent"])
    return out


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _backward(model: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    losses.mean().backward()
    return losses.detach()


def test_import_stays_light() -> None:
    code = ("import sys, k2repro, k2repro.audit, k2repro.audit.api, k2repro.cli.main; f = k2repro.audit.start; "
            "print(sorted(m for m in ('torch', 'transformers', 'lightning', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@dataclasses.dataclass
class _Optim:
    lr: float = 3e-4
    betas: tuple = (0.9, 0.95)


@dataclasses.dataclass
class _Cfg:
    optim: _Optim = dataclasses.field(default_factory=_Optim)
    name: str = "x"
    api_key: str = "sk-abcdef123456"


def test_config_forms_flatten_alike(tmp_path) -> None:
    from omegaconf import OmegaConf

    nested = {"optim": {"lr": 3e-4, "betas": [0.9, 0.95]}, "name": "x", "api_key": "sk-abcdef123456"}
    forms = [nested, _Cfg(), OmegaConf.create(nested),
             argparse.Namespace(optim=argparse.Namespace(lr=3e-4, betas=(0.9, 0.95)), name="x",
                                api_key="sk-abcdef123456")]
    for f in forms:
        assert config_dict(f) == nested
    ids = []
    for i, f in enumerate(forms):
        with k2repro.audit.start(tmp_path, config=f, name=f"cfg{i}") as run:
            ids.append(run.run_id)
    with open_store(tmp_path) as st:
        hps = [st.hparams(r) for r in ids]
        hashes = {st.run(r)["config_hash"] for r in ids}
        assert hps[0] == {"optim.lr": 3e-4, "optim.betas": [0.9, 0.95], "name": "x", "api_key": REDACTED}
        assert all(h == hps[0] for h in hps) and len(hashes) == 1
        assert "sk-abcdef123456" not in st.run(ids[0])["config_json"]
        assert st.run(ids[0])["source"] == "api" and st.env(ids[0])["audit.api"] == "k2repro.audit.start"


def test_log_step_keeps_tensors_on_device_and_stores_exact_values(tmp_path) -> None:
    from torch.overrides import TorchFunctionMode

    syncs: list[str] = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", str(func))
            if name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__"):
                syncs.append(name)
            return func(*args, **(kwargs or {}))

    vals = torch.tensor([2.718281828, 1.1, 0.3333333], dtype=torch.float32)
    bf = torch.tensor(1.2345, dtype=torch.bfloat16)
    ids = torch.tensor([5, 3, 9, 1])
    with k2repro.audit.start(tmp_path, config={}, name="exact", flush_every=100) as run:
        with Watch():
            for s in (1, 2, 3):
                run.log_step(s, loss=vals[s - 1], lr=1e-3, grad_norm=bf, tokens=torch.tensor(64), batch_ids=ids + s,
                             loss_max=vals[s - 1] * 2, my_metric=vals[s - 1] + 1)
        assert syncs == []
        rid = run.run_id
    with open_store(tmp_path) as st:
        df = st.steps(rid)
        assert df["loss"].tolist() == [float(v) for v in vals]  # the fp32 numbers, bit for bit
        assert df["grad_norm"].tolist() == [float(bf)] * 3
        assert df["loss_max"].tolist() == [float(v * 2) for v in vals]
        assert df["tokens"].tolist() == [64] * 3 and df["lr"].tolist() == [1e-3] * 3
        assert df["batch_hash"].tolist() == [batch_hash((ids + s).tolist()) for s in (1, 2, 3)]
        assert (df["tokens_per_s"] == 64 / df["step_time_s"]).all()
        m = st.sql("SELECT step, name, value FROM metrics WHERE run_id = ? ORDER BY step", [rid])
        assert m["name"].tolist() == ["my_metric"] * 3 and m["value"].tolist() == [float(v + 1) for v in vals]


def test_log_step_rejects_bad_values(tmp_path) -> None:
    with k2repro.audit.start(tmp_path, name="bad") as run:
        with pytest.raises(ValueError, match="scalar"):
            run.log_step(1, loss=torch.ones(2))
        with pytest.raises(ValueError, match="integer"):
            run.log_step(1.5, loss=1.0)
        with pytest.raises(ValueError, match="log_event"):
            run.log_step(1, loss=1.0, note="text")
        with pytest.raises(ValueError, match="2 sample_ids but 3 losses"):
            run.log_samples(1, [1, 2], [0.1, 0.2, 0.3])


def _reference(model, opt, step):
    """Independent per-parameter numbers: grads, norms before and after one AdamW step."""
    params = [p for p in model.parameters()]
    grads = [p.grad.detach().clone() for p in params]
    before = [p.detach().clone() for p in params]
    opt.step()
    return {
        "grad_norm": [float(g.float().norm()) for g in grads],
        "grad_max_abs": [float(g.abs().max()) for g in grads],
        "param_norm": [float(b.norm()) for b in before],
        "update_norm": [float((p.detach() - b).norm()) for p, b in zip(params, before)],
    }


@pytest.mark.parametrize("mode", ["optimizer", "before", "none"])
def test_layer_stats_match_an_independent_computation(tmp_path, mode) -> None:
    model = _model()
    ref_model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=0.05)
    names = [n for n, _ in model.named_parameters()]
    refs = []
    with k2repro.audit.start(tmp_path, name=f"layers-{mode}") as run:
        for step in (1, 2, 3):
            _backward(model, step)
            _backward(ref_model, step)
            refs.append(_reference(ref_model, ref_opt, step))
            if mode == "optimizer":
                run.log_layer_stats(step, model, opt)
                opt.step()
            elif mode == "before":
                prev = {n: p.detach().clone() for n, p in model.named_parameters()}
                opt.step()
                run.log_layer_stats(step, model, before=prev)
            else:
                run.log_layer_stats(step, model)
                opt.step()
            opt.zero_grad()
            ref_opt.zero_grad()
            run.log_step(step, loss=1.0)
        rid = run.run_id
    with open_store(tmp_path) as st:
        ls = st.layer_stats(rid).sort_values(["step", "param"])
        assert len(ls) == 3 * len(names)
        for step, ref in zip((1, 2, 3), refs):
            got = ls[ls["step"] == step].set_index("param").loc[names]
            np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-6)
            np.testing.assert_allclose(got["grad_max_abs"], ref["grad_max_abs"], rtol=1e-6)
            np.testing.assert_allclose(got["param_norm"], ref["param_norm"], rtol=1e-6)
            assert got["numel"].tolist() == [p.numel() for p in model.parameters()]
            if mode == "none":
                assert got["update_norm"].isna().all() and got["update_ratio"].isna().all()
            else:
                np.testing.assert_allclose(got["update_norm"], ref["update_norm"], rtol=1e-5)
                np.testing.assert_allclose(got["update_ratio"],
                                           np.array(ref["update_norm"]) / np.array(ref["param_norm"]), rtol=1e-5)
        assert ("layer_stats" in _absent(st, rid)) is False


def test_layer_stats_of_a_step_that_never_ran_have_no_update(tmp_path) -> None:
    """An optimizer step skipped after log_layer_stats (an AMP overflow): that row's update is
    NULL, not the next step's update."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with k2repro.audit.start(tmp_path, name="skip") as run:
        _backward(model, 1)
        run.log_layer_stats(1, model, opt)  # no opt.step() for step 1
        opt.zero_grad()
        _backward(model, 2)
        run.log_layer_stats(2, model, opt)
        opt.step()
        rid = run.run_id
    with open_store(tmp_path) as st:
        ls = st.layer_stats(rid)
        assert ls[ls["step"] == 1]["update_norm"].isna().all()
        assert (ls[ls["step"] == 2]["update_norm"] > 0).all()


def test_layer_stats_follow_a_changed_model() -> None:
    """The parameter list is cached per model (audit/layerstats.py model_params): freezing a
    parameter, replacing one and adding a submodule must all show in what is measured,
    the last within PLAN_REFRESH calls, and names must equal named_parameters' at every call."""
    from k2repro.audit import layerstats

    model = _model()

    def measured() -> list[str]:
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        return layerstats.measure(1, model).names

    def expected() -> list[str]:
        return [n for n, p in model.named_parameters() if p.requires_grad]

    assert measured() == expected() == ["0.weight", "0.bias", "2.weight", "2.bias"]
    model[0].bias.requires_grad_(False)  # frozen: left out at once
    assert measured() == expected() == ["0.weight", "2.weight", "2.bias"]
    model[0].bias.requires_grad_(True)
    new = torch.nn.Parameter(torch.full((3, 8), 7.0))
    model[2].weight = new  # replaced: measured at once, with its own values
    item = layerstats.measure(1, model)
    assert item.names == expected()
    row = layerstats.matrices([layerstats.reduce(item)])[0][item.names.index("2.weight")]
    assert float(row[1]) == pytest.approx(float(new.detach().norm()))
    model.add_module("3", torch.nn.Linear(3, 2))  # a new submodule: within PLAN_REFRESH calls
    seen = [("3.weight" in measured()) for _ in range(layerstats.PLAN_REFRESH + 1)]
    assert seen[-1] and measured() == expected()
    with pytest.raises(ValueError, match="no parameters that require grad"):
        for p in model.parameters():
            p.requires_grad_(False)
        layerstats.measure(1, model)


def test_samples_fill_loss_spread_and_absent_lists_the_rest(tmp_path) -> None:
    model = _model()
    with k2repro.audit.start(tmp_path, name="samples", flush_every=2) as run:
        for step in (1, 2, 3):
            losses = _backward(model, step)
            ids = torch.arange(6) + 10 * step
            if step == 2:  # before its step row
                run.log_samples(step, ids, losses, n_tokens=5)
            run.log_step(step, loss=losses.mean())
            if step != 2:
                run.log_samples(step, ids, losses, n_tokens=5)
            model.zero_grad()
        rid = run.run_id
        ref = {s: _backward(_model(), s) for s in (1, 2, 3)}
    with open_store(tmp_path) as st:
        df = st.steps(rid)
        for s in (1, 2, 3):
            r = df[df["step"] == s].iloc[0]
            x = ref[s].double().numpy()
            assert r["loss_max"] == x.max() and r["loss_min"] == x.min()
            assert r["loss_std"] == pytest.approx(x.std(), rel=1e-12)
        ss = st.sample_stats(rid)
        assert len(ss) == 18 and set(ss["n_tokens"]) == {5} and ss["sample_id"].min() == 10
        assert _absent(st, rid) == {"layer_stats", "checkpoints", "data_manifest", "steps.grad_norm",
                                    "steps.lr", "steps.tokens", "steps.batch_hash"}
        detail = json.loads(st.events(rid, kind=ABSENT_EVENT)["detail"].iloc[0])
        assert "layer attribution" in detail["rules_out"]["layer_stats"]


def test_exception_marks_the_run_failed_with_traceback_and_keeps_rows(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="loss went sideways"):
        with k2repro.audit.start(tmp_path, name="boom", flush_every=100) as run:
            for s in (1, 2, 3):
                run.log_step(s, loss=torch.tensor(float(s)))
            raise RuntimeError("loss went sideways")
    with open_store(tmp_path) as st:
        r = st.run(run.run_id)
        assert r["status"] == "failed"
        assert "Traceback" in r["error"] and "loss went sideways" in r["error"]
        assert st.steps(run.run_id)["loss"].tolist() == [1.0, 2.0, 3.0]


def test_live_reads_and_checkpoint_rows(tmp_path) -> None:
    ck = tmp_path / "ck.pt"
    ck.write_bytes(b"x" * 1234)
    with k2repro.audit.start(tmp_path / "store", name="live", config={"a": 1}) as run:
        for s in range(1, 6):
            run.log_step(s, loss=1.0 / s)
        run.log_checkpoint(5, ck)
        run.log_event("note", step=5, severity="warning", text="hello", api_token="tok-secret-xyz")
        run.flush(wait=True)
        with open_store(tmp_path / "store") as st:
            assert st.run(run.run_id)["status"] == "running"
            assert st.steps(run.run_id)["step"].tolist() == [1, 2, 3, 4, 5]
            c = st.checkpoints(run.run_id)
            assert c["bytes"].tolist() == [1234] and c["path"].tolist() == [str(ck)]
            ev = st.events(run.run_id, kind="note").iloc[0]
            assert ev["severity"] == "warning" and json.loads(ev["detail"]) == {"text": "hello", "api_token": REDACTED}
    with open_store(tmp_path / "store") as st:
        assert st.run(run.run_id)["status"] == "completed"


def test_low_level_sink_calls_stay_available(tmp_path) -> None:
    with k2repro.audit.start(tmp_path, name="compat") as run:
        run.log_metrics({"step": [1], "name": ["x"], "value": [0.5]})
    with open_store(tmp_path) as st:
        assert st.execute("SELECT value FROM metrics").fetchall() == [(0.5,)]


def test_world_size_without_process_group_needs_a_run_id(tmp_path, monkeypatch) -> None:
    from k2repro.errors import BadInputError

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(BadInputError, match="run_id"):
        k2repro.audit.start(tmp_path, name="ws2")
    run = k2repro.audit.start(tmp_path, name="ws2", run_id="shared-id")
    assert (run.rank, run.world_size, run.run_id) == (0, 2, "shared-id")
    run.close()
    with open_store(tmp_path) as st:
        assert st.run("shared-id")["world_size"] == 2
