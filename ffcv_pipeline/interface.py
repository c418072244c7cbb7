"""What the trainer iterates: one interface for the FFCV loader, the torch loader and the
resident test split.

    for x, y in batches.epoch(3): ...   # normalized NCHW batches on the device, int64 labels
    len(batches)                        # batches per epoch
    batches.num_samples                 # images per epoch *of this process* (its torchrun shard)
    batches.close()                     # stop whatever runs in the background

Implemented by :class:`ffcv_pipeline.loaders.CifarLoader`, :class:`ffcv_pipeline.torch_loader.TorchLoader`
and :class:`ffcv_pipeline.resident.ResidentSplit`; tests/test_loaders.py checks all three
against it. A new loader is one class with these four members and one branch in
``ffcv_pipeline/data.py``.
"""
from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

import torch


@runtime_checkable
class Batches(Protocol):
    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch`` (a function of (seed, epoch): resumable); leaving the
        iterator early stops its background work."""

    def __len__(self) -> int:
        """Batches per epoch."""

    @property
    def num_samples(self) -> int:
        """Images one epoch shows this process (a torchrun rank sees its shard only)."""

    def close(self) -> None:
        """End background work (worker processes) now, not at garbage collection."""
