"""Model shapes, the K2 parameter count, FLOPs, and the data order."""

from __future__ import annotations

import json

import numpy as np
import torch

from k2repro.config.load import load_config
from k2repro.data.loader import StepSampler, batch_hash, data_position, global_batch_ids, rank_slice
from k2repro.model.build import build_model
from k2repro.model.flops import flops_per_token, n_params
from k2repro.model.llama import count_params, token_losses
from k2repro.train.optim import MaskableAdamW, lr_at
from tests.conftest import k2


def test_k2_dry_run_param_count() -> None:
    r = k2("train", "model=k2_65b", "train.dry_run=true", "train.seq_len=2048")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert abs(out["n_params"] - 65_286_184_960) / 65_286_184_960 < 1e-3
    assert out["flops_per_token"] > 6 * 6.4e10
    assert len(out["config_hash"]) == 16


def test_closed_form_count_matches_module() -> None:
    cfg = load_config(["model.n_kv_heads=2"])
    model = build_model(cfg.model, cfg.train.seed, "meta")
    assert count_params(model) == n_params(cfg.model)
    assert flops_per_token(cfg.model, 64) > 0


def test_forward_and_losses() -> None:
    cfg = load_config([])
    model = build_model(cfg.model, cfg.train.seed)
    x = torch.randint(0, cfg.model.vocab_size, (2, 17))
    logits = model(x[:, :-1])
    assert logits.shape == (2, 16, cfg.model.vocab_size)
    loss, lse = token_losses(logits, x[:, 1:])
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(loss.reshape(-1), ref)
    # log Z comes from CE + the target logit (one gather): it must equal a full logsumexp
    torch.testing.assert_close(lse, torch.logsumexp(logits.detach().float(), dim=-1), rtol=1e-6, atol=1e-5)


def test_same_seed_same_init_across_builds() -> None:
    cfg = load_config([])
    a, b = build_model(cfg.model, cfg.train.seed), build_model(cfg.model, cfg.train.seed)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    other = load_config(["train.seed=99"])
    c = build_model(other.model, other.train.seed)
    assert not torch.equal(a.output.weight, c.output.weight)


def test_causality() -> None:
    cfg = load_config([])
    model = build_model(cfg.model, cfg.train.seed)
    x = torch.randint(0, 100, (1, 12))
    y = x.clone()
    y[0, 8] = (y[0, 8] + 1) % 100
    la, lb = model(x), model(y)
    torch.testing.assert_close(la[0, :8], lb[0, :8])
    assert not torch.allclose(la[0, 8:], lb[0, 8:])


def test_lr_schedule_warmup_and_cosine() -> None:
    assert lr_at(1, 1.0, 0.1, 10, 100) == 0.1
    assert lr_at(10, 1.0, 0.1, 10, 100) == 1.0
    assert abs(lr_at(100, 1.0, 0.1, 10, 100) - 0.1) < 1e-12
    assert lr_at(50, 1.0, 0.1, 10, 100) < 1.0


def test_masked_step_is_bitwise_a_skipped_step() -> None:
    torch.manual_seed(0)
    w0 = torch.randn(5, 4)
    def make():
        p = torch.nn.Parameter(w0.clone())
        return p, MaskableAdamW([p], lr=0.1)
    (p1, o1), (p2, o2) = make(), make()
    for step in range(4):
        g = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step(apply=torch.tensor(step != 2))
        if step != 2:
            o2.step()
    assert torch.equal(p1, p2)
    assert torch.equal(o1.state[p1]["exp_avg_sq"], o2.state[p2]["exp_avg_sq"])
    assert o1.state[p1]["step"].item() == 3


def test_data_order_pure_function() -> None:
    a = global_batch_ids(1, 50, 3, 8)
    assert np.array_equal(a, global_batch_ids(1, 50, 3, 8))
    assert not np.array_equal(a, global_batch_ids(2, 50, 3, 8))
    seen = np.concatenate([global_batch_ids(1, 48, p, 8) for p in range(1, 7)])
    assert sorted(seen.tolist()) == list(range(48)), "one epoch sees every sample once"
    halves = np.concatenate([rank_slice(a, r, 2) for r in range(2)])
    assert np.array_equal(halves, a)
    assert batch_hash(a) == batch_hash(list(a))


def test_deferred_positions_move_to_the_end() -> None:
    steps = [data_position(s, [4, 5], 10) for s in range(1, 11)]
    assert steps == [1, 2, 3, 6, 7, 8, 9, 10, 11, 12]
    assert [data_position(s, [9, 2]) for s in range(1, 6)] == [1, 3, 4, 5, 6]
    s = StepSampler(1, 100, 4, 10)
    s.load_state_dict({"deferred": [4, 5]})
    assert np.array_equal(s.ids(4), global_batch_ids(1, 100, 6, 4))
