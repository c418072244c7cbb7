"""FFCV loaders: JIT crop/flip/cutout on uint8, normalization on the device.

    train: decode -> flip -> translate(pad 4) -> cutout -> to tensor -> to device (non-blocking)
           -> channels-last torch image -> fp16/bf16/fp32 -> (x - mean) / std on the device
    test:  decode -> to tensor -> to device -> channels-last -> dtype -> normalize

All augmentation runs in numba-compiled ops on uint8 (``ops.py``); it is faster to move uint8
to the device and convert there than to ship floats. On the CPU there is no device copy, and
normalization is our cached-kernel ``ops.NormalizeToFloat`` (a lookup table, float32 out;
autocast handles bf16).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from . import load_ffcv

load_ffcv()  # before any other ffcv import: ~2.5 s faster (see load_ffcv)

from ffcv.fields.basics import IntDecoder  # noqa: E402
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import Convert, Squeeze, ToDevice, ToTensor, ToTorchImage

from .ffcv_patches import apply_loader_patches, stable_quasi_random
from .augment import active
from .ops import AugmentationState, AugmentOp, NormalizeToFloat
from .pixels import Normalize, fill_colour, normalization_table

ORDERS = {'quasi_random': OrderOption.QUASI_RANDOM, 'random': OrderOption.RANDOM,
          'sequential': OrderOption.SEQUENTIAL}


def _tail(device: torch.device, dtype: torch.dtype, mean, std, channels_last: bool,
          normalize: bool = True) -> list:
    if not normalize:  # uint8 torch images (the benchmark's augmentation-only figure)
        return [ToTensor(), *([ToDevice(device, non_blocking=True)] if device.type != 'cpu' else []),
                ToTorchImage(channels_last=channels_last)]
    if device.type == 'cpu':
        # On the CPU the "device" is the CPU: a numba op writes normalized float32 NHWC in one
        # pass through a per-channel lookup table (as FFCV's NormalizeImage, 2.6x faster than the
        # same maths in torch ops: docs/BENCHMARKS.md), with a kernel numba caches on disk.
        # Autocast (bf16) takes float32 inputs.
        return [NormalizeToFloat(normalization_table(mean, std)), ToTensor(),
                ToTorchImage(channels_last=channels_last)]
    # On a GPU, ship uint8 (4x fewer bytes than float32) and normalize there.
    return [ToTensor(), ToDevice(device, non_blocking=True),
            ToTorchImage(channels_last=channels_last), Normalize(mean, std, dtype)]


def label_pipeline(*, device: torch.device) -> list:
    ops = [IntDecoder(), ToTensor()]
    if device.type != 'cpu':
        ops.append(ToDevice(device, non_blocking=True))
    return ops + [Squeeze(1), Convert(torch.int64)]  # dim 1 only: a last batch of 1 stays 1-D


def augmentation(state: AugmentationState, augment: dict, *, image_size: int, fill,
                 ffcv_builtin: bool = False) -> list:
    """The ops ``augment`` ({op name: value}, ``augment.settings``) turns on, in order, one FFCV
    op each. ``ffcv_builtin``: FFCV's own version of each op instead, where it has one (not
    reproducible: the benchmark's comparison only)."""
    ops = []
    for o, params in active(augment, image_size, fill):
        value = augment[o.name]
        if ffcv_builtin:
            if o.ffcv_builtin is not None:
                ops.append(o.ffcv_builtin(value, image_size, tuple(fill)))
        else:
            ops.append(AugmentOp(state, o, params))
    return ops


def train_pipeline(*, device: torch.device, dtype: torch.dtype, state: AugmentationState, mean, std,
                   image_size: int, channels_last: bool = True, normalize: bool = True,
                   ffcv_builtin: bool = False, **augment) -> dict[str, list]:
    """The training augmentation (``augment``: {op name: value}, the config's ``augment`` section
    through ``augment.settings``, one source). ``normalize=False`` ends at uint8 torch images;
    ``ffcv_builtin``: see :func:`augmentation`."""
    image = [SimpleRGBImageDecoder(),
             *augmentation(state, augment, image_size=image_size, fill=fill_colour(mean),
                           ffcv_builtin=ffcv_builtin),
             *_tail(device, dtype, mean, std, channels_last, normalize)]
    return {'image': image, 'label': label_pipeline(device=device)}


def test_pipeline(*, device: torch.device, dtype: torch.dtype, mean, std,
                  channels_last: bool = True) -> dict[str, list]:
    return {'image': [SimpleRGBImageDecoder()] + _tail(device, dtype, mean, std, channels_last),
            'label': label_pipeline(device=device)}


apply_loader_patches()  # FFCV's loading thread, repaired for early exits (ffcv_patches.py)


@dataclass
class CifarLoader:
    """An FFCV ``Loader`` whose order *and* augmentation are a function of the epoch number,
    so a resumed run sees exactly the batches an uninterrupted one would."""
    loader: Loader
    state: AugmentationState | None = None

    def epoch(self, epoch: int):
        """The batches of ``epoch``. Closing the generator early (``break``, an exception) stops
        and *joins* FFCV's loading thread, so no two loaders ever run numba code at once
        (numba's workqueue threading layer, used where TBB is missing, aborts on that)."""
        self.loader.next_epoch = epoch
        if self.state is not None:
            self.state.set_epoch(epoch)
        it = iter(self.loader)
        try:
            for batch in it:  # not `yield from`: closing would close FFCV's thread twice
                yield batch
        finally:
            it.close()
            if it.is_alive() and it is not threading.current_thread():
                it.join()
        if getattr(it, 'error', None) is not None:  # the thread died: the epoch was cut short
            raise RuntimeError(f'FFCV loading failed: {type(it.error).__name__}: {it.error}') from it.error

    def __len__(self) -> int:
        return len(self.loader)

    def close(self) -> None:
        """Nothing to stop: every epoch's thread ends (or is joined) with the epoch."""

    @property
    def num_samples(self) -> int:
        """This process's images per epoch: under torchrun FFCV's order holds this rank's share."""
        return len(self.loader.first_traversal_order)

    @property
    def indices(self) -> np.ndarray:
        return self.loader.indices


def make_loader(path: str, *, batch_size: int, num_workers: int, order: str, os_cache: bool,
                drop_last: bool, pipelines: dict, distributed: bool = False, seed: int = 0,
                indices: Sequence[int] | None = None, batches_ahead: int = 3,
                state: AugmentationState | None = None) -> CifarLoader:
    if order not in ORDERS:
        raise ValueError(f'loader order {order!r} is not one of {sorted(ORDERS)}')
    if distributed and order == 'quasi_random':
        order = 'random'  # FFCV has no distributed quasi-random order
    loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers,
                    order=ORDERS[order], os_cache=os_cache, drop_last=drop_last,
                    distributed=distributed, seed=seed,
                    indices=None if indices is None else np.asarray(indices),
                    pipelines={**pipelines, 'coarse_label': None}, batches_ahead=batches_ahead)
    n = loader.reader.num_samples
    if indices is not None and len(loader.indices) and not 0 <= loader.indices.min() <= loader.indices.max() < n:
        # FFCV does not check: it would read out of bounds (a segfault, not an error)
        raise ValueError(f'{path}: sample indices must lie in [0, {n - 1}]')
    stable_quasi_random(loader)  # the same order for epoch e, whatever came before (ffcv_patches.py)
    return CifarLoader(loader, state)
