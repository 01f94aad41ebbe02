"""Distributed data parallel through PyTorch's own launcher (``torchrun``), nothing home-made.

Under ``torchrun --nproc-per-node N`` the environment carries ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
the same roimae command then trains with :class:`torch.nn.parallel.DistributedDataParallel` (gloo on CPU,
NCCL on GPU) and only rank 0 writes outputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def env_rank() -> int:
    """The global rank of this process from the torchrun environment (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """Number of processes from the torchrun environment (1 when not distributed)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class DistributedContext:
    """Rank, world size and the device of this process."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @classmethod
    def setup(cls, device: torch.device) -> DistributedContext:
        """Join the process group when launched by torchrun; pick this rank's GPU."""
        world_size = env_world_size()
        rank = env_rank()
        if world_size > 1:
            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(device)
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(rank=rank, world_size=world_size, device=device)

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in one process)."""
        if self.enabled:
            dist.barrier()

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (identity when not distributed)."""
        if self.enabled:
            values = values.clone()
            # gloo and NCCL both reduce float64 on CPU/GPU respectively.
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def shutdown(self) -> None:
        """Leave the process group, if one was joined."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
