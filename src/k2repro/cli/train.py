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
import signal
import subprocess
import sys
import tempfile
import threading

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
    from k2repro.model.build import build_model
    from k2repro.model.flops import flops_per_token
    from k2repro.model.llama import count_params

    model = build_model(cfg.model, cfg.train.seed, "meta")
    out = {"n_params": count_params(model), "flops_per_token": flops_per_token(cfg.model, cfg.train.seq_len),
           "config_hash": config_hash(cfg), "model": cfg.model.name}
    print(json.dumps(out))
    return 0


def run_raw(argv: list[str]) -> int:
    from k2repro.config.load import load_config, load_params_file, split_print_config, to_yaml
    from k2repro.core.ids import new_run_id
    from k2repro.train.launchenv import LaunchEnv

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
        from k2repro.train.run import run_training

        code, _, _ = run_training(cfg)
        return code
    run_id = new_run_id(cfg.run.name)
    with tempfile.TemporaryDirectory(prefix="k2repro-exit-") as tmp:
        launch = LaunchEnv(run_id=run_id, config_name=name, params_file=os.path.abspath(params) if params else None,
                           exit_file=os.path.join(tmp, "code"), stop_file=os.path.join(tmp, "stop"))
        env = dict(os.environ, **launch.to_environ(), OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "k2repro.train.launch", "--standalone", f"--nproc-per-node={nproc}",
               f"--shutdown-timeout={cfg.ckpt.grace_s}", "-m", "k2repro.train", *overrides]
        progress(f"launching {nproc} ranks (torchrun)")
        proc = _launch(cmd, env, os.path.join(tmp, "stop"))
        codes = []
        for f in glob.glob(os.path.join(tmp, "code.*")):
            try:
                codes.append(int(open(f).read().strip()))
            except ValueError:
                pass
    if proc.returncode == 0 or (len(codes) == nproc and max(codes) == 0):
        return 0  # every rank finished (a Ctrl-C after the last step stops nothing)
    return max(codes) if codes and max(codes) > 0 else proc.returncode


def progress(msg: str) -> None:
    """A phase line on stderr (stdout carries run_id= and the step lines)."""
    from k2repro.train.progress import phase

    phase(msg)


def _die_with_parent() -> None:
    """torchrun runs in its own process group (so a terminal's Ctrl-C reaches it once, through
    us); it must still die with us when we are killed outright (SIGKILL of our group)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: nothing to arm
        pass


def _launch(cmd: list[str], env: dict, stop_file: str) -> subprocess.Popen:
    """Start torchrun and wait for it. The first SIGINT/SIGTERM is forwarded exactly once
    (after creating `stop_file`, which tells the ranks that this SIGTERM asks for a clean stop,
    not torchrun stopping the survivors of a failed rank); torchrun passes it on to every rank
    and SIGKILLs ranks still alive after `ckpt.grace_s`. Later signals are ignored: the stop is
    already on its way, bounded by that grace period."""
    proc = subprocess.Popen(cmd, env=env, process_group=0, preexec_fn=_die_with_parent)
    sent: list[int] = []

    def forward(signum: int, frame) -> None:  # noqa: ANN001
        if sent:
            return
        sent.append(signum)
        open(stop_file, "w").close()
        proc.send_signal(signum)

    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        while True:
            try:
                proc.wait()
                break
            except InterruptedError:
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return proc


def run(args: argparse.Namespace) -> int:  # argparse path (unused: RAW_ARGS)
    return run_raw([f"--config-name={args.config_name}", *args.overrides])
