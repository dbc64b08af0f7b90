"""Hardware and software facts of one rank, captured once before step 1.

Everything is returned as `dict[str, str]` (the `env` table's key/value rows). Fast (well under
half a second after the first call: the package list is cached per process), never raises for a
missing tool: an absent GPU, git or torch is recorded as `absent`.
"""

from __future__ import annotations

import hashlib
import os
import platform
import socket
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from k2repro.audit.redact import REDACTED, is_secret_name
from k2repro.audit.runrow import launcher

ABSENT = "absent"

# Environment variables that change what a run computes or how it is launched.
ENV_PREFIXES = ("OMP_", "CUDA_", "NCCL_", "TORCH_", "K2REPRO_", "MKL_", "CUBLAS_", "CUDNN_",
                "PYTORCH_", "TORCHELASTIC_", "GLOO_", "KMP_", "OPENBLAS_", "HYDRA_", "SLURM_JOB_")
ENV_NAMES = ("PYTHONHASHSEED", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK",
             "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "CUDA_VISIBLE_DEVICES",
             "PYTHONOPTIMIZE")


def env_vars(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Relevant variables as `env.<NAME>`; every credential-looking variable is listed with
    its value REDACTED (its presence is a fact, its value is not)."""
    e = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for name in sorted(e):
        if is_secret_name(name):
            out[f"env.{name}"] = REDACTED
        elif name in ENV_NAMES or name.startswith(ENV_PREFIXES):
            out[f"env.{name}"] = e[name]
    return out


@lru_cache(maxsize=1)
def installed_packages() -> tuple[tuple[str, str], ...]:
    """(name, version) of every installed distribution, sorted; cached (importlib.metadata
    walks site-packages, which is the slow part of capture)."""
    from importlib import metadata

    seen: dict[str, str] = {}
    for dist in metadata.distributions():
        try:
            name = dist.metadata["Name"]
        except Exception:  # a broken .dist-info must not stop a run
            continue
        if name and name.lower() not in seen:
            seen[name.lower()] = dist.version or ""
    return tuple(sorted(seen.items()))


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    return res.stdout.decode("utf-8", errors="replace")


def git_diff_text(cwd: str | Path | None = None) -> str | None:
    """`git diff HEAD` of the working tree (None outside a git repository). Stored once per
    run (redacted) as an `events` row of kind `git_diff`."""
    return _git(["diff", "HEAD", "--no-color", "--no-ext-diff"], Path(cwd or Path.cwd()))


def dvc_managed_files(top: Path) -> tuple[list[str], list[str]]:
    """Tracked files DVC itself writes, relative to the repository top: (params files, outputs).
    Params: `params.yaml` (`dvc exp run -S` recomposes it), every other params file dvc.yaml
    names, and `dvc.lock`. Outputs: what the stages declare (outs, metrics, plots; DVC deletes
    them before a stage runs, so a git-tracked plot reads as deleted while training runs).
    Both empty outside a DVC project (there a params.yaml edit is an edit like any other)."""
    dvc_yaml = top / "dvc.yaml"
    if not dvc_yaml.is_file():
        return [], []
    params, outs = {"params.yaml", "dvc.lock"}, set()
    try:
        import yaml

        stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}
        for st in stages.values():
            st = st or {}
            for p in st.get("params") or []:
                if isinstance(p, dict):
                    params.update(str(k) for k in p)
            for kind in ("outs", "metrics", "plots"):
                for o in st.get(kind) or []:
                    outs.update(str(k) for k in (o if isinstance(o, dict) else [o]))
    except Exception:  # a dvc.yaml DVC itself would reject: the defaults still hold
        pass
    return sorted(params), sorted(outs - params)


def git_info(cwd: str | Path | None = None) -> dict[str, str]:
    """Commit, dirty flag (tracked files only) and the sha256 of `git diff HEAD`, over code:
    the params files DVC rewrites on every `dvc exp run` are recorded apart (`dvc.*`: which
    changed, and the sha256 of their diff) and so are the stage outputs DVC rewrites (results,
    not code), so two experiments of one commit differ in their params, which the hparams
    already show, and not in their code."""
    root = Path(cwd or Path.cwd())
    commit = _git(["rev-parse", "HEAD"], root)
    if commit is None:
        return {"git.commit": ABSENT, "git.dirty": ABSENT, "git.diff_sha256": ABSENT}
    top = Path((_git(["rev-parse", "--show-toplevel"], root) or str(root)).strip())
    managed, outputs = dvc_managed_files(top)
    code = ["--", ":/", *(f":(top,exclude){f}" for f in managed + outputs)] if managed else []
    status = _git(["status", "--porcelain", "--untracked-files=no", *code], root) or ""
    diff = _git(["diff", "HEAD", "--no-color", "--no-ext-diff", *code], root) or ""
    out = {
        "git.commit": commit.strip(),
        "git.dirty": "true" if status.strip() else "false",
        "git.diff_sha256": hashlib.sha256(diff.encode()).hexdigest(),
        "git.diff_bytes": str(len(diff.encode())),
    }
    if managed:
        spec = ["--", *(f":(top){f}" for f in managed)]
        changed = _git(["diff", "HEAD", "--name-only", *spec], root) or ""
        pdiff = _git(["diff", "HEAD", "--no-color", "--no-ext-diff", *spec], root) or ""
        out["dvc.params_changed"] = ",".join(sorted(changed.split())) or "none"
        out["dvc.params_diff_sha256"] = hashlib.sha256(pdiff.encode()).hexdigest()
        outs = _git(["diff", "HEAD", "--name-only", "--", *(f":(top){f}" for f in outputs)], root) if outputs else ""
        out["dvc.outs_changed"] = ",".join(sorted((outs or "").split())) or "none"
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or ABSENT


def _ram_bytes() -> str:
    try:
        import psutil

        return str(psutil.virtual_memory().total)
    except Exception:
        return ABSENT


def _nvidia_driver() -> str:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        for tok in text.split():
            if tok.count(".") >= 1 and tok.replace(".", "").isdigit():
                return tok
    except OSError:
        pass
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if res.returncode == 0 and res.stdout.strip():
            return res.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return ABSENT


SMI_FIELDS = ("ecc.mode.current", "clocks.sm", "clocks.max.sm", "clocks.mem", "power.limit",
              "pcie.link.gen.current", "persistence_mode")


def nvidia_smi_facts(index: int = 0) -> dict[str, str]:
    """ECC mode, clocks, power limit and link of one GPU, straight from the driver (nvidia-smi);
    empty where there is no such tool."""
    try:
        res = subprocess.run(["nvidia-smi", f"--id={index}", f"--query-gpu={','.join(SMI_FIELDS)}",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {}
    if res.returncode != 0 or not res.stdout.strip():
        return {}
    values = [v.strip() for v in res.stdout.strip().splitlines()[0].split(",")]
    return {f"gpu.{k}": v for k, v in zip(SMI_FIELDS, values)}


def torch_facts() -> dict[str, str]:
    """torch version, accelerator and determinism switches (absent without torch)."""
    try:
        import torch
    except Exception:
        return {"torch.version": ABSENT, "gpu.count": "0", "gpu.name": ABSENT}
    out = {
        "torch.version": str(torch.__version__),
        "torch.cuda": str(torch.version.cuda or ABSENT),
        "torch.num_threads": str(torch.get_num_threads()),
        "det.deterministic_algorithms": str(torch.are_deterministic_algorithms_enabled()).lower(),
        "det.deterministic_warn_only": str(torch.is_deterministic_algorithms_warn_only_enabled()).lower(),
        "det.cudnn_deterministic": str(torch.backends.cudnn.deterministic).lower(),
        "det.cudnn_benchmark": str(torch.backends.cudnn.benchmark).lower(),
        "det.matmul_tf32": str(torch.backends.cuda.matmul.allow_tf32).lower(),
        "det.cudnn_tf32": str(torch.backends.cudnn.allow_tf32).lower(),
        "det.float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    cuda = torch.cuda.is_available()
    if not cuda:
        out.update({"gpu.count": "0", "gpu.name": ABSENT, "gpu.memory_bytes": ABSENT,
                    "gpu.driver": ABSENT, "cudnn.version": ABSENT, "nccl.version": ABSENT})
        return out
    n = torch.cuda.device_count()
    props = [torch.cuda.get_device_properties(i) for i in range(n)]
    names = sorted({p.name for p in props})
    out.update({
        "gpu.count": str(n),
        "gpu.name": ", ".join(names),
        "gpu.memory_bytes": str(props[0].total_memory) if props else ABSENT,
        "gpu.capability": f"{props[0].major}.{props[0].minor}" if props else ABSENT,
        "gpu.driver": _nvidia_driver(),
        "cudnn.version": str(torch.backends.cudnn.version() or ABSENT),
    })
    out.update(nvidia_smi_facts(torch.cuda.current_device()))
    try:
        v = torch.cuda.nccl.version()
        out["nccl.version"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:
        out["nccl.version"] = ABSENT
    return out


def capture_facts(rank: int, world_size: int, extra: dict | None = None,
                  cwd: str | Path | None = None) -> dict[str, str]:
    """Facts of this rank as `env` rows: host, OS, CPU, RAM, GPU, CUDA/cuDNN/NCCL, torch,
    Python, packages (`pkg.<name>`), git, launcher, env vars (redacted), determinism."""
    from k2repro import __version__

    facts: dict[str, str] = {
        "host": socket.gethostname(),
        "os": platform.platform(),
        "os.kernel": platform.release(),
        "python": platform.python_version(),
        "python.implementation": platform.python_implementation(),
        "python.executable": sys.executable,
        "cpu.model": _cpu_model(),
        "cpu.count": str(os.cpu_count() or 0),
        "cpu.machine": platform.machine(),
        "ram.bytes": _ram_bytes(),
        "pid": str(os.getpid()),
        "rank": str(rank),
        "world_size": str(world_size),
        "launcher": launcher(),
        "k2repro.version": __version__,
    }
    try:
        facts["cpu.affinity"] = str(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        pass
    facts.update(torch_facts())
    facts.update(git_info(cwd))
    for name, version in installed_packages():
        facts[f"pkg.{name}"] = version
    facts.update(env_vars())
    for k, v in (extra or {}).items():
        facts[str(k)] = REDACTED if is_secret_name(str(k)) else str(v)
    return facts
