"""Process group from the torchrun environment (or a single process without it)."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def die_with_launcher() -> None:
    """Under torchrun, each worker runs in its own session: a SIGKILL of the job's process group
    reaches the launcher but not the workers, which would train on as orphans. Ask the kernel to
    SIGKILL this worker when its parent dies (Linux; a no-op elsewhere)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        parent = os.getppid()
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)
    except OSError:
        pass


def init_distributed(backend: str = "auto") -> DistInfo:
    """Join the process group that torchrun set up (RANK/WORLD_SIZE/MASTER_ADDR in the env).

    World size 1 without torchrun needs no process group at all. The device is CUDA (one GPU per
    local rank) when available, else CPU; `auto` picks nccl for CUDA and gloo for CPU.
    """
    die_with_launcher()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and backend != "gloo":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=10),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj, info: DistInfo):  # noqa: ANN001, ANN201
    """Rank 0's object on every rank (one-off set-up values such as the run id)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
