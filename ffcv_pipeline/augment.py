"""The training augmentation, defined once: every op is one registration below.

    @op('flip', salt=0xF11F, params=lambda on, size, fill: [] if on else None, example=True, ...)
    def flip(src, dst, bits, p): ...            # one image: src -> dst, its 64 random bits

An op's body transforms one uint8 HxWxC image given 64 random bits and its float64 parameters;
it is plain Python in the subset numba compiles. From that one body:

* the FFCV loader's JIT op (``ops.AugmentOp``) runs it, numba-compiled, over each batch in
  parallel (``kernels.run_parallel``: one generic kernel, cached on disk);
* the ``torchvision`` loader's workers run the same compiled body (``kernels.run_serial``) --
  or, where numba does not import, the body itself, uncompiled (correct, slow);
* the benchmark builds torchvision's and FFCV's own version of the op from ``torchvision`` /
  ``ffcv_builtin`` (the comparison, not the product).

So both loaders give every image the same augmentation, pixel for pixel (tested for every
registered op). Every random draw is a pure function of ``(seed, epoch, sample index, op)``
through a counter-based hash (splitmix64): augmentations do not depend on worker count, batch
size, batch order or where a run was resumed, while differing from epoch to epoch and from
sample to sample. Ops apply in registration order. The config's ``augment`` section has one key
per op, its name; ``params`` turns the key's value into the body's parameters (None: off),
``resolve`` fills in an ``auto`` (null) value for the image size and refuses one that does not
fit it. Adding an op: its registration here and its key in ``training/config.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

try:  # the helpers the bodies call are compiled into them where numba is installed
    from numba import njit as _njit
    _inline = _njit(inline='always')
except ImportError:  # the ffcv-free loader without numba: the same functions, as Python
    def _inline(f):
        return f

LOW32 = np.uint64(0xFFFFFFFF)
FLIP_THRESHOLD = np.uint64(2**31)  # flip when the low 32 bits are below: probability 1/2


@_inline
def mix64(z):
    """splitmix64 finalizer: a bijective, well-mixed hash of a uint64."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@_inline
def sample_key(seed, epoch, index, salt):
    """64 random bits for (seed, epoch, sample index, op)."""
    return mix64(mix64(mix64(seed ^ salt) ^ epoch) ^ np.uint64(index))


@_inline
def uniform_int(bits, n):
    """An integer in [0, n) from the low 32 bits (multiply-shift: no modulo bias to speak of)."""
    return np.int64(((bits & LOW32) * np.uint64(n)) >> np.uint64(32))


@_inline
def uniform01(bits):
    """A float in [0, 1) from the low 32 bits."""
    return np.float64(bits & LOW32) / 4294967296.0


# --- the registry ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Op:
    name: str  # its key in the config's augment section
    salt: int  # keeps its draws independent of the other ops' for the same sample
    body: Callable  # (src, dst, bits, params) on one HxWxC uint8 image; numba-compilable
    params: Callable  # (value, image size, fill colour) -> list of floats, or None: off
    example: object = None  # a value that turns it on at 32 px (the tests run every op with it)
    in_place: bool = False  # the body changes ``dst``, which is ``src`` (else a separate array)
    resolve: Callable = lambda value, size: value  # (config value, image size) -> the value used
    # the benchmark's comparisons: (value, image size, fill) -> torchvision's transform (applied to
    # a PIL image, or 'tensor': to the normalized tensor) / FFCV's own op; None: there is none
    torchvision: Callable | None = None  # -> ('pil' | 'tensor', transform)
    ffcv_builtin: Callable | None = None  # -> an ffcv.transforms op


OPS: dict[str, Op] = {}  # name -> op, in the order they apply


def op(name: str, *, salt: int, params: Callable, **kw) -> Callable:
    """Register the decorated body as the op ``name`` (its config key)."""
    def register(body):
        assert name not in OPS and all(o.salt != salt for o in OPS.values()), name
        OPS[name] = Op(name, salt, body, params, **kw)
        return body
    return register


def _tv(name: str, *args, **kw):
    import torchvision.transforms as T
    return getattr(T, name)(*args, **kw)


def _ffcv(name: str, *args, **kw):
    import ffcv.transforms as FT
    return getattr(FT, name)(*args, **kw)


def _bounded(key: str, lo: int, hi: Callable[[int], int]) -> Callable:
    def check(value, size):
        if not lo <= value <= hi(size):
            raise ValueError(f'augment.{key}: {value} must lie in [{lo}, {hi(size)}] for '
                             f'{size}x{size} images')
        return value
    return check


# --- the ops -------------------------------------------------------------------------------------------
# An in-place op (``in_place=True``) gets ``dst`` as the very array ``src`` is and changes only
# what it must (a flip touches the mirrored images, a cutout its square); the others write every
# pixel of a separate ``dst``.

@op('flip', salt=0xF11F, params=lambda on, size, fill: [] if on else None, example=True, in_place=True,
    torchvision=lambda on, size, fill: ('pil', _tv('RandomHorizontalFlip')),
    ffcv_builtin=lambda on, size, fill: _ffcv('RandomHorizontalFlip'))
def flip(src, dst, bits, p):
    """Left-right with probability 1/2 (in place: mirrored images swap their columns)."""
    if (bits & LOW32) < FLIP_THRESHOLD:
        h, w, c = dst.shape
        for y in range(h):
            for x in range(w // 2):
                for k in range(c):
                    t = dst[y, x, k]
                    dst[y, x, k] = dst[y, w - 1 - x, k]
                    dst[y, w - 1 - x, k] = t


def _resolve_brightness(value, size):
    if not 0.0 <= value < 1.0:
        raise ValueError(f'augment.brightness: {value} must lie in [0, 1) (0 = off)')
    return value


@op('brightness', salt=0xB816, params=lambda s, size, fill: [s] if s > 0 else None, example=0.4,
    in_place=True, resolve=_resolve_brightness,
    torchvision=lambda s, size, fill: ('pil', _tv('ColorJitter', brightness=s)))
def brightness(src, dst, bits, p):
    """Every pixel times one factor, uniform in [1 - s, 1 + s], rounded and clipped to 0-255
    (torchvision's ColorJitter(brightness=s)); off by default. A colour op: it comes before the
    ops that fill with the mean colour, so the fill stays the mean."""
    h, w, c = dst.shape
    factor = 1.0 - p[0] + 2.0 * p[0] * uniform01(bits)
    for y in range(h):
        for x in range(w):
            for k in range(c):
                v = np.float64(dst[y, x, k]) * factor + 0.5
                dst[y, x, k] = np.uint8(255 if v >= 255.0 else np.int64(v))


def auto_translate(image_size: int) -> int:
    """``augment.translate: null``: the standard pad-4 crop at 32 px, scaled with the size."""
    return max(1, round(image_size / 8))


@op('translate', salt=0x7A45, params=lambda pad, size, fill: [pad, *fill] if pad > 0 else None, example=3,
    resolve=lambda v, size: _bounded('translate', 0, lambda s: s - 1)(auto_translate(size) if v is None else v, size),
    torchvision=lambda pad, size, fill: ('pil', _tv('RandomCrop', size, padding=pad, fill=fill)),
    ffcv_builtin=lambda pad, size, fill: _ffcv('RandomTranslate', padding=pad, fill=fill))
def translate(src, dst, bits, p):
    """Shift by (dy, dx), each uniform in [-pad, pad]; pixels shifted in from outside take the
    fill colour (FFCV's and torchvision's pad-then-random-crop)."""
    h, w, c = src.shape
    pad = np.int64(p[0])
    dy = uniform_int(bits, 2 * pad + 1) - pad
    dx = uniform_int(bits >> np.uint64(32), 2 * pad + 1) - pad
    for y in range(h):
        sy = y + dy
        for x in range(w):
            sx = x + dx
            if 0 <= sy < h and 0 <= sx < w:
                for k in range(c):
                    dst[y, x, k] = src[sy, sx, k]
            else:
                for k in range(c):
                    dst[y, x, k] = np.uint8(p[1 + k])


def auto_cutout(image_size: int) -> int:
    """``augment.cutout: null``: 8 px at 32 px (DeVries & Taylor 2017, CIFAR-100), scaled."""
    return max(1, round(image_size / 4))


@op('cutout', salt=0xC07, params=lambda size_, size, fill: [size_, *fill] if size_ > 0 else None, example=10,
    in_place=True,
    resolve=lambda v, size: _bounded('cutout', 0, lambda s: s)(auto_cutout(size) if v is None else v, size),
    torchvision=lambda s, size, fill: ('tensor', _tv('RandomErasing', p=1.0, scale=(s * s / size ** 2,) * 2,
                                                    ratio=(1.0, 1.0), value=0)),  # 0: the mean, normalized
    ffcv_builtin=lambda s, size, fill: _ffcv('Cutout', s, fill))
def cutout(src, dst, bits, p):
    """One size x size square, uniformly placed fully inside the image, set to the fill colour
    (in place: only the square is written)."""
    h, w, c = dst.shape
    size = np.int64(p[0])
    y0 = uniform_int(bits, h - size + 1)
    x0 = uniform_int(bits >> np.uint64(32), w - size + 1)
    for y in range(y0, y0 + size):
        for x in range(x0, x0 + size):
            for k in range(c):
                dst[y, x, k] = np.uint8(p[1 + k])


# --- from the config to the ops ---------------------------------------------------------------------------
def settings(acfg, image_size: int) -> dict:
    """The config's ``augment`` section for ``image_size`` pixel images: {op name: the value it
    runs with} (auto values filled in), in the order the ops apply -- the one mapping of its keys
    (the loaders, the run's recorded config). ``ValueError`` naming the key for a value that does
    not fit the image."""
    return {name: o.resolve(acfg[name], image_size) for name, o in OPS.items()}


def active(augment: dict, image_size: int, fill) -> list[tuple[Op, np.ndarray]]:
    """(op, its float64 parameters) for the ops ``augment`` (:func:`settings`) turns on, in order."""
    out = []
    for name, o in OPS.items():
        value = augment.get(name)
        p = None if value is None else o.params(value, image_size, tuple(fill))
        if p is not None:
            out.append((o, np.asarray(p, np.float64)))
    return out


def augment_batch(images: np.ndarray, indices: np.ndarray, *, seed: int, epoch: int, augment: dict,
                  fill) -> np.ndarray:
    """The ops ``augment`` turns on, in order, over a uint8 NHWC batch whose samples have dataset
    ``indices``; returns a new array, equal to what the FFCV ops produce for the same samples
    (the same bodies, compiled by numba where it imports)."""
    idx = np.asarray(indices, dtype=np.int64)
    x = np.array(images, dtype=np.uint8, order='C', copy=True)  # ours to change in place
    run = _serial_runner()
    for o, p in active(augment, x.shape[1], fill):
        out = x if o.in_place else np.empty_like(x)
        run(o, x, out, idx, np.uint64(seed), np.uint64(epoch), p)
        x = out
    return x


def _serial_runner():
    try:
        from .kernels import run_op_serial
        return run_op_serial
    except ImportError:  # no numba: the bodies as plain Python (correct, slow)
        return _run_python


def _run_python(o: Op, images, dst, indices, seed, epoch, p) -> None:
    salt = np.uint64(o.salt)
    with np.errstate(over='ignore'):  # the hash wraps around on purpose (uint64 arithmetic)
        for i in range(images.shape[0]):
            o.body(images[i], dst[i], sample_key(seed, epoch, np.uint64(indices[i]), salt), p)
