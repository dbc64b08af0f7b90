"""DCP checkpoints with a sha256 manifest, written to a temporary folder and renamed.

Layout of `<base>/<run_id>/checkpoints/step_00000010/`:
- DCP files (`.metadata`, `__<rank>_<n>.distcp`): model + optimizer through
  get_state_dict/set_state_dict, so a checkpoint saved at one world size loads at another;
- `rank<r>.pt`: each rank's own state (RNG states, sampler, guard, step);
- `manifest.json`: sha256 and size of every file (each rank hashes the files it wrote),
  checked before anything is loaded. DCP writes `.metadata` last, and the folder appears under
  its final name only once the manifest is complete, so a crash leaves either a whole checkpoint
  or a `.step_*.tmp` folder that nothing loads.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from k2repro.core.ckpt_manifest import FORMAT, MANIFEST, list_checkpoints, verify_checkpoint  # noqa: F401
from k2repro.core.hashing import sha256_file
from k2repro.core.layout import step_of_dirname
from k2repro.errors import BadInputError


def find_checkpoint(target: str, base: Path) -> Path:
    """`train.resume=TARGET`: a checkpoint folder, or a run id whose newest checkpoint under
    `base` (the checkpoint root) is taken."""
    p = Path(target)
    if (p / MANIFEST).exists() or (p.is_dir() and step_of_dirname(p.name) is not None):
        return p
    hits = [d for d in base.glob(f"**/{target}/checkpoints") if d.is_dir()]
    found = [c for d in hits for c in list_checkpoints(d)]
    if not found:
        raise BadInputError(f"config key 'train.resume': no checkpoint of run '{target}' under {base}")
    return max(found)[1]


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    rank_state: dict, rank: int, world_size: int, meta: dict,
                    before_rename=None) -> dict:  # noqa: ANN001
    """Collective: every rank calls it. Returns the `checkpoints` row (on every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    t0 = time.perf_counter()
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    try:
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        if _is_dist():
            dist.barrier()
        msd, osd = get_state_dict(model, optimizer)
        with warnings.catch_warnings():  # world size 1: DCP warns that it saves in one process
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
        torch.save({**rank_state, "rng": rng_state()}, tmp / f"rank{rank}.pt")
        mine = sorted(
            f.name for f in tmp.iterdir()
            if f.name == f"rank{rank}.pt" or f.name.startswith(f"__{rank}_") or (rank == 0 and f.name == ".metadata")
        )
        hashes = {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size} for name in mine}
        if _is_dist():
            gathered: list = [None] * world_size
            dist.all_gather_object(gathered, hashes)
        else:
            gathered = [hashes]
        files: dict = {}
        for g in gathered:
            files.update(g)
        manifest = {"format": FORMAT, "step": meta["step"], "world_size": world_size, "files": files, **meta}
        if rank == 0:
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            if before_rename is not None:
                before_rename()
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        elif before_rename is not None:  # other ranks: their files written, before the final barrier
            before_rename()
        if _is_dist():
            dist.barrier()
    except BaseException as exc:
        # A failed save (a full disk, a lost peer) leaves no half-written folder behind and gives
        # its space back, so the run can still record why it failed. (SIGKILL runs no handler:
        # the `.tmp` name keeps such leftovers out of list_checkpoints.)
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = None
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        # torch.save reports a full disk as "unexpected pos ..." (PyTorch's zip writer): say it
        note = (f"writing checkpoint {path} failed" + ("" if free is None else
                f" with {free:,} bytes free on its filesystem{' (the disk is full)' if free < 1 << 20 else ''}"))
        if free is not None and free < 1 << 20:  # the disk, not the code: an OSError says so
            raise OSError(errno.ENOSPC, f"{note}: {type(exc).__name__}") from exc
        if not isinstance(exc, Exception):  # DCP's CheckpointException is a BaseException, which
            raise RuntimeError(f"{note}: {type(exc).__name__}") from exc  # `except Exception` misses
        if hasattr(exc, "add_note"):
            exc.add_note(f"k2repro: {note}")
        raise
    total = sum(int(v["bytes"]) for v in files.values())
    return {
        "step": int(meta["step"]), "path": str(path),
        "manifest_sha256": sha256_file(path / MANIFEST), "bytes": total,
        "save_s": time.perf_counter() - t0,
    }


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    rank: int, world_size: int) -> tuple[dict, dict]:
    """Verify, then load model + optimizer (resharding as needed) and this rank's state.
    Returns (manifest, rank_state). A checkpoint from another world size gives each rank the
    state of rank `rank % saved_world_size`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    manifest = verify_checkpoint(path)
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    saved_ws = int(manifest["world_size"])
    rank_state = torch.load(Path(path) / f"rank{rank % saved_ws}.pt", weights_only=False)
    return manifest, rank_state


def prune(directory: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    ckpts = list_checkpoints(directory)
    for _, d in ckpts[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)
