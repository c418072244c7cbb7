"""The loader for hosts without ffcv (``data.loader: torchvision``): a torch ``DataLoader`` over
the uint8 arrays ``write_datasets.py`` stores beside the ``.beton`` files.

    loader = make_torch_loader('data_beton/cifar100/cifar100_train.npy', batch_size=512,
                               num_workers=8, device=torch.device('cuda'), dtype=torch.bfloat16,
                               seed=0, train=True, augment=dict(flip=True, translate=4, cutout=8),
                               mean=ds.mean, std=ds.std)
    for x, y in loader.epoch(3): ...   # normalized channels-last batches on the device

Same batches in distribution *and* in pixels as the FFCV loader: each worker augments a whole
batch with ``augment.augment_batch``, the very op bodies the FFCV JIT ops run (same hash, same draws
per (seed, epoch, sample)), ships uint8 through pinned memory, and the batch is normalized on
the device by the same :class:`Normalize`. The order is a permutation drawn from (seed, epoch),
so a resumed run sees the same batches. Imports torch and numpy only: no ffcv, numba or OpenCV.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .augment import augment_batch
from .pixels import Normalize, fill_colour, load_arrays


class _Batches(torch.utils.data.Dataset):
    """Fetches and augments a whole batch per call (``__getitems__``): numpy over 512 images at
    once instead of Python per image. Opens the array lazily, so spawned workers (macOS) get a
    path, not 150 MB of pickled pixels."""

    def __init__(self, path: Path, *, seed: int, augment: dict | None, fill=(0, 0, 0)):
        self.path, self.seed, self.augment, self.fill = Path(path), seed, augment, fill
        self._arrays = None

    def __len__(self) -> int:
        return len(self._data())

    def _data(self) -> np.ndarray:
        if self._arrays is None:
            self._arrays = load_arrays(self.path)
        return self._arrays

    def __getitems__(self, key):
        epoch, idx = key
        rows = self._data()[idx]  # sorted fancy index into the memory map: one copy
        x = rows['image']
        if self.augment:
            x = augment_batch(x, idx, seed=self.seed, epoch=epoch, augment=self.augment,
                              fill=self.fill)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(rows['label'].astype(np.int64))


class _EpochBatches(torch.utils.data.Sampler):
    """Batches of (epoch, indices): a permutation drawn from (seed, epoch) (or the given order),
    this rank's share of it (every ``world_size``-th), cut into batches."""

    def __init__(self, indices: np.ndarray, *, batch_size: int, shuffle: bool, seed: int,
                 drop_last: bool, rank: int = 0, world_size: int = 1):
        self.indices, self.batch_size, self.shuffle, self.seed = indices, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = 0
        self.per_rank = len(indices) // world_size if world_size > 1 else len(indices)

    def __len__(self) -> int:
        full, rest = divmod(self.per_rank, self.batch_size)
        return full if self.drop_last or not rest else full + 1

    def __iter__(self):
        order = self.indices
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        order = order[self.rank:self.per_rank * self.world_size:self.world_size]
        for b in range(len(self)):
            yield self.epoch, order[b * self.batch_size:(b + 1) * self.batch_size]


def _keep(batch):  # the dataset already returns the batch: no collation (picklable for spawn)
    return batch


def _worker_ignores_ctrl_c(_worker_id: int) -> None:
    """A terminal's Ctrl-C goes to the whole process group, loader workers included: a worker
    that died of it made the trainer's next batch fail ("DataLoader worker ... exited
    unexpectedly") instead of the clean stop at a batch boundary. The trainer handles Ctrl-C and
    ends its workers itself (``close``); they also exit when the trainer dies."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class TorchLoader:
    """The loader interface (``ffcv_pipeline.interface.Batches``) over a torch ``DataLoader``."""
    loader: torch.utils.data.DataLoader
    sampler: _EpochBatches
    device: torch.device
    normalize: Normalize
    channels_last: bool = True

    def epoch(self, epoch: int):
        """Normalized NCHW (channels-last) batches of ``epoch`` on the device, and labels."""
        self.sampler.epoch = epoch
        non_blocking = self.device.type == 'cuda'
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=non_blocking).permute(0, 3, 1, 2)  # NHWC = channels-last
            if not self.channels_last:
                x = x.contiguous()
            yield self.normalize(x), y.to(self.device, non_blocking=non_blocking)

    def __len__(self) -> int:
        return len(self.sampler)

    def close(self) -> None:
        """Stop the persistent worker processes now, not whenever the garbage collector frees
        the loader (a worker blocked on unread prefetched batches makes that wait 5 s each)."""
        it = getattr(self.loader, '_iterator', None)
        if it is not None:
            it._shutdown_workers()
            self.loader._iterator = None

    @property
    def num_samples(self) -> int:
        return min(len(self.sampler.indices), self.sampler.per_rank)

    @property
    def indices(self) -> np.ndarray:
        return self.sampler.indices


def make_torch_loader(path: str | Path, *, batch_size: int, num_workers: int, device: torch.device,
                      dtype: torch.dtype, seed: int, train: bool, augment: dict | None = None,
                      indices: np.ndarray | None = None, rank: int = 0, world_size: int = 1,
                      shuffle: bool | None = None, prefetch: int = 2, channels_last: bool = True,
                      mean, std) -> TorchLoader:
    """``train``: shuffled, ``drop_last``, augmented with ``augment`` ({op name: value}, ``augment.settings``,
    filled with the mean colour); else sequential and plain. ``indices``: a subset."""
    n = len(load_arrays(path))
    indices = np.arange(n) if indices is None else np.asarray(indices)
    if len(indices) and not 0 <= indices.min() <= indices.max() < n:
        raise ValueError(f'{path}: sample indices must lie in [0, {n - 1}]')
    aug = dict(augment) if train and augment else None
    sampler = _EpochBatches(indices, batch_size=batch_size, shuffle=train if shuffle is None else shuffle,
                            seed=seed, drop_last=train, rank=rank, world_size=world_size)
    loader = torch.utils.data.DataLoader(
        _Batches(path, seed=seed, augment=aug, fill=fill_colour(mean)), batch_sampler=sampler, collate_fn=_keep,
        num_workers=num_workers, pin_memory=device.type == 'cuda', worker_init_fn=_worker_ignores_ctrl_c,
        persistent_workers=num_workers > 0, prefetch_factor=prefetch if num_workers > 0 else None)
    return TorchLoader(loader, sampler, device, Normalize(mean, std, dtype), channels_last)
