"""FFCV JIT (numba) augmentation ops with *reproducible* randomness.

FFCV's own ``RandomHorizontalFlip``/``RandomTranslate``/``Cutout`` draw from numba's
per-thread generators, which are seeded from OS entropy: the same run twice -- or a run
resumed from a checkpoint -- sees different augmentations. These ops have the same semantics
(translate = FFCV's "crop": shift by up to ``padding`` pixels, fill the uncovered border;
cutout = a ``size`` x ``size`` square fully inside the image), but every random draw is a pure
function of ``(seed, epoch, sample index, op)``, defined once in ``augment.py``: the numpy
``torchvision`` loader applies the very same draws, so both loaders augment identically.

The seed and epoch live in a small numpy array (:class:`AugmentationState`) that the compiled
code reads through ffcv's ``memcpy`` at the start of each batch: numba freezes captured arrays
as compile-time constants, so an address is what lets ``set_epoch`` reach compiled code
without recompiling the pipeline.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Tuple

import numpy as np
from numba import njit, prange

from . import load_ffcv

load_ffcv()  # before any other ffcv import: ~2.5 s faster (see load_ffcv)

from ffcv.libffcv import ctypes_memcopy  # noqa: E402
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State

from . import augment as A

# The hash and the draws are defined once, in augment.py (numpy); compiled here for the JIT ops.
mix64 = njit(inline='always')(A.mix64)
sample_key = njit(inline='always')(A.make_sample_key(mix64))
uniform_int = njit(inline='always')(A.uniform_int)
SALT_FLIP, SALT_TRANSLATE, SALT_CUTOUT = A.SALT_FLIP, A.SALT_TRANSLATE, A.SALT_CUTOUT


# --- the kernels: module-level, so numba caches their machine code on disk (cache=True) --------
# FFCV compiles each op's generate_code() closure in every process (its stage code cannot be
# cached); the closures below only read the seed/epoch and call these kernels, which hold all
# the work and compile once per machine: 2.3 s less JIT per training process on our 2 cores.
# Each kernel loops over the batch itself (prange: numba's threads, which FFCV sizes).
KERNEL = dict(cache=True, nogil=True, parallel=True, fastmath=True, error_model='numpy')


@njit(**KERNEL)
def flip_kernel(images, indices, seed, epoch, threshold, salt):
    w = images.shape[2]
    for i in prange(images.shape[0]):
        bits = sample_key(seed, epoch, indices[i], salt)
        if (bits & np.uint64(0xFFFFFFFF)) < threshold:
            img = images[i]
            for y in range(img.shape[0]):
                for x in range(w // 2):
                    for c in range(img.shape[2]):
                        t = img[y, x, c]
                        img[y, x, c] = img[y, w - 1 - x, c]
                        img[y, w - 1 - x, c] = t


@njit(**KERNEL)
def translate_kernel(images, dst, indices, seed, epoch, pad, fill, salt):
    n, h, w, c = images.shape
    for i in prange(n):
        bits = sample_key(seed, epoch, indices[i], salt)
        dy = uniform_int(bits, 2 * pad + 1) - pad
        dx = uniform_int(bits >> np.uint64(32), 2 * pad + 1) - pad
        for y in range(h):
            sy = y + dy
            for x in range(w):
                sx = x + dx
                if 0 <= sy < h and 0 <= sx < w:
                    for k in range(c):
                        dst[i, y, x, k] = images[i, sy, sx, k]
                else:
                    for k in range(c):
                        dst[i, y, x, k] = fill[k]


@njit(**KERNEL)
def cutout_kernel(images, indices, seed, epoch, size, fill, salt):
    n, h, w, c = images.shape
    for i in prange(n):
        bits = sample_key(seed, epoch, indices[i], salt)
        y0 = uniform_int(bits, h - size + 1)
        x0 = uniform_int(bits >> np.uint64(32), w - size + 1)
        for y in range(y0, y0 + size):
            for x in range(x0, x0 + size):
                for k in range(c):
                    images[i, y, x, k] = fill[k]


@njit(**KERNEL)
def normalize_kernel(images, dst, table):
    """uint8 NHWC -> float32 NHWC through a (256, channels) table: one lookup per value."""
    n, h, w, c = images.shape
    for i in prange(n):
        for y in range(h):
            for x in range(w):
                for k in range(c):
                    dst[i, y, x, k] = table[images[i, y, x, k], k]


CACHED_KERNELS = (flip_kernel, translate_kernel, cutout_kernel, normalize_kernel)


def _invalidate_stale_cache() -> None:
    """numba checks a cached kernel against its own source file (this one) only; the hash they
    inline comes from augment.py. A stamp of augment.py beside the cache drops the cached code
    when that file changes, so the JIT ops never drift from their numpy twin."""
    import hashlib
    from pathlib import Path
    stamp = hashlib.sha256(Path(A.__file__).read_bytes() + Path(__file__).read_bytes()).hexdigest()[:16]
    try:
        folder = Path(flip_kernel._cache._cache_path)
        marker = folder / 'ffcv_pipeline_ops.stamp'
        if marker.is_file() and marker.read_text() == stamp:
            return
        for k in CACHED_KERNELS:
            k._cache.flush()
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(stamp)
    except (OSError, AttributeError):  # no writable cache: numba compiles every time, still correct
        pass


_invalidate_stale_cache()


class AugmentationState:
    """``[seed, epoch]`` shared by a pipeline's random ops; ``set_epoch`` before each epoch."""

    def __init__(self, seed: int = 0):
        self.array = np.array([seed & (2**64 - 1), 0], dtype=np.uint64)

    @property
    def address(self) -> int:
        return self.array.ctypes.data

    @property
    def seed(self) -> int:
        return int(self.array[0])

    def set_epoch(self, epoch: int) -> None:
        self.array[1] = epoch


def _state_reader(state: AugmentationState):
    address = state.address

    @njit(nogil=True, inline='always')
    def read_state(out):
        ctypes_memcopy(address, out.ctypes.data, 16)

    return read_state


class _RandomOp(Operation):
    def __init__(self, state: AugmentationState):
        super().__init__()
        self.state = state  # keeps the array (and so the address) alive


def _batch_op(code: Callable) -> Callable:
    """FFCV's flags for a closure that gets the batch's sample indices and does no parallel loop
    of its own (its kernel does): FFCV compiles it without numba's costly parallel passes."""
    code.is_parallel = False
    code.with_indices = True
    return code


class RandomHorizontalFlip(_RandomOp):
    """Flip each image left-right with probability ``prob`` (uint8 NHWC, in place)."""

    def __init__(self, state: AugmentationState, prob: float = 0.5):
        super().__init__(state)
        self.prob = prob

    def generate_code(self) -> Callable:
        read_state = _state_reader(self.state)
        threshold = np.uint64(min(max(self.prob, 0.0), 1.0) * 2**32)
        salt = SALT_FLIP

        def flip(images, _dst, indices):
            st = np.empty(2, np.uint64)
            read_state(st)
            flip_kernel(images, indices, st[0], st[1], threshold, salt)
            return images
        return _batch_op(flip)

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        return replace(previous_state, jit_mode=True), None


class RandomTranslate(_RandomOp):
    """Shift each image by (dy, dx), each uniform in [-padding, padding]; pixels shifted in
    from outside take ``fill`` (FFCV's and torchvision's pad-then-random-crop)."""

    def __init__(self, state: AugmentationState, padding: int, fill=(0, 0, 0)):
        super().__init__(state)
        self.padding = int(padding)
        self.fill = np.array(fill, dtype=np.uint8)

    def generate_code(self) -> Callable:
        read_state = _state_reader(self.state)
        pad, fill, salt = self.padding, self.fill, SALT_TRANSLATE

        def translate(images, dst, indices):
            st = np.empty(2, np.uint64)
            read_state(st)
            n = images.shape[0]
            translate_kernel(images, dst[:n], indices, st[0], st[1], pad, fill, salt)
            return dst[:n]
        return _batch_op(translate)

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        return (replace(previous_state, jit_mode=True),
                AllocationQuery(previous_state.shape, previous_state.dtype))


class Cutout(_RandomOp):
    """Fill one ``size`` x ``size`` square, uniformly placed fully inside the image, with
    ``fill`` (in place). ``size=0`` disables it."""

    def __init__(self, state: AugmentationState, size: int, fill=(0, 0, 0)):
        super().__init__(state)
        self.size = int(size)
        self.fill = np.array(fill, dtype=np.uint8)

    def generate_code(self) -> Callable:
        read_state = _state_reader(self.state)
        size, fill, salt = self.size, self.fill, SALT_CUTOUT

        def cutout(images, _dst, indices):
            st = np.empty(2, np.uint64)
            read_state(st)
            cutout_kernel(images, indices, st[0], st[1], size, fill, salt)
            return images
        return _batch_op(cutout)

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        h, w, _ = previous_state.shape
        if not 0 <= self.size <= min(h, w):
            raise ValueError(f'cutout size {self.size} must lie in [0, {min(h, w)}]')
        return replace(previous_state, jit_mode=True), None


class NormalizeToFloat(Operation):
    """uint8 NHWC -> float32 ``(x - mean) / std`` (the CPU path, where the "device" is the CPU),
    through a lookup table (as FFCV's ``NormalizeImage``) of ``Normalize``'s float32 values
    (``pixels.normalization_table``), with a cached kernel instead of FFCV's per-process JIT."""

    def __init__(self, table: np.ndarray):
        super().__init__()
        self.table = np.ascontiguousarray(table, dtype=np.float32)

    def generate_code(self) -> Callable:
        table = self.table

        def normalize(images, dst):
            n = images.shape[0]
            normalize_kernel(images, dst[:n], table)
            return dst[:n]
        normalize.is_parallel = False
        return normalize

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        return (replace(previous_state, jit_mode=True, dtype=np.dtype(np.float32)),
                AllocationQuery(previous_state.shape, np.dtype(np.float32)))
