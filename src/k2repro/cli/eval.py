"""`k2repro eval RUN`: held-out perplexity (overall, per domain) and memorization for every
checkpoint of a run, as rows of the `evals` table.

Thin: plan (checks the run, data and checkpoints; exit 2 before anything is written), evaluate
in-process at `--nproc 1` or under `torchrun --standalone` at `--nproc N` (FSDP-sharded), render.
Progress lines go to stderr; `--json` prints one object to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from k2repro.errors import BadInputError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run id (or unique prefix, or unique run name)")
    parser.add_argument("--store", default=None,
                        help="audit store holding the run (default: $K2REPRO_STORE or runs)")
    parser.add_argument("--out-store", default=None,
                        help="store root that receives the `evals` rows (default: --store); the DVC "
                        "pipeline keeps them apart from the training store")
    parser.add_argument("--steps", default=None, help="checkpoint steps to evaluate, e.g. 100,200 (default: all)")
    parser.add_argument("--data-dir", default=None,
                        help="packed data directory (default: the run's data.packed_dir)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="ranks: >1 launches torchrun and shards the model with FSDP (default 1)")
    parser.add_argument("--k", type=int, default=32,
                        help="memorization prefix and continuation length in tokens (default 32; "
                        "clamped to (seq_len + 1) // 2)")
    parser.add_argument("--mem-samples", type=int, default=128,
                        help="training sequences in the memorization sample (default 128)")
    parser.add_argument("--val-windows", type=int, default=0,
                        help="evaluate only the first N validation windows (default 0: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass and rank (default 8)")
    parser.add_argument("--force", action="store_true",
                        help="re-evaluate checkpoints that already have rows for the same settings")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")


def _launch(plan, nproc: int) -> tuple[int, dict]:  # noqa: ANN001 - an EvalPlan
    with tempfile.TemporaryDirectory(prefix="k2repro-eval-") as tmp:
        plan_path, res_path = Path(tmp) / "plan.json", Path(tmp) / "results.json"
        plan_path.write_text(plan.to_json())
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "k2repro.eval", str(plan_path), str(res_path)]
        proc = subprocess.run(cmd, env=env)
        payload = json.loads(res_path.read_text()) if res_path.exists() else {}
    if "error" in payload:
        return int(payload.get("exit_code", 2)), payload
    if proc.returncode != 0 or "results" not in payload:
        print(f"k2repro eval: error: evaluation workers failed (torchrun exit {proc.returncode})", file=sys.stderr)
        return proc.returncode or 1, payload
    return 0, payload


def run(args: argparse.Namespace) -> int:
    from k2repro.cli.render import jsonable, render
    from k2repro.eval.runner import parse_steps, plan_eval, summary_rows

    if args.nproc < 1:
        raise BadInputError(f"--nproc must be >= 1, got {args.nproc}")
    from k2repro.core.layout import default_store

    plan = plan_eval(args.store or str(default_store()), args.run, out_store=args.out_store, steps=parse_steps(args.steps),
                     data_dir=args.data_dir, k=args.k, mem_samples=args.mem_samples,
                     val_windows=args.val_windows, batch_size=args.batch_size, force=args.force)
    for ck in plan.skipped:
        print(f"eval {plan.run_id} step {ck.step}: skipped (manifest sha256 {ck.manifest_sha256[:16]} "
              "already evaluated with these settings)", file=sys.stderr)
    for step in plan.missing:
        print(f"eval {plan.run_id} step {step}: checkpoint not on disk (pruned by ckpt.keep_last?)",
              file=sys.stderr)
    results: list[dict] = []
    if plan.todo:
        print(f"eval {plan.run_id}: {len(plan.todo)} checkpoint(s) to evaluate (files verified against their "
              f"manifests), {len(plan.skipped)} already done; rows go to {plan.out_store}", file=sys.stderr, flush=True)
        if args.nproc == 1:
            from k2repro.distributed.init import init_distributed
            from k2repro.eval.runner import evaluate
            from k2repro.progress import Progress

            with Progress() as prog:
                results = evaluate(plan, init_distributed("auto"), progress=prog)
        else:
            print(f"eval {plan.run_id}: launching {args.nproc} ranks (torchrun)", file=sys.stderr, flush=True)
            code, payload = _launch(plan, args.nproc)
            if code:
                if "error" in payload:
                    print(f"k2repro eval: error: {payload['error']}", file=sys.stderr)
                return code
            results = payload["results"]
    results += plan.skipped_results
    results.sort(key=lambda r: r["step"])
    if args.json:
        obj = {"run_id": plan.run_id, "out_store": plan.out_store, "settings": plan.settings,
               "settings_hash": plan.settings_hash, "nproc": args.nproc, "missing_steps": plan.missing,
               "checkpoints": results}
        json.dump(jsonable(obj), sys.stdout, allow_nan=False)
        sys.stdout.write("\n")
        return 0
    cols, rows = summary_rows(results)
    print(f"run {plan.run_id}: {len(plan.todo)} checkpoint(s) evaluated, {len(plan.skipped)} skipped; "
          f"rows in {plan.out_store}")
    render(cols, rows)
    return 0
