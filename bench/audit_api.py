"""Overhead of `k2repro.audit.start` on a plain PyTorch loop: the same loop (k2repro's Llama-style
model, AdamW, clipping) without the audit, with `log_step` every step, and with `log_step` +
`log_layer_stats` every step (per-parameter norms and the exact update: a parameter snapshot
and an optimizer step hook). One process, CPU, one thread; ABBA-interleaved pairs (A B C /
C B A); per step over steps 11..N (flushes included): the wall time, the process CPU time, and
the audit's own CPU by thread clock (issue 26's method, as bench/audit_overhead.py): the loop
thread's CPU inside the audit's calls (`log_step`, `log_layer_stats`, their flushes) and in its
optimizer step hook, plus the sink's writer and heartbeat threads' CPU, as a share of the
audit-off step's wall time. (The difference of the whole loop's CPU with and without audit is
kept as `loop_cpu_diff_ms`: it moved by +-3 ms a step between runs, so it cannot carry a 1%
share.) Thread clocks do not count waiting for a core, so
other tenants of a shared machine disturb them much less than the wall time. Median ratios
against the loop without audit and their 95% bootstrap intervals, to reports/bench/audit_api.json.

    .venv/bin/python bench/audit_api.py [--pairs 5] [--steps 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import k2repro.audit  # noqa: E402
from bench._common import bootstrap_ci, write  # noqa: E402
from k2repro.model.llama import ModelArgs, Transformer, count_params, token_losses  # noqa: E402

MODEL = ModelArgs(n_layers=4, d_model=128, n_heads=4, n_kv_heads=4, ffn_dim=352, vocab_size=512, max_seq_len=128)
BATCH, SEQ = 8, 64


def loop(steps: int, mode: str, store: Path) -> tuple[float, float, dict]:
    """(wall, process CPU) seconds per step over steps 11..steps, and the thread clocks (s/step)."""
    torch.manual_seed(0)
    model = Transformer(MODEL)
    model.init_weights(torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, MODEL.vocab_size, (256, SEQ + 1), generator=torch.Generator().manual_seed(1))
    run = k2repro.audit.start(store, name=f"bench-{mode}", config={"mode": mode}) if mode != "off" else None
    times = []
    api_cpu = 0.0
    t_prev = time.perf_counter()
    for step in range(1, steps + 1):
        if step == 11:
            cpu0, thread0 = time.process_time(), time.thread_time()
            api_cpu = 0.0  # the loop thread's CPU inside the audit's calls, from here on
            if run is not None:
                run.hook_cpu_s = 0.0  # ... and in its optimizer step hook (the exact update)
        x = data[torch.randint(0, len(data), (BATCH,))]
        loss_tok, _ = token_losses(model(x[:, :-1]), x[:, 1:])
        loss = loss_tok.mean()
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        c0 = time.thread_time()
        if mode == "full":
            run.log_layer_stats(step, model, opt)
        api_cpu += time.thread_time() - c0
        opt.step()
        opt.zero_grad(set_to_none=True)
        if run is not None:
            c0 = time.thread_time()
            run.log_step(step, loss=loss.detach(), lr=1e-3, grad_norm=gn, tokens=BATCH * SEQ)
            api_cpu += time.thread_time() - c0
        now = time.perf_counter()
        times.append(now - t_prev)
        t_prev = now
    n = steps - 10
    cpu, loop_cpu = (time.process_time() - cpu0) / n, (time.thread_time() - thread0) / n
    threads = {"loop_cpu_s": loop_cpu, "writer_cpu_s": 0.0, "heartbeat_cpu_s": 0.0, "api_cpu_s": 0.0}
    if run is not None:
        threads["api_cpu_s"] = (api_cpu + run.hook_cpu_s) / n
        run.close()  # the writer's and heartbeat's totals, over all steps (per step below)
        threads.update(writer_cpu_s=run.sink.writer_cpu_s / steps, heartbeat_cpu_s=run.sink.heartbeat_cpu_s / steps)
    return statistics.fmean(times[10:]), cpu, threads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    modes = ("off", "log_step", "full")
    res: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    threads: dict[str, list[dict]] = {m: [] for m in modes}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        loop(20, "full", Path(tmp) / "warmup")  # imports, allocator, first-call costs
        for i in range(args.pairs):
            for mode in modes if i % 2 == 0 else tuple(reversed(modes)):
                wall, c, th = loop(args.steps, mode, Path(tmp) / f"s{i}")
                res[mode].append(wall)
                cpu[mode].append(c)
                threads[mode].append(th)
                print(f"pair {i} {mode}: {wall * 1e3:.2f} ms/step wall, {c * 1e3:.2f} ms/step CPU", flush=True)
    out = {"what": "per-step wall and process CPU time (steps 11..N) of a plain PyTorch loop audited through "
                   "k2repro.audit.start / the same loop without audit; CPU, 1 torch thread, one process",
           "model": {**MODEL.__dict__, "n_params": count_params(Transformer(MODEL)),
                     "n_param_tensors": len(list(Transformer(MODEL).parameters())), "batch": BATCH, "seq": SEQ},
           "pairs": args.pairs, "steps": args.steps, "step_time_s": res, "step_cpu_s": cpu,
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "torch": torch.__version__}
    for mode in ("log_step", "full"):
        out[mode] = {}
        for label, series in (("wall", res), ("cpu", cpu)):
            ratios = [a / b for a, b in zip(series[mode], series["off"])]
            lo, hi = bootstrap_ci(ratios)
            out[mode][label] = {"ratios": ratios, "median_ratio": statistics.median(ratios), "ci95": [lo, hi]}

        def med(m: str, key: str) -> float:
            return statistics.median(t[key] for t in threads[m]) * 1e3

        parts = {"api_cpu_ms": med(mode, "api_cpu_s"),
                 "writer_cpu_ms": med(mode, "writer_cpu_s"), "heartbeat_cpu_ms": med(mode, "heartbeat_cpu_s")}
        off_ms = statistics.median(res["off"]) * 1e3
        out[mode]["audit_cpu"] = {**parts, "off_step_ms": off_ms, "share": sum(parts.values()) / off_ms,
                                  # for reference only: +-3 ms a step of noise, it cannot carry a share
                                  "loop_cpu_diff_ms": med(mode, "loop_cpu_s") - med("off", "loop_cpu_s")}
    write("audit_api", out)


if __name__ == "__main__":
    main()
