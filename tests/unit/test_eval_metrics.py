"""Issue 8, the metric code on its own: token-level domain attribution, per-domain losses against
a brute-force reference, the fixed sharding of batches over ranks, the data order of the
memorization sample, and the matched-prefix count of greedy decoding (real tiny models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from k2repro.data.loader import StepSampler
from k2repro.data.packed import Doc, PackedDataset, write_packed
from k2repro.eval.memorization import (
    effective_k,
    greedy_match,
    memorization_metrics,
    memorization_sample,
    seen_sample_ids,
)
from k2repro.eval.perplexity import (
    held_out_loss,
    load_val,
    perplexity_metrics,
    round_robin,
    token_domains,
)
from k2repro.model.llama import ModelArgs, Transformer

VOCAB, SEQ = 50, 8


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelArgs(n_layers=1, d_model=16, n_heads=2, n_kv_heads=2, ffn_dim=32, vocab_size=VOCAB,
                              max_seq_len=32))
    m.init_weights(torch.Generator().manual_seed(seed))
    return m


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory) -> Path:
    """Documents of uneven lengths and three domains, so windows straddle documents."""
    rng = np.random.default_rng(3)
    lengths = [3, 11, 5, 20, 2, 9, 14, 7, 4, 13]
    domains = ["prose", "code", "math", "code", "prose", "prose", "math", "code", "prose", "code"]
    docs = [Doc(f"d{i}", dom, rng.integers(1, VOCAB, size=n)) for i, (n, dom) in enumerate(zip(lengths, domains))]
    out = tmp_path_factory.mktemp("val") / "packed"
    write_packed(out, {"train": docs, "val": docs}, seq_len=SEQ, vocab_size=VOCAB, eos_id=0)
    return out


def _reference_domain(ds: PackedDataset, pos: int) -> str:
    """The document holding stream position `pos`, by a linear scan (EOS belongs to its doc)."""
    for _, d in ds.docs.iterrows():
        if d["token_start"] <= pos < d["token_start"] + d["n_tokens"] + 1:
            return str(d["domain"])
    raise AssertionError(pos)


def test_every_target_token_gets_its_own_documents_domain(val_dir: Path) -> None:
    ds = PackedDataset(val_dir, "val")
    ids = np.arange(len(ds))
    for seq_len in (SEQ, 5):  # the evaluated window may be shorter than the packed one
        dom, names = token_domains(ds, ids, seq_len)
        assert names == ["code", "math", "prose"]
        assert dom.shape == (len(ds), seq_len)
        for i in ids:
            for j in range(seq_len):
                assert names[dom[i, j]] == _reference_domain(ds, i * (SEQ + 1) + j + 1), (i, j)
    straddling = [i for i in ids if len(set(dom[i])) > 1]
    assert straddling, "the corpus must have windows that span two domains"


def test_per_domain_losses_match_a_brute_force_reference(val_dir: Path) -> None:
    ds = PackedDataset(val_dir, "val")
    val = load_val(ds, SEQ)
    model = _model()
    res = held_out_loss(model, val, torch.device("cpu"), batch=3)
    with torch.no_grad():
        x = torch.from_numpy(val.tokens)
        logits = model(x[:, :-1])
        lp = torch.log_softmax(logits.double(), -1).gather(-1, x[:, 1:, None]).squeeze(-1).neg().numpy()
    sums: dict[str, list[float]] = {}
    for i in range(len(ds)):
        for j in range(SEQ):
            sums.setdefault(_reference_domain(ds, i * (SEQ + 1) + j + 1), []).append(lp[i, j])
    for name, vals in sums.items():
        assert res[name]["n_tokens"] == len(vals)
        assert res[name]["loss"] == pytest.approx(float(np.mean(vals)), rel=1e-6)
    allv = np.concatenate([np.asarray(v) for v in sums.values()])
    assert res["overall"]["n_tokens"] == allv.size == val.n_tokens
    assert res["overall"]["loss"] == pytest.approx(float(allv.mean()), rel=1e-6)
    # the batch size changes nothing but float order
    again = held_out_loss(model, val, torch.device("cpu"), batch=64)
    assert again["overall"]["loss"] == pytest.approx(res["overall"]["loss"], rel=1e-9)
    names = [m for m, _, _ in perplexity_metrics(res)]
    assert names == ["val/loss", "val/ppl", "val/ppl/code", "val/ppl/math", "val/ppl/prose"]
    rows = {m: v for m, v, _ in perplexity_metrics(res)}
    assert rows["val/ppl"] == pytest.approx(np.exp(rows["val/loss"]))


@pytest.mark.parametrize("n,batch,world", [(0, 4, 1), (1, 4, 2), (10, 3, 1), (10, 3, 2), (10, 3, 3), (7, 8, 2)])
def test_round_robin_covers_each_item_once_with_equal_batch_counts(n: int, batch: int, world: int) -> None:
    seen: list[int] = []
    counts = []
    for r in range(world):
        got = list(round_robin(n, batch, r, world))
        counts.append(len(got))
        for idx, real in got:
            assert len(idx) <= batch
            if real:
                seen.extend(idx.tolist())
    assert len(set(counts)) == 1, counts  # FSDP needs the same number of forwards on every rank
    assert sorted(seen) == list(range(n))
    # the batches themselves do not depend on the world size
    single = [tuple(i) for i, real in round_robin(n, batch, 0, 1) if real]
    multi = sorted(tuple(i) for r in range(world) for i, real in round_robin(n, batch, r, world) if real)
    assert sorted(single) == multi


@pytest.mark.parametrize("deferred", [(), (2, 3)])
def test_seen_samples_follow_the_trainers_data_order(deferred: tuple[int, ...]) -> None:
    n, gb, max_steps = 50, 4, 30
    sampler = StepSampler(11, n, gb, max_steps)
    sampler.deferred = list(deferred)
    for step in (0, 1, 5, 12, 13, 30):
        want = sorted({int(i) for s in range(1, step + 1) for i in sampler.ids(s)})
        assert seen_sample_ids(11, n, gb, max_steps, step, deferred).tolist() == want


def test_memorization_sample_is_fixed_by_the_seed_and_drawn_from_seen() -> None:
    seen = np.arange(0, 100, 3)
    a = memorization_sample(5, 100, seen, 10)
    assert a.tolist() == memorization_sample(5, 100, seen, 10).tolist()
    assert len(a) == 10 and len(set(a.tolist())) == 10 and set(a.tolist()) <= set(seen.tolist())
    assert a.tolist() != memorization_sample(6, 100, seen, 10).tolist()
    # a later checkpoint has seen more; the earlier sample's ids that it still ranks first stay
    later = memorization_sample(5, 100, np.arange(100), 10)
    order = [int(i) for i in later]
    assert [i for i in a.tolist() if i in order] == [i for i in order if i in set(a.tolist())]
    assert len(memorization_sample(5, 100, seen[:4], 10)) == 4


def test_greedy_match_counts_the_matching_prefix() -> None:
    model = _model(1)
    k = 6
    rng = np.random.default_rng(0)
    prefix = torch.from_numpy(rng.integers(1, VOCAB, size=(9, k)))
    with torch.no_grad():  # the model's own greedy continuation, by the plainest loop
        x = prefix
        for _ in range(k):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    windows = x.numpy().copy()
    for i in range(9):  # row i: first wrong continuation token at position i (none for i >= k)
        if i < k:
            windows[i, k + i] = (windows[i, k + i] + 1) % VOCAB
    matched = greedy_match(model, windows, k, torch.device("cpu"), batch=4)
    assert matched.tolist() == [0, 1, 2, 3, 4, 5, 6, 6, 6]
    rows = dict((m, v) for m, v, _ in memorization_metrics(matched, k))
    assert rows["mem/exact_match"] == pytest.approx(3 / 9)
    assert rows["mem/matched_prefix"] == pytest.approx(np.mean([0, 1, 2, 3, 4, 5, 6, 6, 6]))


def test_k_is_clamped_to_the_window_and_context() -> None:
    assert effective_k(32, 128, 128) == 32
    assert effective_k(32, 32, 64) == 16
    assert effective_k(32, 128, 40) == 20
    assert effective_k(4, 32, 64) == 4
