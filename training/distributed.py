"""Distributed mode from the ``torchrun`` environment (RANK / WORLD_SIZE / LOCAL_RANK).

    torchrun --nproc_per_node N scripts/train.py --config rn18.yaml

NCCL on CUDA, gloo on the CPU. Only rank 0 (``is_main``) writes logs and checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> DistInfo:
    if 'RANK' not in os.environ:
        return DistInfo()
    return DistInfo(int(os.environ['RANK']), int(os.environ.get('WORLD_SIZE', 1)),
                    int(os.environ.get('LOCAL_RANK', 0)))


def init(info: DistInfo, device: torch.device) -> None:
    if info.enabled and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                rank=info.rank, world_size=info.world_size)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place; a no-op when not distributed)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Copy ``src``'s buffers (BatchNorm running statistics) to every rank (no-op alone)."""
    if is_distributed():
        for b in model.buffers():
            dist.broadcast(b, src)


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any rank (stop together on NaN or Ctrl-C)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)

