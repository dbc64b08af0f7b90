"""`k2repro import KIND PATH --name NAME`: bring a run trained elsewhere into the store.

Thin: parse, call the importer (`k2repro.importers`), commit, print the run ids. Each kind is a
sub-command with its own options. `KINDS` maps a parsed source kind to its configure and read
functions (the parsed runs then go through `commit_runs`); `RUNNERS` maps a kind that is not a
parse to its configure and run functions: the release bundle's `import bundle DIR` (which moves
whole run folders) is one entry there, `RUNNERS["bundle"] = (help, configure, run)`.
Which runs of one import continue or branch from which is decided here too (`stitch.plan`,
and `stitch.link_to_store` for `--parent`), then written by `commit_runs`.
Exit 0 (also when the content was imported before: the existing run is reported), 2 for bad
input (the message names the file and line), and nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from k2repro.cli.render import jsonable
from k2repro.errors import BadInputError


def _common(p: argparse.ArgumentParser, step_axis: bool, offset: bool = True) -> None:
    p.add_argument("path", metavar="PATH", help="the file (or folder) to import")
    p.add_argument("--name", default=None,
                   help="run name (default: the file name); with several runs: NAME/<run>")
    p.add_argument("--store", default=None, help="store root (default: $K2REPRO_STORE, else runs)")
    p.add_argument("--json", action="store_true",
                   help='print {"run_ids": [...], "runs": [...]} as JSON to stdout')
    p.add_argument("--map", action="append", default=[], metavar="A=B[,C=D...]",
                   help="extend the metric-name table: SOURCE=TARGET or TARGET=SOURCE (the side "
                   "that names a k2repro column is the target, e.g. step=iter or "
                   "grad-norm=grad_norm); SOURCE= drops a series")
    if step_axis:
        p.add_argument("--step-unit", choices=("iteration", "sample", "token"), default="iteration",
                       help="what the step column counts (default: iteration)")
        p.add_argument("--global-batch", type=int, default=None,
                       help="samples per step, for --step-unit sample/token")
        p.add_argument("--seq-len", type=int, default=None,
                       help="tokens per sample, for --step-unit token")
        p.add_argument("--step-divisor", type=float, default=None,
                       help="divide the step column by this (overrides --step-unit)")
    if offset:
        p.add_argument("--step-offset", type=int, default=0,
                       help="add this to every step after dividing (1 when the source counts from 0)")
    link = p.add_mutually_exclusive_group()
    link.add_argument("--stitch", dest="stitch", action="store_const", const="stitch", default="auto",
                      help="link every run of this import into one lineage in step order (restart "
                      "segments continue, overlapping runs fork), names ignored; default: link runs "
                      "whose names share a stem (docs/importers.md)")
    link.add_argument("--no-stitch", dest="stitch", action="store_const", const="none",
                      help="keep the runs of this import apart (no parent links)")
    p.add_argument("--parent", default=None, metavar="RUN",
                   help="the import's first segment continues this store run (id, unique prefix or "
                   "unique name) from its last step before the import's first step")


def _axis(args: argparse.Namespace) -> Any:
    from k2repro.importers.wandb_csv import StepAxis

    return StepAxis(unit=args.step_unit, global_batch=args.global_batch, seq_len=args.seq_len,
                    divisor=args.step_divisor, offset=args.step_offset)


def _conf_wandb(p: argparse.ArgumentParser) -> None:
    _common(p, step_axis=True)
    p.add_argument("--run", default=None, metavar="RUN",
                   help="import only this W&B run of the file (default: every run, one store run each)")


def _read_wandb(args: argparse.Namespace, names: Any) -> tuple[list[Any], dict[str, Any]]:
    from k2repro.importers.wandb_csv import read

    axis = _axis(args)
    return read(args.path, names, axis, select_run=args.run), {"axis": axis.as_hparams()}


def _conf_csv(p: argparse.ArgumentParser) -> None:
    _common(p, step_axis=True)


def _read_csv(args: argparse.Namespace, names: Any) -> tuple[list[Any], dict[str, Any]]:
    from k2repro.importers.generic import read

    axis = _axis(args)
    return read(args.path, names, axis), {"axis": axis.as_hparams()}


def _conf_tb(p: argparse.ArgumentParser) -> None:
    _common(p, step_axis=False)


def _read_tb(args: argparse.Namespace, names: Any) -> tuple[list[Any], dict[str, Any]]:
    from k2repro.importers.tensorboard import read

    return read(args.path, names, offset=args.step_offset), {"step_offset": args.step_offset}


def _conf_megatron(p: argparse.ArgumentParser) -> None:
    _common(p, step_axis=False, offset=False)


def _read_megatron(args: argparse.Namespace, names: Any) -> tuple[list[Any], dict[str, Any]]:
    from k2repro.importers.megatron_log import read

    return read(args.path, names), {}


#: kind -> (help, configure(parser), read(args, names) -> (runs, options that shape the result))
KINDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[..., Any]]] = {
    "wandb-csv": ("a W&B chart CSV export (one store run per W&B run in it)", _conf_wandb, _read_wandb),
    "tensorboard": ("TensorBoard event files or a folder of them (one run per folder)", _conf_tb, _read_tb),
    "megatron-log": ("a Megatron-LM training log (stdout)", _conf_megatron, _read_megatron),
    "csv": ("a CSV or JSONL file with one row per step", _conf_csv, _read_csv),
}


#: kind -> (help, configure(parser), run(args) -> exit code): kinds with their own transaction.
RUNNERS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[..., int]]] = {}


def _conf_bundle(p: argparse.ArgumentParser) -> None:
    """`k2repro import bundle DIR`'s options."""
    p.description = ("Verify a release bundle (k2repro export) and add its run(s) to the store, with "
                     "the shipped checkpoints and data, so that `k2repro replay` works there. A bundle "
                     "that fails verification is refused (exit 2) and nothing is written.")
    p.add_argument("path", metavar="DIR", help="the bundle folder")
    p.add_argument("--store", default=None, help="store root (default: $K2REPRO_STORE, else runs)")
    p.add_argument("--key", default=None, metavar="PUB",
                   help="the publisher's ed25519 public key: refuse a bundle that is not signed with it")
    p.add_argument("--json", action="store_true", help='print {"run_ids": [...], ...} as JSON to stdout')


def _run_bundle(args: argparse.Namespace) -> int:
    """Verify, import (`k2repro.bundle.importer`), print the run ids and every path rewrite."""
    from k2repro.bundle.importer import import_bundle

    out = import_bundle(args.path, args.store,
                        progress=None if args.json else (lambda m: print(f"import: {m}", file=sys.stderr)),
                        key=args.key)
    if args.json:
        print(json.dumps(jsonable(out)))
        return 0
    for rid in out["run_ids"]:
        print(f"run_id={rid} (imported into {out['folder']})")
    for rid, rw in out["rewrites"].items():
        for key, (old, new) in rw.items():
            print(f"  {rid}: {key}: {old} -> {new}")
    return 0


RUNNERS["bundle"] = ("a release bundle written by `k2repro export` (verified, then added with its "
                     "checkpoints and data so that replay works)", _conf_bundle, _run_bundle)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Import a run trained elsewhere into the audit store (source import:<kind>), so that "
        "sql, diff and forensics work on it. Malformed input: one error naming the file and "
        "line, exit 2, nothing written. The same content imported again is reported, not "
        "duplicated. Restart segments and forks among the runs of one import are linked into "
        "one lineage (--stitch, --no-stitch, --parent). See docs/importers.md.")
    sub = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind, (help_, conf, _) in {**KINDS, **RUNNERS}.items():
        conf(sub.add_parser(kind, help=help_, description=help_))


def run(args: argparse.Namespace) -> int:
    from k2repro.core.layout import default_store
    from k2repro.importers.names import NameMap
    from k2repro.importers.transaction import commit_runs

    if args.kind in RUNNERS:
        return RUNNERS[args.kind][2](args)
    if args.kind not in KINDS:  # pragma: no cover - argparse's choices guard this
        raise BadInputError(f"unknown import kind {args.kind!r}")
    from k2repro.importers import stitch

    names = NameMap.build(args.map)
    runs, options = KINDS[args.kind][2](args, names)
    options = {"kind": args.kind, "map": names.user_pairs(), **options}
    store = Path(args.store) if args.store else default_store()
    name = args.name or Path(args.path).name
    # Linking is decided here, from this import's runs only (importers/stitch.py); a store run
    # becomes a parent only when --parent names it.
    links = stitch.plan(runs, args.stitch)
    if args.parent is not None:
        links = [*links, stitch.link_to_store(store, runs, links, args.parent)]
    results = commit_runs(store, runs, name, options, links=links)
    if args.json:
        parent_of = _parents(results, runs, links)
        rows = [{**r.as_dict(), "parent_run_id": parent_of.get(r.run_id, (None, None))[0],
                 "resumed_from_step": parent_of.get(r.run_id, (None, None))[1]} for r in results]
        json.dump({"run_ids": [r.run_id for r in results], "runs": rows, "store": str(store)},
                  sys.stdout)
        sys.stdout.write("\n")
        return 0
    parent_of = _parents(results, runs, links)
    for r in results:
        state = "imported" if r.created else "already imported"
        link = f" parent={parent_of[r.run_id][0]} resumed_from_step={parent_of[r.run_id][1]}" \
            if r.run_id in parent_of else ""
        print(f"run_id={r.run_id} name={r.name} steps={r.steps}{link} ({state})")
    return 0


def _parents(results: list[Any], runs: list[Any], links: list[Any]) -> dict[str, tuple[str, int]]:
    """run id -> (parent run id, resume step) of each linked run, for the printed summary."""
    out = {}
    for lk in links:
        parent = lk.external if lk.parent is None else results[lk.parent].run_id
        out[results[lk.child].run_id] = (parent, lk.resumed_from_step)
    return out
