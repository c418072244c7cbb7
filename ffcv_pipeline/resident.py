"""The test split as one uint8 tensor on the device: evaluation without a loader.

    test = ResidentSplit.from_file('data_beton/cifar100/cifar100_test.beton', device=dev,
                                   dtype=torch.bfloat16, batch_size=512, mean=ds.mean, std=ds.std)
    for x, y in test.epoch(0): ...   # normalized channels-last batches of exactly 512 images

10,000 CIFAR images are 30 MB (at 64x64, 120 MB): they fit on any device, so evaluation needs no second FFCV
pipeline (whose numba JIT costs ~1 s per process) and no loading thread. Every batch has the
same shape -- the training batch size -- so cuDNN tunes no second set of kernels; the last
batch is padded with blank images whose label is :data:`PAD_LABEL` (-1), which no prediction
matches and which the evaluation does not count (``(y >= 0).sum()``). Normalization is the
loaders' own :class:`~ffcv_pipeline.pixels.Normalize` (float32 arithmetic, one cast to the
dtype) on the channels-last view of each uint8 batch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .pixels import Normalize, load_arrays

PAD_LABEL = -1


def read_split(path: str | Path, indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC images, int64 labels) of a ``.beton`` (raw images) or ``.npy`` split."""
    path = Path(path)
    if path.suffix == '.beton':
        from .beton import read_beton_images
        return read_beton_images(path, indices)
    rows = load_arrays(path)
    rows = rows if indices is None else rows[np.asarray(indices)]
    return np.ascontiguousarray(rows['image']), rows['label'].astype(np.int64)


class ResidentSplit:
    """A split held on ``device``; the loader interface (``epoch``, ``len``, ``num_samples``,
    ``close``) with fixed-shape, padded batches."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, device: torch.device,
                 dtype: torch.dtype, batch_size: int, mean, std, channels_last: bool = True):
        n = len(labels)
        self.batch_size, self.channels_last, self.num_samples = batch_size, channels_last, n
        padded = -(-n // batch_size) * batch_size if n else 0
        x = np.zeros((padded, *images.shape[1:]), np.uint8)
        x[:n] = images
        y = np.full(padded, PAD_LABEL, np.int64)
        y[:n] = labels
        self.x = torch.from_numpy(x).to(device)  # NHWC uint8: 3 KB per image
        self.y = torch.from_numpy(y).to(device)
        self.normalize = Normalize(mean, std, dtype)

    @classmethod
    def from_file(cls, path: str | Path, *, indices: np.ndarray | None = None, **kw) -> 'ResidentSplit':
        images, labels = read_split(path, indices)
        return cls(images, labels, **kw)

    def epoch(self, epoch: int = 0):
        """Normalized NCHW batches (channels-last memory unless configured otherwise) and labels;
        the same every epoch (the test split is not augmented)."""
        for i in range(0, len(self.y), self.batch_size):
            x = self.normalize(self.x[i:i + self.batch_size].permute(0, 3, 1, 2))  # channels-last
            if not self.channels_last:
                x = x.contiguous()
            yield x, self.y[i:i + self.batch_size]

    def __len__(self) -> int:
        return len(self.y) // self.batch_size if self.batch_size else 0

    def close(self) -> None:
        """Nothing runs in the background."""
