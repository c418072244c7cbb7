"""The FFCV JIT (numba) ops: the registered augmentation ops (``augment.py``) with reproducible
randomness, and the CPU path's normalization.

FFCV's own ``RandomHorizontalFlip``/``RandomTranslate``/``Cutout`` draw from numba's per-thread
generators, seeded from OS entropy: the same run twice -- or a run resumed from a checkpoint --
sees different augmentations. :class:`AugmentOp` runs any registered op instead, whose every
random draw is a pure function of ``(seed, epoch, sample index, op)``; the ``torchvision``
loader runs the very same compiled bodies, so both loaders augment identically.

The seed and epoch live in a small numpy array (:class:`AugmentationState`) the ops read at
each batch: ``set_epoch`` reaches them without rebuilding the pipeline.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Tuple

import numpy as np
from numba import njit, prange

from . import load_ffcv

load_ffcv()  # before any other ffcv import: ~2.5 s faster (see load_ffcv)

from ffcv.pipeline.allocation_query import AllocationQuery  # noqa: E402
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State

from . import kernels as K
from .augment import Op


@njit(cache=True, nogil=True, parallel=True, fastmath=True, error_model='numpy')
def normalize_kernel(images, dst, table):
    """uint8 NHWC -> float32 NHWC through a (256, channels) table: one lookup per value."""
    n, h, w, c = images.shape
    for i in prange(n):
        for y in range(h):
            for x in range(w):
                for k in range(c):
                    dst[i, y, x, k] = table[images[i, y, x, k], k]


class AugmentationState:
    """``[seed, epoch]`` shared by a pipeline's random ops; ``set_epoch`` before each epoch."""

    def __init__(self, seed: int = 0):
        self.array = np.array([seed & (2**64 - 1), 0], dtype=np.uint64)

    @property
    def seed(self) -> int:
        return int(self.array[0])

    def set_epoch(self, epoch: int) -> None:
        self.array[1] = epoch


class AugmentOp(Operation):
    """One registered op (``augment.OPS``) with its parameters, over each batch of uint8 NHWC
    images -- in place, or into a buffer of its own (``Op.in_place``) -- by
    ``kernels.run_parallel`` (numba's threads, the GIL released).
    FFCV calls it from Python (``jit_mode=False``): the kernel and the op's body are compiled
    and cached once for all ops, which a body captured in FFCV's own per-process JIT stage
    could not be; one Python call per batch costs microseconds. It reads the epoch from
    :class:`AugmentationState` at each batch."""

    def __init__(self, state: AugmentationState, op: Op, params):
        super().__init__()
        self.state = state
        self.op, self.params = op, np.ascontiguousarray(params, dtype=np.float64)

    def generate_code(self) -> Callable:
        run, body, key = K.run_parallel, K.compiled(self.op), K.key
        params, salt, seed_epoch = self.params, np.uint64(self.op.salt), self.state.array
        in_place = self.op.in_place

        def augment(images, dst, indices):
            out = images if in_place else dst[:images.shape[0]]
            run(body, key, images, out, np.asarray(indices, dtype=np.int64), seed_epoch[0],
                seed_epoch[1], salt, params)
            return out
        augment.with_indices = True
        return augment

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        return (replace(previous_state, jit_mode=False),
                None if self.op.in_place else AllocationQuery(previous_state.shape, previous_state.dtype))


class NormalizeToFloat(Operation):
    """uint8 NHWC -> float32 ``(x - mean) / std`` (the CPU path, where the "device" is the CPU),
    through a lookup table (as FFCV's ``NormalizeImage``) of ``Normalize``'s float32 values
    (``pixels.normalization_table``), with a cached kernel instead of FFCV's per-process JIT.
    Called from Python like :class:`AugmentOp` (``jit_mode=False``): FFCV 1.0.2's stage grouping
    loops forever on a JIT op after a non-JIT one (``Graph.group_operations`` never empties its
    next front), and a Python call per batch costs nothing here."""

    def __init__(self, table: np.ndarray):
        super().__init__()
        self.table = np.ascontiguousarray(table, dtype=np.float32)

    def generate_code(self) -> Callable:
        table = self.table

        def normalize(images, dst):
            n = images.shape[0]
            normalize_kernel(images, dst[:n], table)
            return dst[:n]
        return normalize

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        return (replace(previous_state, jit_mode=False, dtype=np.dtype(np.float32)),
                AllocationQuery(previous_state.shape, np.dtype(np.float32)))
