"""The training augmentation, defined once: which flip, shift and cutout each image gets.

Every random draw is a pure function of ``(seed, epoch, sample index, op)`` through a
counter-based hash (splitmix64), so augmentations do not depend on worker count, batch size,
batch order or where a run was resumed, while differing from epoch to epoch and from sample to
sample. The same functions run in two places:

* ``ops.py`` compiles them with numba inside FFCV's JIT pipeline (the ``ffcv`` loader);
* :func:`augment_batch` applies them to a uint8 batch with numpy (the ``torchvision`` loader,
  which must not need numba or ffcv).

So both loaders give every image *the same* augmentation, pixel for pixel. This module imports
numpy only. Semantics (FFCV's and torchvision's):

* flip: left-right with probability 1/2;
* translate: shift by (dy, dx), each uniform in [-padding, padding]; pixels shifted in from
  outside take ``fill`` (pad-then-random-crop);
* cutout: one ``size`` x ``size`` square, uniformly placed fully inside the image, set to ``fill``.
"""
from __future__ import annotations

import numpy as np

# per-op salts so flip, translate and cutout draw independent numbers for the same sample
SALT_FLIP, SALT_TRANSLATE, SALT_CUTOUT = np.uint64(0xF11F), np.uint64(0x7A45), np.uint64(0xC07)
LOW32 = np.uint64(0xFFFFFFFF)
FLIP_THRESHOLD = np.uint64(2**31)  # flip when the low 32 bits are below: probability 1/2


def auto_translate(image_size: int) -> int:
    """``augment.translate: null``: the standard pad-4 crop at 32 px, scaled with the size."""
    return max(1, round(image_size / 8))


def auto_cutout(image_size: int) -> int:
    """``augment.cutout: null``: 8 px at 32 px (DeVries & Taylor 2017, CIFAR-100), scaled."""
    return max(1, round(image_size / 4))


def settings(acfg, image_size: int) -> dict:
    """The config's ``augment`` section for ``image_size`` pixel images as the keyword arguments
    of :func:`augment_batch` and the FFCV pipeline (``loaders.train_pipeline``), less ``fill``:
    the one mapping of its keys. ``null`` (auto) scales with the size; a value that does not
    fit the image raises ``ValueError`` naming the key."""
    padding = auto_translate(image_size) if acfg.translate is None else int(acfg.translate)
    cutout = auto_cutout(image_size) if acfg.cutout is None else int(acfg.cutout)
    if not 0 <= padding < image_size:
        raise ValueError(f'augment.translate: {padding} must lie in [0, {image_size - 1}] for '
                         f'{image_size}x{image_size} images')
    if not 0 <= cutout <= image_size:
        raise ValueError(f'augment.cutout: {cutout} must lie in [0, {image_size}] for '
                         f'{image_size}x{image_size} images')
    return dict(flip=bool(acfg.flip), padding=padding, cutout=cutout)


def mix64(z):
    """splitmix64 finalizer: a bijective, well-mixed hash of a uint64 (scalar or array)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def make_sample_key(mix):
    """``sample_key`` over a given ``mix64`` (numba compiles it over its own compiled mix64)."""
    def sample_key(seed, epoch, index, salt):
        """64 random bits for (seed, epoch, sample index, op)."""
        return mix(mix(mix(seed ^ salt) ^ epoch) ^ np.uint64(index))
    return sample_key


sample_key = make_sample_key(mix64)


def uniform_int(bits, n):
    """An integer in [0, n) from the low 32 bits (multiply-shift: no modulo bias to speak of)."""
    return np.int64(((bits & LOW32) * np.uint64(n)) >> np.uint64(32))


def augment_batch(images: np.ndarray, indices: np.ndarray, *, seed: int, epoch: int, flip: bool,
                  padding: int, cutout: int, fill) -> np.ndarray:
    """Flip -> translate -> cutout a uint8 NHWC batch whose samples have dataset ``indices``;
    returns a new array, equal to what ``ops.py``'s FFCV ops produce for the same samples."""
    n, h, w, c = images.shape
    idx = np.asarray(indices, dtype=np.uint64)
    seed_a, epoch_a = np.full(n, seed, np.uint64), np.full(n, epoch, np.uint64)
    fill = np.asarray(fill, dtype=np.uint8)
    out = np.array(images, dtype=np.uint8, copy=True)
    rows = np.arange(n)[:, None, None]
    if flip:
        mirrored = (sample_key(seed_a, epoch_a, idx, SALT_FLIP) & LOW32) < FLIP_THRESHOLD
        out[mirrored] = out[mirrored, :, ::-1]
    if padding > 0:
        bits = sample_key(seed_a, epoch_a, idx, SALT_TRANSLATE)
        dy = uniform_int(bits, 2 * padding + 1) - padding
        dx = uniform_int(bits >> np.uint64(32), 2 * padding + 1) - padding
        padded = np.empty((n, h + 2 * padding, w + 2 * padding, c), np.uint8)
        padded[:] = fill
        padded[:, padding:padding + h, padding:padding + w] = out
        ys = (padding + dy)[:, None, None] + np.arange(h)[None, :, None]  # dst[y, x] = src[y+dy, x+dx]
        xs = (padding + dx)[:, None, None] + np.arange(w)[None, None, :]
        out = padded[rows, ys, xs]
    if cutout > 0:
        bits = sample_key(seed_a, epoch_a, idx, SALT_CUTOUT)
        y0 = uniform_int(bits, h - cutout + 1)[:, None, None]
        x0 = uniform_int(bits >> np.uint64(32), w - cutout + 1)[:, None, None]
        yy, xx = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
        out[(yy >= y0) & (yy < y0 + cutout) & (xx >= x0) & (xx < x0 + cutout)] = fill
    return out
