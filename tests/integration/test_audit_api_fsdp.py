"""k2repro.audit.start under FSDP2 (and DDP) with two real gloo ranks (torchrun): one run id
for both ranks, global tables written once, rank-local samples from each, and per-parameter
statistics equal to those of the same model trained on one process on the whole batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import torch

from k2repro.audit.store import open_store

SCRIPT = textwrap.dedent('''
    import sys
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.fsdp import fully_shard
    import k2repro.audit

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 4))
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    with k2repro.audit.start(sys.argv[1], name="fsdp", config={"world_size": 2}) as run:
        for step in (1, 2, 3):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)
            mine = slice(4 * rank, 4 * rank + 4)
            losses = F.cross_entropy(model(x[mine]), y[mine], reduction="none")
            losses.mean().backward()
            run.log_layer_stats(step, model, opt)
            opt.step()
            opt.zero_grad()
            run.log_step(step, loss=losses.mean().detach())
            run.log_samples(step, torch.arange(4) + 4 * rank + 8 * step, losses.detach())
        if rank == 0:
            print("run_id=" + run.run_id, flush=True)

    # The same with DDP: plain replicated tensors count once (rank 0), not once per rank.
    torch.manual_seed(0)
    ddp = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 4)))
    opt = torch.optim.AdamW(ddp.parameters(), lr=0.05)
    with k2repro.audit.start(sys.argv[1], name="ddp") as run:
        for step in (1, 2, 3):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)
            mine = slice(4 * rank, 4 * rank + 4)
            F.cross_entropy(ddp(x[mine]), y[mine]).backward()
            run.log_layer_stats(step, ddp, opt)
            opt.step()
            opt.zero_grad()
            run.log_step(step, loss=1.0)
        if rank == 0:
            print("ddp_run_id=" + run.run_id, flush=True)

    # Rank 1 fails before step 3's layer statistics, rank 0 after them: rank 0's gather of
    # step 3 never completes. Closing its failed run must not wait on it, nor lose steps 1-2
    # (flush_every=1: every call is gathered at once; by default a flush's worth together).
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 4))
    opt = torch.optim.SGD(plain.parameters(), lr=0.05)
    try:
        with k2repro.audit.start(sys.argv[1], name="failing", flush_every=1) as run:
            if rank == 0:
                print("failed_run_id=" + run.run_id, flush=True)
            for step in (1, 2, 3):
                if step == 3 and rank == 1:
                    raise RuntimeError("rank 1 fails")
                F.cross_entropy(plain(torch.randn(4, 6)), torch.zeros(4, dtype=torch.long)).backward()
                run.log_layer_stats(step, plain, opt)
                opt.step()
                opt.zero_grad()
                run.log_step(step, loss=1.0)
            raise RuntimeError("rank 0 fails")
    except RuntimeError:
        pass
    dist.destroy_process_group()
''')


def _reference() -> dict[int, dict[str, list[float]]]:
    """The same model and data on one process, unsharded, whole batch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    out = {}
    for step in (1, 2, 3):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.detach().clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        out[step] = {
            "grad_norm": [float(g.norm()) for g in grads],
            "grad_max_abs": [float(g.abs().max()) for g in grads],
            "param_norm": [float(b.norm()) for b in before],
            "update_norm": [float((p.detach() - b).norm()) for p, b in zip(model.parameters(), before)],
        }
    return out


def _launch(tmp_path, name: str, text: str, timeout: int) -> tuple[str, object]:  # noqa: ANN001
    """Run `text` as a script on 2 gloo ranks under torchrun with a store; its stdout and the store."""
    script = tmp_path / name
    script.write_text(text)
    store = tmp_path / "store"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script), str(store)], env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, store


def test_fsdp2_two_ranks_match_the_unsharded_model(tmp_path) -> None:
    stdout, store = _launch(tmp_path, "fsdp_loop.py", SCRIPT, 300)
    rid = stdout.split("run_id=")[1].split()[0]
    ddp_rid = stdout.split("ddp_run_id=")[1].split()[0]
    failed_rid = stdout.split("failed_run_id=")[1].split()[0]
    ref = _reference()
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    with open_store(store) as st:
        assert sorted(st.runs()["run_id"]) == sorted([rid, ddp_rid, failed_rid])  # both ranks under rank 0's ids
        failed = st.run(failed_rid)
        assert failed["status"] == "failed" and "rank 0 fails" in failed["error"]
        assert "while flushing" not in failed["error"]  # no wait on the gather that never completed
        assert sorted(set(st.layer_stats(failed_rid)["step"])) == [1, 2]
        run = st.run(rid)
        assert run["status"] == "completed" and run["world_size"] == 2 and run["launcher"] == "torchrun"
        assert sorted(set(st.sql("SELECT rank FROM env WHERE run_id = ?", [rid])["rank"])) == [0, 1]
        assert st.steps(rid)["step"].tolist() == [1, 2, 3]  # written once, by rank 0
        ss = st.sample_stats(rid)
        assert len(ss) == 24 and sorted(set(ss["rank"])) == [0, 1]
        ls = st.layer_stats(rid)
        assert len(ls) == 12 and set(ls["numel"]) == {60, 10, 40, 4}  # global sizes, not shards
        for step in (1, 2, 3):
            got = ls[ls["step"] == step].set_index("param").loc[names]
            for col in ("grad_norm", "grad_max_abs", "param_norm", "update_norm"):
                np.testing.assert_allclose(got[col].to_numpy(), ref[step][col], rtol=2e-5, err_msg=f"{col} {step}")
        ls = st.layer_stats(ddp_rid)
        for step in (1, 2, 3):
            got = ls[ls["step"] == step].set_index("param").loc[[f"module.{n}" for n in names]]
            for col in ("grad_norm", "grad_max_abs", "param_norm", "update_norm"):
                np.testing.assert_allclose(got[col].to_numpy(), ref[step][col], rtol=2e-5, err_msg=f"ddp {col} {step}")


EARLY_DESTROY = textwrap.dedent('''
    import sys
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    import k2repro.audit

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 4))
    opt = torch.optim.SGD(plain.parameters(), lr=0.05)
    with k2repro.audit.start(sys.argv[1], name="early-destroy") as run:
        for step in (1, 2):
            F.cross_entropy(plain(torch.randn(4, 6)), torch.zeros(4, dtype=torch.long)).backward()
            run.log_layer_stats(step, plain, opt)
            opt.step()
            opt.zero_grad()
            run.log_step(step, loss=1.0)
        dist.destroy_process_group()
        if dist.is_available() and not dist.is_initialized() and run.rank == 0:
            print("run_id=" + run.run_id, flush=True)
''')


def test_process_group_destroyed_before_close_drops_what_was_not_gathered(tmp_path) -> None:
    """Step 2's statistics (not gathered yet: a flush's worth go out together) cannot be reduced
    over ranks once the process group is gone: dropped with a warning event, not written as one
    rank's shard."""
    stdout, store = _launch(tmp_path, "early_destroy.py", EARLY_DESTROY, 120)
    rid = stdout.split("run_id=")[1].split()[0]
    with open_store(store) as st:
        assert st.run(rid)["status"] == "completed"
        assert sorted(set(st.layer_stats(rid)["step"])) == [1]
        dropped = st.events(rid, kind="layer_stats_dropped")
        assert len(dropped) == 2 and all(json.loads(d)["steps"] == [2] for d in dropped["detail"])
