"""The augmentation ops' bodies (``augment.py``), compiled by numba, and the two kernels that run
one over a batch: ``run_parallel`` (FFCV's JIT pipeline: ``prange`` over the images, numba's
threads, which FFCV sizes) and ``run_serial`` (the torchvision loader's worker processes, which
are the parallelism there: no second thread pool inside a forked worker).

The kernels take the body -- and the random-key function -- as first-class functions of fixed
signatures, so each kernel is compiled once for every op and cached on disk (``cache=True``),
and so is each body: a new op costs no new kernel, and a training process loads them all from
the cache (the first run on a machine compiles them). Nothing of augment.py is compiled into
this file's kernels, so numba's own check of each function's source file keeps every cached
piece current (a changed augment.py recompiles its bodies and key, a changed kernels.py the
kernels).
"""
from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
from numba import cfunc, njit, prange, types
from numba.core.errors import NumbaWarning

from . import augment as A
from .augment import Op

# one image, src -> dst (C-contiguous: FFCV's buffers and the torch loader's batches are), its
# bits, its params; an in-place op gets the same array twice
BODY = types.void(types.uint8[:, :, ::1], types.uint8[:, :, ::1], types.uint64, types.float64[::1])
KEY = types.uint64(types.uint64, types.uint64, types.int64, types.uint64)  # (seed, epoch, index, salt)
KERNEL = types.void(types.FunctionType(BODY), types.FunctionType(KEY), types.uint8[:, :, :, ::1],
                    types.uint8[:, :, :, ::1], types.int64[::1], types.uint64, types.uint64, types.uint64,
                    types.float64[::1])
OPTIONS = dict(cache=True, nogil=True, error_model='numpy')


@njit(KERNEL, parallel=True, **OPTIONS)
def run_parallel(body, key, images, dst, indices, seed, epoch, salt, params):
    for i in prange(images.shape[0]):
        body(images[i], dst[i], key(seed, epoch, indices[i], salt), params)


@njit(KERNEL, **OPTIONS)
def run_serial(body, key, images, dst, indices, seed, epoch, salt, params):
    for i in range(images.shape[0]):
        body(images[i], dst[i], key(seed, epoch, indices[i], salt), params)


def _compile(sig, f):
    """A C callback (``cfunc``): passed to a kernel from Python it costs ~12 us a call, a jitted
    function ~60 us (numba types the dispatcher at every call)."""
    # at NUMBA_OPT=0 (the tests') numba cannot cache code that inlines the hash's 64-bit
    # constants ("uses dynamic globals") and warns on stderr; the code is the same, uncached
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', NumbaWarning)
        return cfunc(sig, cache=True, nopython=True, error_model='numpy')(getattr(f, 'py_func', f))


key = _compile(KEY, A.sample_key)


@lru_cache(maxsize=None)
def compiled(o: Op):
    """The op's body compiled for :data:`BODY` (cached on disk: numba keys it to augment.py)."""
    return _compile(BODY, o.body)


def run_op_serial(o: Op, images, dst, indices, seed, epoch, params) -> None:
    """What ``augment.augment_batch`` calls per op: the compiled body over the batch."""
    run_serial(compiled(o), key, images, dst, indices, seed, epoch, np.uint64(o.salt), params)


def cached_functions() -> list:
    """Every compiled function an augmented training run loads from the disk cache."""
    return [run_parallel, run_serial, key, *(compiled(o) for o in A.OPS.values())]
