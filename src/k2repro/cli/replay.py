"""`k2repro replay RUN --from-step A --to-step B`: re-run a recorded step range from the newest
checkpoint before A and prove that it reproduces. Exit 0 when every step matches within
`--tolerance` (default 0: bit for bit), 1 when not, 2 when the replay cannot start (unknown
run, no usable checkpoint, tampered checkpoint, changed data)."""

from __future__ import annotations

import argparse
import json
import sys

from k2repro.cli.render import jsonable


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0].replace("\n", " ") if __doc__ else None
    parser.add_argument("run", help="run id, unique run id prefix, or unique run name")
    parser.add_argument("--from-step", type=int, required=True, metavar="A", help="first step to compare")
    parser.add_argument("--to-step", type=int, required=True, metavar="B", help="last step to compare")
    parser.add_argument("--tolerance", type=float, default=0.0, metavar="T",
                        help="relative tolerance: |a-b| <= T*max(|a|,|b|) (default 0: bitwise)")
    parser.add_argument("--allow-reshard", action="store_true",
                        help="allow --nproc to differ from the run's world size (needs --tolerance)")
    parser.add_argument("--nproc", type=int, default=None, help="ranks for the replay (default: the run's)")
    parser.add_argument("--store", default=None, help="store root (default: $K2REPRO_STORE, else runs)")
    parser.add_argument("--out-store", default=None, help="store for the replay run (default: --store)")
    parser.add_argument("--no-checkpoints", action="store_true",
                        help="the replay writes no checkpoints (its config_hash then differs)")
    parser.add_argument("--json", action="store_true", help="the report as one JSON object on stdout")


def _say(msg: str) -> None:
    print(f"replay: {msg}", file=sys.stderr, flush=True)


def render_text(r: dict) -> str:
    start = ("the initial state (step 0)" if r["start_step"] == 0
             else f"checkpoint of step {r['start_step']} ({r['checkpoint']})")
    lines = [
        f"replay of {r['run_id']} steps {r['from_step']}..{r['to_step']} -> run {r['replay_run_id']}",
        f"  started from: {start}",
        f"  world size:   {r['replay_world_size']} (original {r['world_size']})",
        f"  compared:     {r['steps_compared']} steps"
        + (f"; re-run but not compared: {r['rerun_not_compared'][0]}..{r['rerun_not_compared'][-1]}"
           if r["rerun_not_compared"] else ""),
        f"  bit-exact:    {'yes' if r['bit_exact'] else 'no'}",
    ]
    if r["tolerance"] > 0:
        lines.append(f"  within tolerance {r['tolerance']:g}: {'yes' if r['within_tolerance'] else 'no'}")
    if r["first_divergence_step"] is not None:
        lines.append(f"  first divergence: step {r['first_divergence_step']} ({r['first_divergence_signal']})")
    elif r["first_bitwise_divergence_step"] is not None:
        lines.append(f"  first bitwise difference: step {r['first_bitwise_divergence_step']} "
                     f"({r['first_bitwise_divergence_signal']})")
    if r["missing_steps"]:
        lines.append(f"  missing in the replay: {r['missing_steps']}")
    lines.append(f"  max abs diff {r['max_abs_diff']:.3g}, max rel diff {r['max_rel_diff']:.3g}")
    lines.append("REPRODUCED" if r["exit_code"] == 0 else "NOT REPRODUCED")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from k2repro.tools.replay import replay

    report = replay(args.store, args.run, args.from_step, args.to_step, tolerance=args.tolerance,
                    allow_reshard=args.allow_reshard, nproc=args.nproc, out_store=args.out_store,
                    checkpoints=not args.no_checkpoints, progress=_say)
    if args.json:
        print(json.dumps(jsonable(report), allow_nan=False))
    else:
        print(render_text(report))
    return int(report["exit_code"])
