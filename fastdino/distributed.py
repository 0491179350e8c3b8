"""Process groups and the wrapping of student and teacher for data-parallel training."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistributedContext:
    """Who this process is: its rank, the world size and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls, device: torch.device | None = None) -> "DistributedContext":
        return cls(0, 1, device or torch.device("cpu"))

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average a metric over ranks (identity in a single process)."""
        if self.world_size == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world_size


def init_distributed(device_preference: str = "auto") -> DistributedContext:
    """Join the process group `torchrun` describes (NCCL on GPUs, gloo on CPU), or run as a single process."""
    use_cuda = torch.cuda.is_available() and device_preference != "cpu"
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        return DistributedContext.single(device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistributedContext(rank, world_size, device)


def wrap_networks(student: nn.Module, teacher: nn.Module, config, ctx: DistributedContext, fast) -> tuple[nn.Module, nn.Module]:
    """Single process: the networks as they are."""
    return student, teacher
