"""Images in, model input out: decoding and preparation with Pillow and numpy only (no torch,
so the ONNX Runtime app needs neither).

    from app.images import prepare_image, normalize
    arr, notes = prepare_image('cat.jpg', size=32)    # 32x32x3 uint8 RGB, and what was done
    x = normalize(arr[None], mean, std)               # 1x3x32x32 float32, NCHW (channels-last memory)

``size`` is the model's (its checkpoint's ``image_size``, the dataset's); the converter prepares
a user's image folder with this very function (``ffcv_pipeline/folder.py``), so training and
serving see an image the same way.

Preparing an image (``prepare_image``) -- the same pixels the model saw in training:
  * decode (Pillow; JPEGs are decoded at a reduced DCT scale when much larger than needed),
    apply the EXIF orientation (``ImageOps.exif_transpose``);
  * refuse what is not a usable image with :class:`ImageError` (a ``ValueError``): a missing,
    empty, non-image or corrupt file, an empty array, or more than ``MAX_PIXELS`` (50 MP:
    decompression-bomb protection; the limit is checked from the header, before decoding);
  * to RGB uint8: transparency (RGBA, LA, P with a transparent colour) is composited on
    **white**, as most viewers show it; 16-bit greyscale (``I;16``, 16-bit PNGs opened as ``I``)
    is scaled by 255/65535 rather than clipped; grey, palette, CMYK, ... via ``convert('RGB')``;
  * animated GIF/WebP/PNG: the **first frame** is classified and a note says so;
  * centre-crop to a square (keeps the aspect ratio: CIFAR images are square crops, squashing
    would distort) and resize to size x size with Pillow's **BICUBIC** filter, which is antialiased
    (its support widens with the reduction factor), with ``reducing_gap=3`` (a box reduction to
    >= 3x the target first: 6x faster on a 12 MP photo, 0.3-0.6 grey levels off on average
    versus a full-resolution resize); an image of the model's size is not resampled at all;
  * normalize exactly as the loaders' ``Normalize`` (``ffcv_pipeline.pixels``) does on
    the training/test data: float32 ``(x - mean) * (1 / std)`` with the checkpoint's 0-255
    mean/std (bit-identical: the same IEEE float32 operations in the same order), NCHW with
    channels-last memory.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.errors import UserError  # standard library only: every Space has it
MAX_PIXELS = 50_000_000  # refuse bigger images: 50 MP decodes to 150 MB of RGB already
RESAMPLE = Image.Resampling.BICUBIC
REDUCING_GAP = 3.0

__all__ = ['ImageError', 'MAX_PIXELS', 'describe', 'load_rgb', 'resize_to_model',
           'prepare_image', 'normalize']


class ImageError(UserError, ValueError):
    """The input is not a usable image; the message says which input and why, in one line."""


# --------------------------------------------------------------------------- decoding

def describe(source: Any, name: str | None) -> str:
    """How messages and results name an input: its given name, its path, or its kind."""
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return {np.ndarray: 'array', Image.Image: 'image'}.get(type(source), 'image')


def _check_pixels(w: int, h: int, what: str) -> None:
    if w <= 0 or h <= 0:
        raise ImageError(f'{what}: the image is empty ({w}x{h} pixels)')
    if w * h > MAX_PIXELS:
        raise ImageError(f'{what}: {w}x{h} pixels ({w * h / 1e6:.0f} megapixels) is too large; '
                         f'the limit is {MAX_PIXELS / 1e6:.0f} megapixels -- downscale it first')


def _open(data: str | os.PathLike | bytes, what: str) -> Image.Image:
    """Image.open with our checks; reads only the header (Pillow decodes lazily)."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise ImageError(f'{what}: no such file')
        if not path.is_file():
            raise ImageError(f'{what}: not a file')
        if path.stat().st_size == 0:
            raise ImageError(f'{what}: the file is empty')
    elif len(data) == 0:
        raise ImageError(f'{what}: empty input (0 bytes)')
    try:
        # Our own MAX_PIXELS check below is stricter than Pillow's bomb warning (89 MP), and
        # Pillow's DecompressionBombError (> 179 MP) is mapped to the same clear message.
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            img = Image.open(data if not isinstance(data, (bytes, bytearray)) else io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError(f'{what}: too large to decode safely ({e}); the limit is '
                         f'{MAX_PIXELS / 1e6:.0f} megapixels') from None
    except UnidentifiedImageError:
        raise ImageError(f'{what}: not an image, or a corrupt one (Pillow cannot identify it)') from None
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's plugins raise all of these
        raise ImageError(f'{what}: corrupt or unreadable image ({e})') from None
    try:
        _check_pixels(*img.size, what)
    except ImageError:
        img.close()
        raise
    return img


def _array_to_image(arr: np.ndarray, what: str) -> Image.Image:
    """HxW, HxWx1, HxWx3 or HxWx4 array -> PIL image (uint8), with a clear error otherwise."""
    if arr.size == 0:
        raise ImageError(f'{what}: empty array (shape {arr.shape})')
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageError(f'{what}: array shape {arr.shape} is not an image; expected HxW, HxWx1, '
                         f'HxWx3 (RGB) or HxWx4 (RGBA)')
    _check_pixels(arr.shape[1], arr.shape[0], what)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:  # 16-bit: scale, don't clip (65535 -> 255)
        arr = (arr.astype(np.float32) * (255 / 65535)).round().astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageError(f'{what}: the array holds NaN or infinite values')
        # floats in [0, 1] are the common convention (matplotlib, torchvision); else 0-255
        arr = arr * 255 if arr.max(initial=0) <= 1.0 else arr
        arr = np.clip(arr, 0, 255).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer):
            raise ImageError(f'{what}: array dtype {arr.dtype} is not an image type')
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr))


def _to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    """Any Pillow mode -> RGB uint8 (see the module docstring for the rules)."""
    mode = img.mode
    if mode == 'RGB':
        return img
    if mode.startswith('I;16') or mode in ('I', 'F'):
        arr = np.asarray(img)
        # 'I;16*' is 16-bit by definition. 'I'/'F' (32-bit) have no fixed range: 16-bit PNGs
        # open as 'I', so values above 255 are taken as 16-bit; 'F' in [0, 1] as 0-1.
        if mode.startswith('I;16') or arr.max(initial=0) > 255:
            arr = arr.astype(np.float32) * (255 / 65535)
            notes.append('16-bit image scaled to 8 bits')
        elif mode == 'F' and arr.max(initial=0) <= 1.0:
            arr = arr * 255
        arr = np.nan_to_num(arr.astype(np.float32), nan=0.0)
        return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), 'L').convert('RGB')
    if mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in img.info:  # has alpha
        rgba = img.convert('RGBA')
        if rgba.getextrema()[3][0] < 255:  # some pixel is (partly) transparent
            white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
            notes.append('transparent areas composited on white')
            return Image.alpha_composite(white, rgba).convert('RGB')
        return rgba.convert('RGB')
    try:
        return img.convert('RGB')
    except (ValueError, OSError) as e:
        raise ImageError(f'cannot convert a {mode!r} image to RGB ({e})') from None


def load_rgb(source: Any, *, name: str | None = None, size: int | None = None
             ) -> tuple[Image.Image, list[str]]:
    """A path, bytes, file object, PIL image or numpy array -> (RGB PIL image, notes).
    ``size``: the side it will be resized to (a JPEG may then be decoded at a reduced scale).

    Raises :class:`ImageError` with a one-line reason for anything that is not a usable image.
    """
    what = describe(source, name)
    notes: list[str] = []
    opened = None  # an image we opened (and must close), as opposed to one we were given
    if source is None:
        raise ImageError('no image given')
    if isinstance(source, np.ndarray):
        img = _array_to_image(source, what)
    elif isinstance(source, Image.Image):
        img = source
        _check_pixels(*img.size, what)
    elif isinstance(source, (str, os.PathLike, bytes, bytearray)):
        img = opened = _open(source, what)
    elif hasattr(source, 'read'):
        img = opened = _open(source.read(), what)
    else:
        raise ImageError(f'{what}: unsupported input type {type(source).__name__}; pass a path, '
                         f'bytes, a PIL image or a numpy array')
    done = False
    try:
        # is_animated looks at most one frame ahead; n_frames would decode a GIF to its end
        if getattr(img, 'is_animated', False):
            img.seek(0)
            notes.append('animated image: classified the first frame')
        if opened is not None and img.format == 'JPEG' and size:
            # Decode at 1/2, 1/4 or 1/8 scale in the DCT (itself an antialiased reduction) while
            # every side stays >= 4x what we need: a 12 MP photo decodes in 33 ms, not 81 ms.
            img.draft(img.mode, (size * 4, size * 4))
        img.load()
        if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation; else no (full-size) copy
            img = ImageOps.exif_transpose(img)
        img = _to_rgb(img, notes)
        done = True
    except ImageError as e:
        raise ImageError(f'{what}: {e}') from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
        raise ImageError(f'{what}: corrupt or truncated image ({e})') from None
    finally:
        # a failed or multi-frame decode keeps the file open; the result is a new image
        # unless the file held plain RGB, which Pillow has already closed after load()
        if opened is not None and (opened is not img or not done):
            opened.close()
    return img, notes


def resize_to_model(img: Image.Image, size: int) -> np.ndarray:
    """RGB image -> size x size x 3 uint8: centre square crop, antialiased BICUBIC resize."""
    w, h = img.size
    if (w, h) != (size, size):
        s = min(w, h)
        box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
        img = img.resize((size, size), RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
    return np.asarray(img, dtype=np.uint8)


def prepare_image(source: Any, *, size: int, name: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Any supported input -> (size x size x 3 uint8 RGB array, notes). See the module docstring."""
    img, notes = load_rgb(source, name=name, size=size)
    return resize_to_model(img, size), notes


def normalize(batch: np.ndarray, mean: Sequence[float], std: Sequence[float],
              scale: float = 255) -> np.ndarray:
    """N x H x W x 3 uint8 -> N x 3 x H x W float32 (a transposed view of NHWC memory, i.e.
    channels-last strides), normalized with the very float32 operations of the loaders'
    ``Normalize`` (``ffcv_pipeline.pixels``) -- ``(x - mean) * (1 / std)`` -- so the values
    are bit-identical to what the model saw in training."""
    x = np.asarray(batch, dtype=np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)
    inv_std = np.float32(1) / np.asarray(std, dtype=np.float32)
    if scale != 255:  # mean/std given on another scale (e.g. 0-1): bring pixels to it first
        x = x * np.float32(scale / 255)
    x = (x - mean32) * inv_std  # broadcasts over the last (channel) axis of NHWC
    return x.transpose(0, 3, 1, 2)
