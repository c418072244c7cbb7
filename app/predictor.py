"""Images in, CIFAR-100 classes out: the inference side of a checkpoint, torch + Pillow only.

    from app.predictor import Predictor
    p = Predictor('runs/rn18/best.pt')
    p.predict('cat.jpg', topk=5)        # -> Prediction(classes=[('tiger', 0.41), ...], superclass=...)
    p.predict_batch([img1, img2])       # paths, PIL images or numpy arrays, any size and mode

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
    would distort) and resize to 32x32 with Pillow's **BICUBIC** filter, which is antialiased
    (its support widens with the reduction factor), with ``reducing_gap=3`` (a box reduction to
    >= 3x the target first: 6x faster on a 12 MP photo, 0.3-0.6 grey levels off on average
    versus a full-resolution resize); a 32x32 image is not resampled at all;
  * normalize exactly as ``ffcv_pipeline.loaders.Normalize`` does on the training/test data:
    float32 ``(x - mean) * (1 / std)`` with the checkpoint's 0-255 mean/std, NCHW channels-last.

Speed: the model is served with every BatchNorm folded into the conv before it
(``torch.fx`` ``fuse``; logits match the plain model to ~1e-6) under ``torch.inference_mode``,
channels-last; ``compile_model=True`` adds ``torch.compile`` with frozen weights. Measured on
the 2-core Xeon (Sapphire Rapids, KVM) this was written on, idle, ResNet-18 width 64:

    python scripts/predict.py cifar32.png --checkpoint rn18.pt --benchmark 200 [--compile]
    -> p50 8.4-9.0 ms eager, 6.4-7.0 ms compiled (acceptance: <= 10 ms); a 12 MP JPEG: 41 ms
    (docs/BENCHMARKS.md "Serving" has the table and the behaviour under CPU contention)

Tried and not kept as the default: TorchScript trace+freeze (~0.5 ms faster, deprecated in
torch 2.14), ``optimize_for_inference`` and ``to_mkldnn`` (slower at batch 1), contiguous NCHW
(no faster), 1 thread (14 ms), bf16 on AMX (~25% faster but logits differ by ~5e-3).
"""
from __future__ import annotations

import io
import math
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from model.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from model.resnet import count_parameters

IMAGE_SIZE = 32
MAX_PIXELS = 50_000_000  # refuse bigger images: 50 MP decodes to 150 MB of RGB already
RESAMPLE = Image.Resampling.BICUBIC
REDUCING_GAP = 3.0
TRAIN_COMMAND = 'python scripts/train.py --config rn18.yaml'
NO_CHECKPOINT_MESSAGE = (
    f'No trained model found. Train one with `{TRAIN_COMMAND}` (it writes runs/<name>/best.pt), '
    f'or point to a checkpoint with --checkpoint PATH or the MODEL_PATH environment variable.')

HERE = Path(__file__).resolve().parent  # app/
ROOT = HERE.parent  # the repository root (in the repo layout)

__all__ = ['Predictor', 'Prediction', 'ImageError', 'CheckpointError', 'prepare_image',
           'load_rgb', 'normalize', 'resolve_checkpoint', 'fold_batchnorm', 'compile_for_cpu',
           'MAX_PIXELS', 'NO_CHECKPOINT_MESSAGE', 'latency']


class ImageError(ValueError):
    """The input is not a usable image; the message says which input and why, in one line."""


# --------------------------------------------------------------------------- decoding

def _describe(source: Any, name: str | None) -> str:
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
    has_alpha = mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in img.info
    if has_alpha:
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


def load_rgb(source: Any, *, name: str | None = None) -> tuple[Image.Image, list[str]]:
    """A path, bytes, file object, PIL image or numpy array -> (RGB PIL image, notes).

    Raises :class:`ImageError` with a one-line reason for anything that is not a usable image.
    """
    what = _describe(source, name)
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
        if opened is not None and img.format == 'JPEG':
            # Decode at 1/2, 1/4 or 1/8 scale in the DCT (itself an antialiased reduction) while
            # every side stays >= 4x what we need: a 12 MP photo decodes in 33 ms, not 81 ms.
            img.draft(img.mode, (IMAGE_SIZE * 4, IMAGE_SIZE * 4))
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


def resize_to_model(img: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """RGB image -> size x size x 3 uint8: centre square crop, antialiased BICUBIC resize."""
    w, h = img.size
    if (w, h) != (size, size):
        s = min(w, h)
        box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
        img = img.resize((size, size), RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
    return np.asarray(img, dtype=np.uint8)


def prepare_image(source: Any, *, name: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Any supported input -> (32x32x3 uint8 RGB array, notes). See the module docstring."""
    img, notes = load_rgb(source, name=name)
    return resize_to_model(img), notes


def normalize(batch: np.ndarray, mean: Sequence[float], std: Sequence[float],
              scale: float = 255) -> torch.Tensor:
    """N x 32 x 32 x 3 uint8 -> N x 3 x 32 x 32 float32 (channels-last strides), normalized
    with the very ops of ``ffcv_pipeline.loaders.Normalize`` so the values are bit-identical."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)  # NHWC memory = channels-last
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    inv_std = 1 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = x.to(torch.float32)
    if scale != 255:  # mean/std given on another scale (e.g. 0-1): bring pixels to it first
        x = x.mul_(scale / 255)
    return x.sub_(mean_t).mul_(inv_std)


# --------------------------------------------------------------------------- the model

def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """The model with each BatchNorm folded into the conv before it (eval only): one op less per
    conv, same maths. Returns the model unchanged if ``torch.fx`` cannot trace it."""
    try:
        from torch.fx.experimental.optimization import fuse
        fused = fuse(model.eval(), inplace=False)
    except Exception as e:  # an untraceable model: serve it unfused, results are the same
        warnings.warn(f'BatchNorm folding skipped ({type(e).__name__}: {e})')
        return model
    return fused.to(memory_format=torch.channels_last).eval()


def compile_for_cpu(model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module | None:
    """``torch.compile`` (Inductor) with weight freezing, for inputs shaped like ``example``.

    Freezing constant-folds the weights, prepacks them for oneDNN and fuses conv+add+relu:
    ~1.4x faster at batch 1 here. Costs 5-30 s at start-up (cached in /tmp/torchinductor_*) and
    needs a C++ compiler (the app does it by default, the CLI on ``--compile``); returns
    ``None`` (serve the eager model) if it fails.
    """
    try:
        import torch._inductor.config as inductor_config
        compiled = torch.compile(model, dynamic=False)
        # freezing applies to inference-mode graphs, compiled at this first call
        with inductor_config.patch(freezing=True), torch.inference_mode():
            compiled(example)
        return compiled
    except Exception as e:  # no compiler, unsupported platform, ...: still correct, just slower
        warnings.warn(f'torch.compile failed, serving the eager model ({type(e).__name__}: '
                      f'{str(e).splitlines()[0] if str(e) else ""})')
        return None


@dataclass(frozen=True)
class Prediction:
    """Top-k fine classes (descending probability) and the superclass of the top-1 class.

    ``superclass_prob`` is the summed probability of all fine classes in that superclass.
    ``probs`` holds the full softmax (all classes), ``notes`` what was done to the input.
    """
    classes: list[tuple[str, float]]
    indices: list[int]
    superclass: str | None
    superclass_prob: float | None
    probs: np.ndarray = field(repr=False)
    notes: tuple[str, ...] = ()
    source: str = 'image'

    @property
    def label(self) -> str:
        return self.classes[0][0]

    def to_dict(self) -> dict:
        return {
            'image': self.source,
            'top': [{'rank': r, 'label': n, 'index': i, 'prob': round(float(p), 6)}
                    for r, ((n, p), i) in enumerate(zip(self.classes, self.indices), 1)],
            'superclass': None if self.superclass is None else
            {'label': self.superclass, 'prob': round(float(self.superclass_prob), 6)},
            'notes': list(self.notes),
        }


class Predictor:
    """A checkpoint ready to classify images; thread-safe (one forward pass at a time).

    ``checkpoint``: a path (validated by ``model.checkpoint.load_checkpoint``; a bad one raises
    :class:`CheckpointError`) or an already loaded checkpoint dict.
    ``optimize``: fold BatchNorm into the convs (default); ``False`` runs the plain model.
    ``compile_model``: also ``torch.compile`` the model for single images (see
    :func:`compile_for_cpu`); other batch sizes use the eager model, so nothing recompiles.
    ``num_threads``: ``torch.set_num_threads`` (process-wide); default: torch's (all cores).
    """

    def __init__(self, checkpoint: str | os.PathLike | dict, *, optimize: bool = True,
                 compile_model: bool = False, num_threads: int | None = None):
        if isinstance(checkpoint, dict):
            self.path = None
            ckpt = checkpoint
        else:
            self.path = Path(checkpoint)
            ckpt = load_checkpoint(self.path)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.ckpt_meta = {k: v for k, v in ckpt.items()
                          if k not in ('model', 'optimizer', 'scaler', 'rng')}
        self.class_names: list[str] = list(ckpt['class_names'])
        self.coarse_names: list[str] | None = ckpt.get('coarse_names')
        f2c = ckpt.get('fine_to_coarse')
        self.fine_to_coarse = np.asarray(f2c, dtype=np.int64) if f2c is not None else None
        norm = ckpt['normalization']
        self.mean, self.std = list(norm['mean']), list(norm['std'])
        self.scale = norm.get('scale', 255)
        self.image_size = int(ckpt.get('image_size', IMAGE_SIZE))
        if self.image_size != IMAGE_SIZE:
            raise CheckpointError(f'checkpoint expects {self.image_size}px images; this predictor '
                                  f'serves {IMAGE_SIZE}px models')
        plain = model_from_checkpoint(ckpt, channels_last=True)
        self.num_parameters = count_parameters(plain)
        n = plain.fc.out_features if hasattr(plain, 'fc') else len(self.class_names)
        if n != len(self.class_names):
            raise CheckpointError(f'checkpoint has {len(self.class_names)} class names for a '
                                  f'{n}-class model')
        self.model = fold_batchnorm(plain) if optimize else plain
        self._lock = threading.Lock()
        example = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE).contiguous(memory_format=torch.channels_last)
        self.compiled = compile_for_cpu(self.model, example) if compile_model else None
        self.logits(example)  # warm-up: oneDNN creates its kernels at the first call

    # ----------------------------------------------------------------- core
    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized N x 3 x 32 x 32 float32 -> N x classes logits."""
        x = x.contiguous(memory_format=torch.channels_last)
        model = self.compiled if self.compiled is not None and x.shape[0] == 1 else self.model
        with self._lock:  # torch already uses every core; parallel calls would only thrash
            return model(x).float()

    def preprocess(self, images: Iterable[Any], names: Sequence[str | None] | None = None
                   ) -> tuple[torch.Tensor, list[list[str]]]:
        """Images -> (normalized batch tensor, notes per image)."""
        arrays, notes = [], []
        images = list(images)
        names = list(names) if names is not None else [None] * len(images)
        for img, name in zip(images, names):
            a, n = prepare_image(img, name=name)
            arrays.append(a)
            notes.append(n)
        if not arrays:
            raise ImageError('no images given')
        return normalize(np.stack(arrays), self.mean, self.std, self.scale), notes

    def predict(self, image: Any, topk: int = 5, *, name: str | None = None) -> Prediction:
        """One image (path, bytes, PIL image or numpy array) -> :class:`Prediction`."""
        return self.predict_batch([image], topk, names=[name])[0]

    def predict_batch(self, images: Sequence[Any], topk: int = 5, *,
                      names: Sequence[str | None] | None = None) -> list[Prediction]:
        """Several images in one forward pass; the first bad image raises :class:`ImageError`."""
        images = list(images)
        names = list(names) if names is not None else [None] * len(images)
        if len(names) != len(images):
            raise ValueError(f'{len(names)} names for {len(images)} images')
        k = int(topk)
        if not 1 <= k <= len(self.class_names):
            raise ValueError(f'topk must be between 1 and {len(self.class_names)}, got {topk}')
        x, notes = self.preprocess(images, names)
        with torch.inference_mode():
            probs = torch.softmax(self.logits(x), dim=1)
            top_p, top_i = probs.topk(k, dim=1)  # sorted, descending
            probs_np = probs.numpy()
        out = []
        for row, (img, name) in enumerate(zip(images, names)):
            idx = top_i[row].tolist()
            sup = sup_p = None
            if self.fine_to_coarse is not None and self.coarse_names:
                c = int(self.fine_to_coarse[idx[0]])
                sup = self.coarse_names[c]
                sup_p = float(probs_np[row][self.fine_to_coarse == c].sum())
            out.append(Prediction(
                classes=[(self.class_names[i], float(p)) for i, p in zip(idx, top_p[row].tolist())],
                indices=idx, superclass=sup, superclass_prob=sup_p, probs=probs_np[row].copy(),
                notes=tuple(notes[row]), source=_describe(img, name)))
        return out

    # ----------------------------------------------------------------- metadata
    def info(self) -> dict:
        """What the model panel and ``--json`` show: architecture, size, training results."""
        m = self.ckpt_meta.get('metrics') or {}
        cfg = self.ckpt_meta.get('model_config') or {}
        return {
            'checkpoint': str(self.path) if self.path else None,
            'arch': cfg.get('arch'), 'width': cfg.get('width'),
            'num_classes': len(self.class_names), 'parameters': self.num_parameters,
            'epoch': self.ckpt_meta.get('epoch'), 'epochs_planned': m.get('epochs_planned'),
            'test_top1': m.get('test_top1'), 'test_top5': m.get('test_top5'),
            'best_top1': m.get('best_top1'), 'train_seconds': m.get('train_seconds'),
            'created': self.ckpt_meta.get('created'),
            'torch_version': self.ckpt_meta.get('torch_version'),
        }


def latency(predictor: Predictor, image: Any, n: int) -> dict:
    """Latency of ``predictor.predict(image)`` (decode + prepare + forward + softmax), ms."""
    import time
    for _ in range(min(20, n)):  # warm-up: allocator, oneDNN kernels, page cache
        predictor.predict(image)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        predictor.predict(image)
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {'n': n, 'p50_ms': round(times[n // 2], 2), 'p95_ms': round(times[int(n * 0.95)], 2),
            'min_ms': round(times[0], 2)}


# --------------------------------------------------------------------------- finding a checkpoint

def resolve_checkpoint(explicit: str | os.PathLike | None = None, *,
                       env: dict | None = None, root: Path = ROOT) -> Path | None:
    """Which checkpoint to serve: ``explicit`` (``--checkpoint``), else ``$MODEL_PATH``, else the
    most recently modified ``runs/*/best.pt`` under ``root``, else ``model.pt`` beside this file
    (how a Hugging Face Space ships one); ``None`` if there is none."""
    if explicit:
        return Path(explicit)
    env = os.environ if env is None else env
    if env.get('MODEL_PATH'):
        return Path(env['MODEL_PATH'])
    runs = [p for p in Path(root).glob('runs/*/best.pt') if p.is_file()]
    if runs:
        return max(runs, key=lambda p: p.stat().st_mtime)
    shipped = HERE / 'model.pt'
    return shipped if shipped.is_file() else None


def format_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return 'n/a'
    s = int(round(s))
    return f'{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s' if s >= 3600 else \
        f'{s // 60}m {s % 60:02d}s' if s >= 60 else f'{s}s'
