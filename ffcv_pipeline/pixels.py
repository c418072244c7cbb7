"""What both loaders (and the resident test split) share: normalization on the device, the fill
colour of padding and cutout, and the uint8 arrays the converter writes.

Imports numpy and torch only (no ffcv, numba or OpenCV): the torchvision loader and the app may
use it on hosts without ffcv.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class Normalize(torch.nn.Module):
    """uint8 NCHW (any memory format) -> ``dtype``, ``(x - mean) * (1 / std)``; keeps the layout.

    The arithmetic runs in float32 whatever ``dtype`` is, then the result is rounded once to
    ``dtype``: in bf16 the mean itself would round (to 129 / 124 / 112.5) and the values would
    be off by up to ~0.012 from the float32 ones. So a bf16 batch is exactly the float32
    normalization rounded to bf16 -- what autocast makes of the float32 values the app feeds
    the exported model (``app.images.normalize`` runs the same float32 operations).
    """

    def __init__(self, mean, std, dtype=torch.float16):
        super().__init__()
        self.dtype = dtype
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer('inv_std', 1 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self._cache: dict = {}

    def _consts(self, device):
        if device not in self._cache:  # once per device, not per batch; float32 on purpose
            self._cache[device] = (self.mean.to(device), self.inv_std.to(device))
        return self._cache[device]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self._consts(x.device)
        x = x.to(torch.float32, copy=True).sub_(mean).mul_(inv_std)  # never the caller's tensor
        return x if self.dtype == torch.float32 else x.to(self.dtype)


def normalization_table(mean, std) -> np.ndarray:
    """(256, channels) float32: :class:`Normalize`'s own arithmetic -- float32
    ``(v - mean) * (1 / std)`` -- for every uint8 value ``v``. FFCV's CPU pipeline looks values
    up here, so every path gives the same bits for the same pixel (a
    table computed in float64, as FFCV's ``NormalizeImage`` is, differs by 1 ulp in places)."""
    v = np.arange(256, dtype=np.float32)[:, None]
    inv_std = np.float32(1) / np.asarray(std, np.float32)  # IEEE float32, as torch's 1 / std
    return (v - np.asarray(mean, np.float32)) * inv_std


def fill_colour(mean) -> tuple[int, int, int]:
    """Padding/cutout fill the mean colour: zero after normalization, as in FFCV's CIFAR example."""
    return tuple(int(round(m)) for m in mean)


def load_arrays(path: str | Path) -> np.ndarray:
    """A split's structured array (fields ``image`` (H, W, 3) uint8, ``label``, maybe ``coarse_label``),
    memory-mapped: workers share the page cache instead of copying 150 MB each."""
    return np.load(path, mmap_mode='r')
