"""FFCV loaders for CIFAR-100: JIT crop/flip/cutout on uint8, normalization on the device.

    train: decode -> flip -> translate(pad 4) -> cutout -> to tensor -> to device (non-blocking)
           -> channels-last torch image -> fp16/bf16/fp32 -> (x - mean) / std on the device
    test:  decode -> to tensor -> to device -> channels-last -> dtype -> normalize

All augmentation runs in numba-compiled ops on uint8 (``ops.py``); it is faster to move uint8
to the device and convert there than to ship floats. On the CPU there is no device copy, and
normalization is FFCV's numba ``NormalizeImage`` (float32 out; autocast handles bf16).
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from . import load_ffcv

load_ffcv()  # before any other ffcv import: ~2.5 s faster (see load_ffcv)

from ffcv.fields.basics import IntDecoder  # noqa: E402
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
import ffcv.loader.epoch_iterator as _epoch_iterator_module
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.transforms import Convert, Squeeze, ToDevice, ToTensor, ToTorchImage
from ffcv.traversal_order import QuasiRandom
import ffcv.traversal_order.quasi_random as _quasi_random_module

from .constants import CIFAR100_MEAN, CIFAR100_STD
from .ops import AugmentationState, Cutout, NormalizeToFloat, RandomHorizontalFlip, RandomTranslate
from .torch_loader import Normalize, fill_colour, normalization_table

ORDERS = {'quasi_random': OrderOption.QUASI_RANDOM, 'random': OrderOption.RANDOM,
          'sequential': OrderOption.SEQUENTIAL}


def _tail(device: torch.device, dtype: torch.dtype, mean, std, channels_last: bool) -> list:
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


def train_pipeline(*, device: torch.device, dtype: torch.dtype, state: AugmentationState,
                   flip: bool, padding: int, cutout: int, channels_last: bool = True,
                   mean=CIFAR100_MEAN, std=CIFAR100_STD) -> dict[str, list]:
    """The training augmentation (settings: the config's ``augment`` section, one source)."""
    fill = fill_colour(mean)
    image = [SimpleRGBImageDecoder()]
    if flip:
        image.append(RandomHorizontalFlip(state))
    if padding > 0:
        image.append(RandomTranslate(state, padding=padding, fill=fill))
    if cutout > 0:
        image.append(Cutout(state, size=cutout, fill=fill))
    image += _tail(device, dtype, mean, std, channels_last)
    return {'image': image, 'label': label_pipeline(device=device)}


def test_pipeline(*, device: torch.device, dtype: torch.dtype, channels_last: bool = True,
                  mean=CIFAR100_MEAN, std=CIFAR100_STD) -> dict[str, list]:
    return {'image': [SimpleRGBImageDecoder()] + _tail(device, dtype, mean, std, channels_last),
            'label': label_pipeline(device=device)}


# FFCV's quasi-random order is a module-level numba function compiled in every process (1.2 s on
# our 2 cores); it has no closure over data, so numba can keep its machine code on disk.
_quasi_random_module.generate_order_inner.enable_caching()


class StableQuasiRandom(QuasiRandom):
    """FFCV's quasi-random order shuffles its page table *in place*, so the order of epoch e
    depends on which epochs were drawn before it: a resumed run would see other batches than
    an uninterrupted one. This draws every epoch from a pristine copy of the table."""

    def prepare_data_structures(self):
        super().prepare_data_structures()
        self._pristine = self.page_to_samples_array.copy()

    def sample_order(self, epoch: int):
        self.page_to_samples_array = self._pristine.copy()
        return super().sample_order(epoch)


# Two repairs to FFCV's loading thread (ffcv/loader/epoch_iterator.py), so that an epoch can be
# left early (the JIT warm-up, a Ctrl-C, an error) and its thread joined at once:
# 1. it waits forever, on a full queue, to hand over its end-of-epoch marker: a consumer that
#    left the epoch within its last few batches never takes it, and joining the thread hangs
#    (seen with the 4-batch test set of cpu_small.yaml). Its queue's blocking puts also give up
#    once the iterator is closed, and wake every 20 ms to notice that;
# 2. it dies silently on an exception, and its consumer then waits forever for the next batch.
#    The exception is recorded and the epoch ended; ``CifarLoader.epoch`` raises it.
class _ClosableQueue(queue.Queue):
    closed = None  # the EpochIterator's terminate_event, set when its thread starts

    def put(self, item, block=True, timeout=None):
        if not block or self.closed is None:
            return super().put(item, block, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return super().put(item, timeout=0.02)
            except queue.Full:
                if self.closed.is_set():
                    if timeout is None:
                        return  # the end-of-epoch marker: nobody will read it
                    raise  # FFCV's own put loop checks for the close after a Full
                if deadline is not None and time.monotonic() >= deadline:
                    raise


def _run_repaired(self):
    self.output_queue.closed = self.terminate_event
    try:
        _ffcv_run(self)
    except BaseException as e:
        self.error = e
        self.output_queue.put(None)


_ffcv_run = getattr(EpochIterator.run, 'ffcv_run', EpochIterator.run)  # idempotent on reload
EpochIterator.run, _run_repaired.ffcv_run = _run_repaired, _ffcv_run
_epoch_iterator_module.Queue = _ClosableQueue


# Test hook for the acceptance checks (scripts/check_figures.py): a sleep per training batch, so
# that a deliberately slow loader can be shown to fail them. Unset, it costs nothing.
DELAY_ENV = 'CIFAR_LOADER_DELAY_MS'


@dataclass
class CifarLoader:
    """An FFCV ``Loader`` whose order *and* augmentation are a function of the epoch number,
    so a resumed run sees exactly the batches an uninterrupted one would."""
    loader: Loader
    state: AugmentationState | None = None
    delay_s: float = 0.0

    def epoch(self, epoch: int):
        """The batches of ``epoch``. Closing the generator early (``break``, an exception) stops
        and *joins* FFCV's loading thread, so no two loaders ever run numba code at once
        (numba's workqueue threading layer, used where TBB is missing, aborts on that)."""
        self.loader.next_epoch = epoch
        if self.state is not None:
            self.state.set_epoch(epoch)
        it = iter(self.loader)
        try:
            for batch in it:
                if self.delay_s:
                    time.sleep(self.delay_s)
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
    if type(loader.traversal_order) is QuasiRandom:
        # Loader's `order=` cannot take a custom class (its isinstance check rejects classes,
        # and instances are not callable); swap the order object after construction.
        loader.traversal_order = StableQuasiRandom(loader)
        loader.first_traversal_order = loader.next_traversal_order()
    delay_ms = float(os.environ.get(DELAY_ENV) or 0)
    return CifarLoader(loader, state, delay_ms / 1000 if state is not None else 0.0)
