"""Multi-process training with PyTorch's own DistributedDataParallel, launched by ``torchrun``.

``torchrun --nproc_per_node N -m lcs train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; we read
them (as nanoGPT does), join the process group (NCCL on GPUs, gloo on CPU), and the trainer
wraps the model in DDP. α needs no communication: every rank derives it from the shared seed and
the step. Each rank takes its slice of the same global batch, so N processes compute what one
process would with the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "shutdown_distributed"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group if launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(local)
    return DistInfo(rank, world, local)


def shutdown_distributed(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
