"""Process-group set-up for torchrun / SLURM / single process.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT); SLURM
sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID. With neither, this is a
single process and no process group is created. NCCL on CUDA, gloo on CPU.

A process group exists when there are several processes, and also for a
single process launched by torchrun (``--nproc_per_node=1``): as in the
official code, such a run goes through DDP (and SyncBatchNorm on CUDA), so
one GPU exercises the multi-GPU path (`make gpu-check` does).
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.run_lock import RunLock


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: bool = False  # a process group exists (several processes, or one under torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether this run is distributed: DDP wrappers, collectives, SyncBatchNorm on CUDA."""
        return self.world_size > 1 or self.group


def free_port() -> int:
    """A TCP port of the loopback interface that is free now (for a local torchrun or a one-process group)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env_int(*names: str) -> int | None:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return None


def init_distributed() -> DistInfo:
    """Join the process group described by the environment (if any)."""
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1
    rank = _env_int("RANK", "SLURM_PROCID") or 0
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    group = world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ  # TORCHELASTIC_RUN_ID: set by torchrun
    if group and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", world_size=world_size, rank=rank)
    return DistInfo(rank, world_size, local_rank, device, group=group)


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor)
    return tensor.item() / info.world_size


def all_reduce_max(value: float, info: DistInfo) -> float:
    """The largest ``value`` over the processes (the same answer on every rank)."""
    if not info.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


@contextmanager
def main_process_lock(folder, purpose: str, info: DistInfo):
    """Rank 0 holds the run folder's lock (`common.run_lock`) for the block; every rank stops when rank 0 is
    refused (rank 0 with the error naming the holder, the others with exit status 2 and no message).
    Yields the lock on rank 0, None on the others."""
    lock, error = None, None
    if info.is_main:
        try:
            lock = RunLock.acquire(folder, purpose)
        except Exception as caught:  # noqa: BLE001 - every rank must learn of it before anyone raises
            error = caught
    if all_reduce_max(float(error is not None), info) > 0:
        if error is not None:
            raise error
        raise SystemExit(2)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
