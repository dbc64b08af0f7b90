"""`k2repro train [--config-name NAME] [key=value ...]`.

Validates the config in this process (bad values exit 2 before any worker starts), then trains
in-process at world size 1 or launches `torchrun --standalone` for `parallel.nproc > 1` (its
own free port, so concurrent runs never collide).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

from k2repro.errors import ConfigError

RAW_ARGS = True

HELP = """usage: k2repro train [--config-name NAME] [key=value ...]

Train with Hydra overrides, e.g.
  k2repro train model=tiny train.max_steps=50 parallel.nproc=2 audit.store=runs
  k2repro train train.resume=<run_id>              # continue from its newest checkpoint
  k2repro train model=k2_65b train.dry_run=true    # build on the meta device, print JSON
  k2repro train +run.tags.team=pretrain            # free-form tags

--config-name NAME   top-level config in conf/ (default: config)
--params FILE        a composed config as YAML instead of conf/ (the DVC stage reads params.yaml,
                     so that `dvc exp run -S key=value` reaches training)
--print-config       print the resolved config as YAML and exit (Hydra's `--cfg job` works too)
Prints run_id=<id>. Exit codes: 0 ok, 2 bad config or input, 3 spike guard abort.
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="Hydra overrides key=value")
    parser.add_argument("--config-name", default="config")


def _split(argv: list[str]) -> tuple[str, list[str], str | None]:
    name = "config"
    params: str | None = None
    rest: list[str] = []
    it = iter(argv)
    for a in it:
        if a in ("-h", "--help"):
            print(HELP)
            raise SystemExit(0)
        if a == "--config-name":
            name = next(it, "")
        elif a.startswith("--config-name="):
            name = a.split("=", 1)[1]
        elif a == "--params":
            params = next(it, "")
        elif a.startswith("--params="):
            params = a.split("=", 1)[1]
        elif a.startswith("-"):
            raise ConfigError(f"unknown option '{a}' (overrides are key=value; see k2repro train --help)")
        else:
            rest.append(a)
    return name, rest, params


def dry_run(cfg) -> int:  # noqa: ANN001
    from k2repro.config.load import config_hash
    from k2repro.model.flops import flops_per_token
    from k2repro.model.llama import count_params
    from k2repro.train.trainer import build_model

    model = build_model(cfg, "meta")
    out = {"n_params": count_params(model), "flops_per_token": flops_per_token(cfg.model, cfg.train.seq_len),
           "config_hash": config_hash(cfg), "model": cfg.model.name}
    print(json.dumps(out))
    return 0


def run_raw(argv: list[str]) -> int:
    from k2repro.config.load import load_config, load_params_file, split_print_config, to_yaml
    from k2repro.train.ids import new_run_id

    argv, show = split_print_config(argv)
    name, overrides, params = _split(argv)
    cfg = load_params_file(params, overrides) if params else load_config(overrides, name)
    if show:
        print(to_yaml(cfg), end="")
        return 0
    if cfg.train.dry_run:
        return dry_run(cfg)
    nproc = cfg.parallel.nproc
    if nproc == 1 or "RANK" in os.environ:
        from k2repro.train.trainer import run_training

        code, _, _ = run_training(cfg)
        return code
    run_id = new_run_id(cfg.run.name)
    with tempfile.TemporaryDirectory(prefix="k2repro-exit-") as tmp:
        env = dict(os.environ, K2REPRO_RUN_ID=run_id, K2REPRO_CONFIG_NAME=name,
                   **({"K2REPRO_PARAMS_FILE": os.path.abspath(params)} if params else {}),
                   K2REPRO_EXIT_FILE=os.path.join(tmp, "code"), OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "k2repro.train", *overrides]
        proc = subprocess.run(cmd, env=env)
        codes = []
        for f in glob.glob(os.path.join(tmp, "code.*")):
            try:
                codes.append(int(open(f).read().strip()))
            except ValueError:
                pass
    if proc.returncode == 0:
        return 0
    return max(codes) if codes and max(codes) > 0 else proc.returncode


def run(args: argparse.Namespace) -> int:  # argparse path (unused: RAW_ARGS)
    return run_raw([f"--config-name={args.config_name}", *args.overrides])
