"""Images in, classes out (of whatever dataset the model was trained on: its file says which),
with either backend: PyTorch (a training or exported checkpoint, ``.pt``, or
``model.safetensors`` + ``config.json`` from ``scripts/export.py --hub-model``: their folder or
either file) or ONNX Runtime (``model.onnx`` from ``scripts/export.py --onnx``).

    from app.predictor import Predictor
    p = Predictor('runs/rn18/best.pt')          # or 'export/model.onnx' (no torch needed)
    p.predict('cat.jpg', topk=5)                # -> Prediction(classes=[('tiger', 0.41), ...], ...)
    p.predict_batch([img1, img2])               # paths, PIL images or numpy arrays, any size/mode

The backend follows the file (``.onnx``, or a folder with only ``model.onnx`` -> ONNX Runtime,
else torch) unless ``backend=`` says otherwise; preprocessing (``app.images``), softmax, top-k and the superclass are the same code
for both. This module and ``app.images`` import neither torch nor onnxruntime: each backend is
imported when a model of its kind is loaded, so a Space that ships ``model.onnx`` runs without
torch installed.

Speed (2-core Xeon, idle, ResNet-18 width 64, one 32x32 PNG, in process): torch eager p50
8.4-9.0 ms, compiled 6.4-7.0 ms, ONNX Runtime: see docs/BENCHMARKS.md "Export / ONNX".
"""
from __future__ import annotations

import importlib
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from model.project import PROJECT_ROOT as ROOT  # standard library only: every Space has it

try:
    from .images import MAX_PIXELS, ImageError, describe, normalize, prepare_image
    from .modelmeta import ModelFileError
except ImportError:  # a flat Space folder (`python app.py`): this file's folder is on sys.path
    from images import MAX_PIXELS, ImageError, describe, normalize, prepare_image
    from modelmeta import ModelFileError

TRAIN_COMMAND = 'python scripts/train.py --config rn18.yaml'
NO_CHECKPOINT_MESSAGE = (
    f'No trained model found. Train one with `{TRAIN_COMMAND}` (it writes runs/<name>/best.pt), '
    f'or point to a checkpoint with --checkpoint PATH or the MODEL_PATH environment variable.')
BACKENDS = ('torch', 'onnx')
# what an exported Space folder holds beside app.py (model.safetensors: a model repository's files)
SHIPPED_MODELS = ('model.onnx', 'model.safetensors', 'model.pt')

HERE = Path(__file__).resolve().parent  # app/ (or the Space folder)

__all__ = ['Predictor', 'Prediction', 'ImageError', 'ModelFileError', 'prepare_image',
           'normalize', 'resolve_checkpoint', 'MAX_PIXELS', 'NO_CHECKPOINT_MESSAGE', 'latency',
           'backend_for']


def backend_for(path: str | os.PathLike, backend: str | None = None) -> str:
    """``backend`` if given, else by the file name: ``.onnx`` (or a folder holding ``model.onnx``
    and no ``model.safetensors``) -> 'onnx', anything else -> 'torch'."""
    if backend not in (None, *BACKENDS):
        raise ValueError(f'backend must be one of {", ".join(BACKENDS)}, got {backend!r}')
    path = Path(path)
    onnx_folder = path.is_dir() and (path / 'model.onnx').is_file() and not (path / 'model.safetensors').exists()
    return backend or ('onnx' if path.suffix.lower() == '.onnx' or onnx_folder else 'torch')


def load_backend(model_file: str | os.PathLike | dict, backend: str | None = None, **options):
    """The backend object for ``model_file``; imports torch or onnxruntime only now."""
    kind = 'torch' if isinstance(model_file, dict) else backend_for(model_file, backend)
    name = f'{kind}_backend'  # app.<kind>_backend, or <kind>_backend in a flat Space folder
    try:
        module = importlib.import_module(f'{__package__}.{name}' if __package__ else name)
    except ImportError as e:  # e.g. a torch-free Space given a .pt file
        raise ModelFileError(f'{model_file}: the {kind} backend is not installed ({e})') from None
    return getattr(module, 'OnnxBackend' if kind == 'onnx' else 'TorchBackend')(model_file, **options)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Prediction:
    """Top-k classes (descending probability) and, where the dataset has superclasses, the
    superclass of the top-1 class (else None).

    ``superclass_prob`` is the summed probability of all classes in that superclass.
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
    """A model ready to classify images; thread-safe (one forward pass at a time).

    ``model_file``: a checkpoint (``.pt``, training or exported), ``model.safetensors`` +
    ``config.json`` (their folder or either file), an ``.onnx`` model, or a loaded checkpoint
    dict; a bad one, or one whose weights do not fit what its metadata says, raises
    :class:`ModelFileError` (a ``ValueError``) naming the file.
    ``backend``: 'torch' or 'onnx' (default: by the file name, see :func:`backend_for`).
    ``optimize``: torch: fold BatchNorm into the convs; onnx: ORT's graph optimizations.
    ``compile_model``: torch only: ``torch.compile`` for single images.
    ``num_threads``: intra-op threads (default: all cores).
    """

    def __init__(self, model_file: str | os.PathLike | dict, *, backend: str | None = None,
                 optimize: bool = True, compile_model: bool = False,
                 num_threads: int | None = None):
        self.path = None if isinstance(model_file, dict) else Path(model_file)
        options = dict(optimize=optimize, num_threads=num_threads)
        if backend_for(model_file if self.path else 'x.pt', backend) == 'torch':
            options['compile_model'] = compile_model  # ONNX Runtime has nothing to compile
        self.backend = load_backend(model_file, backend, **options)
        meta = self.meta = self.backend.meta
        self.class_names: list[str] = list(meta.class_names)
        self.coarse_names: list[str] | None = meta.coarse_names
        self.fine_to_coarse = None if meta.fine_to_coarse is None else np.asarray(meta.fine_to_coarse, dtype=np.int64)
        self.mean, self.std = list(meta.normalization['mean']), list(meta.normalization['std'])
        self.scale = meta.normalization.get('scale', 255)
        self.image_size = meta.image_size  # images are prepared at the size the model trained on
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- core
    def logits(self, x: np.ndarray) -> np.ndarray:
        """Normalized N x 3 x H x W float32 -> N x classes logits (float32)."""
        with self._lock:  # the backend already uses every core; parallel calls would only thrash
            return self.backend.logits(np.asarray(x, dtype=np.float32))

    def preprocess(self, images: Iterable[Any], names: Sequence[str | None] | None = None
                   ) -> tuple[np.ndarray, list[list[str]]]:
        """Images -> (normalized N x 3 x S x S float32 batch at the model's size, notes per image)."""
        images = list(images)
        names = list(names) if names is not None else [None] * len(images)
        prepared = [prepare_image(img, size=self.image_size, name=name) for img, name in zip(images, names)]
        if not prepared:
            raise ImageError('no images given')
        arrays, notes = zip(*prepared)
        return normalize(np.stack(arrays), self.mean, self.std, self.scale), list(notes)

    def predict(self, image: Any, topk: int | None = None, *, name: str | None = None) -> Prediction:
        """One image (path, bytes, PIL image or numpy array) -> :class:`Prediction`."""
        return self.predict_batch([image], topk, names=[name])[0]

    def predict_batch(self, images: Sequence[Any], topk: int | None = None, *,
                      names: Sequence[str | None] | None = None) -> list[Prediction]:
        """Several images in one forward pass; the first bad image raises :class:`ImageError`."""
        images = list(images)
        names = list(names) if names is not None else [None] * len(images)
        if len(names) != len(images):
            raise ValueError(f'{len(names)} names for {len(images)} images')
        k = min(5, len(self.class_names)) if topk is None else int(topk)  # None: 5, or all of fewer
        if not 1 <= k <= len(self.class_names):
            raise ValueError(f'topk must be between 1 and {len(self.class_names)}, got {topk}')
        x, notes = self.preprocess(images, names)
        probs = softmax(self.logits(x))
        top = np.argsort(-probs, axis=1, kind='stable')[:, :k]  # descending, ties by index
        out = []
        for row, (img, name) in enumerate(zip(images, names)):
            idx = top[row].tolist()
            sup = sup_p = None
            if self.fine_to_coarse is not None and self.coarse_names:
                c = int(self.fine_to_coarse[idx[0]])
                sup = self.coarse_names[c]
                sup_p = float(probs[row][self.fine_to_coarse == c].sum())
            out.append(Prediction(
                classes=[(self.class_names[i], float(probs[row, i])) for i in idx],
                indices=idx, superclass=sup, superclass_prob=sup_p, probs=probs[row].copy(),
                notes=tuple(notes[row]), source=describe(img, name)))
        return out

    # ----------------------------------------------------------------- metadata
    def info(self) -> dict:
        """What the model panel and ``--json`` show: architecture, size, training results."""
        return {'checkpoint': str(self.path) if self.path else None,
                'backend': self.backend.description, **self.meta.info()}


def latency(predictor: Predictor, image: Any, n: int) -> dict:
    """Latency of ``predictor.predict(image)`` (decode + prepare + forward + softmax), ms."""
    import time
    for _ in range(min(20, n)):  # warm-up: allocator, kernels, page cache
        predictor.predict(image)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        predictor.predict(image)
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {'n': n, 'p50_ms': round(times[n // 2], 2), 'p95_ms': round(times[int(n * 0.95)], 2),
            'min_ms': round(times[0], 2)}


# --------------------------------------------------------------------------- finding a model

def resolve_checkpoint(explicit: str | os.PathLike | None = None, *, env: dict | None = None,
                       root: str | os.PathLike | None = None,
                       shipped_dir: str | os.PathLike | None = None) -> Path | None:
    """Which model to serve: ``explicit`` (``--checkpoint``), else ``$MODEL_PATH``, else a model
    shipped beside this file (``model.onnx``, ``model.safetensors``, then ``model.pt``: what
    ``scripts/export.py --space`` or ``--hub-model`` writes), else the newest ``runs/*/best.pt`` under ``root`` (the
    repository: ``model.checkpoint.latest_run_checkpoint``); ``None`` if there is none."""
    if explicit:
        return Path(explicit)
    env = os.environ if env is None else env
    if env.get('MODEL_PATH'):
        return Path(env['MODEL_PATH'])
    for name in SHIPPED_MODELS:
        shipped = Path(HERE if shipped_dir is None else shipped_dir) / name
        if shipped.is_file():
            return shipped
    try:
        from model.checkpoint import latest_run_checkpoint
    except ImportError:  # a torch-free Space: no training runs to look for
        return None
    return latest_run_checkpoint(ROOT if root is None else root)


def format_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return 'n/a'
    s = int(round(s))
    return f'{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s' if s >= 3600 else \
        f'{s // 60}m {s % 60:02d}s' if s >= 60 else f'{s}s'
