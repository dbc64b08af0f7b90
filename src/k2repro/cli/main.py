"""`k2repro` entry point: a thin dispatcher.

Each command lives in its own module `k2repro.cli.<module>` exposing
`configure(parser)` and `run(args) -> int`; only the chosen module is imported, so commands
that do not train never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from k2repro.errors import K2ReproError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train a model (Hydra overrides: key=value ...)"),
    "verify-checkpoint": ("verify_checkpoint", "check a checkpoint's manifest (sha256 of every file)"),
    "runs": ("runs", "list the runs in a store"),
    "sql": ("sql", "read-only SQL over the audit store (DuckDB)"),
    "data": ("data", "data pipeline stages: prepare, dedup, tokenize, pack"),
    "replay": ("replay", "re-run a step range and prove it reproduces bit for bit"),
    "diff": ("diff", "where and why two runs part"),
    "batch": ("batch", "the samples of one step, with their text"),
    "forensics": ("forensics", "find, classify and explain loss spikes"),
    "report": ("report", "the run report (training, evals, spikes)"),
    "eval": ("eval", "evaluate every checkpoint of a run"),
    "import": ("importcmd", "import runs trained elsewhere (W&B, TensorBoard, Megatron, CSV)"),
    "export": ("export", "bundle a run for release"),
    "verify-bundle": ("verify_bundle", "check a release bundle's checksums"),
    "gc": ("gc", "remove runs from a store, compact segments"),
    "verify-store": ("verify_store", "read every segment whole (page checksums) and find deleted ones"),
    "ui": ("ui", "a live run browser over the store (local web app, read-only)"),
}


def available() -> dict[str, tuple[str, str]]:
    return {
        name: spec
        for name, spec in COMMANDS.items()
        if importlib.util.find_spec(f"k2repro.cli.{spec[0]}") is not None
    }


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="k2repro",
        description="Reproducibility and audit toolkit for LLM pretraining. "
        "Exit codes: 0 ok, 1 verification failed, 2 bad input, 3 spike guard abort.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in available().items():
        p = sub.add_parser(name, help=help_, description=help_)
        if only is None or only == name:
            importlib.import_module(f"k2repro.cli.{module}").configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = available()
    chosen = argv[0] if argv and argv[0] in cmds else None
    parser = build_parser(only=chosen or "__none__")
    if chosen is None:
        if argv and not argv[0].startswith("-"):
            print(f"k2repro: unknown command '{argv[0]}' (see k2repro --help)", file=sys.stderr)
            return 2
        if not argv:  # no command is a usage error (argparse's convention: help on stderr, exit 2)
            parser.print_help(sys.stderr)
            return 2
        parser.parse_args(argv)
        return 0
    from k2repro.logs import configure

    configure(f"k2repro {chosen}")
    module = importlib.import_module(f"k2repro.cli.{cmds[chosen][0]}")
    try:
        if getattr(module, "RAW_ARGS", False):
            return int(module.run_raw(argv[1:]) or 0)
        args = parser.parse_args(argv)
        return int(module.run(args) or 0)
    except K2ReproError as exc:
        from k2repro.audit.redact import scrub_text

        print(f"k2repro {chosen}: error: {scrub_text(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
