"""The checkpoint format: self-describing, written atomically, loadable with torch alone.

A checkpoint is a dict saved with ``torch.save``::

    format            'cifar100-ffcv-checkpoint'      (identifies our files)
    format_version    1
    model             state_dict of the bare model (unwrapped from DDP and torch.compile), fp32
    model_config      {'arch': 'resnet18', 'num_classes': 100, 'width': 64}
    dataset           the dataset value (``ffcv_pipeline.datasets.Dataset.to_dict``: name, title,
                      class names, superclasses, image size, mean/std); absent before it existed
                      (then CIFAR-100). From it, for every reader of format 1 (the app, a Space):
    class_names       the class names;  coarse_names / fine_to_coarse: superclass names and the
                      class -> superclass map, or None where the dataset has no superclasses
    normalization     {'mean': [r, g, b], 'std': [r, g, b], 'scale': 255}  (pixels on 0-255)
    image_size        pixels per side
    config            the full resolved training config (dict)
    epoch             epochs completed;  step: optimizer steps taken
    metrics           {'test_top1', 'test_top5', 'best_top1', 'epochs_planned', 'params',
                       'train_seconds' (wall-clock since the run started, resumes included)}
    created           ISO time;  torch_version
    -- for resuming (absent from inference-only exports) --
    optimizer, scaler, rng {'python', 'numpy', 'torch', 'cuda'}, best_top1
    raw_model, ema    only with weight averaging (training.ema): then 'model' holds the averaged
                      weights (evaluated, exported), 'raw_model' the trained ones, 'ema' the
                      EMA's {'decay', 'every', 'updates'}
    -- only in inference-only exports (``slim_checkpoint``, ``scripts/export.py``) --
    inference_only    True;  weights_dtype: 'float32' or 'float16'

Inference (``app/``, ``scripts/predict.py``) needs only torch and this module: no ffcv.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .fileio import atomic_write
from .errors import UserError
from .project import RUNS_DIR
from .registry import ARCHS, build_model

FORMAT = 'cifar100-ffcv-checkpoint'
FORMAT_VERSION = 1
REQUIRED_KEYS = ('model', 'model_config', 'class_names', 'normalization')
RESUME_KEYS = ('optimizer', 'scaler', 'rng', 'best_top1')  # training state, not inference
EMA_KEYS = ('raw_model', 'ema')  # with training.ema: the raw training weights and the EMA's counters


class CheckpointError(UserError, ValueError):
    """The file is missing, unreadable, or not one of our checkpoints; one clear line."""


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` atomically (see :func:`model.fileio.atomic_write`): readers never see a
    half-written checkpoint, a crash or a full disk mid-write keeps the previous one."""
    atomic_write(path, lambda f: torch.save(obj, f))


def latest_run_checkpoint(root: str | os.PathLike, name: str = 'best.pt') -> Path | None:
    """The most recently modified ``<root>/runs/*/<name>`` (where ``scripts/train.py`` writes
    by default: ``output.dir`` = :data:`RUNS_DIR`), or None."""
    found = [p for p in Path(root).glob(f'{RUNS_DIR}/*/{name}') if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def load_checkpoint(path: str | os.PathLike, map_location='cpu') -> dict:
    """Load and validate one of our checkpoints; raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: no such checkpoint file')
    try:
        # weights_only: a checkpoint is data; refuse pickled code
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f'{path}: not a readable checkpoint ({type(e).__name__}); '
                              f'expected a file written by scripts/train.py') from None
    check_format(ckpt, path)
    return ckpt


def check_format(ckpt, path: str | os.PathLike) -> None:
    """That ``ckpt`` is one of our checkpoints, of a version this code reads, with the keys the
    predictor needs and a known architecture; :class:`CheckpointError` naming ``path`` otherwise."""
    if not isinstance(ckpt, dict) or ckpt.get('format') != FORMAT:
        raise CheckpointError(f'{path}: not a {FORMAT} file (train one with '
                              f'`python scripts/train.py --config rn18.yaml`)')
    if ckpt.get('format_version', 0) > FORMAT_VERSION:
        raise CheckpointError(f'{path}: checkpoint format version {ckpt["format_version"]} is newer '
                              f'than this code supports ({FORMAT_VERSION}); update the code')
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f'{path}: checkpoint lacks {", ".join(missing)}')
    arch = ckpt['model_config'].get('arch')
    if arch not in ARCHS:
        raise CheckpointError(f'{path}: unknown architecture {arch!r} (known: {sorted(ARCHS)})')


def _shape(t) -> str:
    return ' x '.join(map(str, t.shape)) or 'a scalar'


def weights_mismatch(expected: dict, found: dict) -> str | None:
    """The first tensor where ``found`` (a file's weights) differs from ``expected`` (the
    state_dict of the model its metadata describes), in the model's order; None if they fit."""
    for name, want in expected.items():
        if name not in found:
            return f'tensor {name} ({_shape(want)}) is missing from the file'
        if tuple(found[name].shape) != tuple(want.shape):
            return f'tensor {name} is {_shape(found[name])} in the file, {_shape(want)} in that model'
    extra = next((k for k in found if k not in expected), None)
    return None if extra is None else f'tensor {extra} ({_shape(found[extra])}) in the file is not part of that model'


def model_from_checkpoint(ckpt: dict, *, channels_last: bool = True, what: str = 'checkpoint') -> torch.nn.Module:
    """The checkpoint's model with its weights, in eval mode, on the CPU. Weights that do not fit
    what the metadata says the model is (another width or architecture, a head of another size),
    or class names of another count than the head's outputs: :class:`CheckpointError` naming
    ``what`` (the file) and the first mismatching tensor, in one line."""
    cfg = ckpt['model_config']
    model = build_model({**cfg, 'channels_last': channels_last})
    described = ', '.join(f'{k} {v}' for k, v in cfg.items() if k != 'channels_last' and v is not None)
    expected = model.state_dict()
    problem = weights_mismatch(expected, ckpt['model'])
    if problem:
        raise CheckpointError(f'{what}: weights do not fit the model its metadata describes ({described}): {problem}')
    head = next((k for k, v in reversed(expected.items()) if v.dim() == 2), None)  # the last linear layer
    names = ckpt.get('class_names')
    if head is not None and names is not None and len(names) != expected[head].shape[0]:
        raise CheckpointError(f'{what}: {len(names)} class names for a {expected[head].shape[0]}-class model '
                              f'(tensor {head} is {_shape(expected[head])})')
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError as e:  # shapes and names fit (checked above): a dtype torch cannot copy
        raise CheckpointError(f'{what}: weights do not load ({str(e).strip().splitlines()[-1]})') from None
    return model.eval()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, '_orig_mod'):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, 'module') and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def model_state(model: torch.nn.Module) -> dict:
    """The bare model's state_dict, floating point as float32: views of the live tensors where
    they already are float32 (the trainer's snapshot copies them)."""
    return {k: v.detach().float() if v.is_floating_point() else v.detach()
            for k, v in unwrap(model).state_dict().items()}


def make_checkpoint(model: torch.nn.Module, *, model_config: dict, dataset: dict,
                    config: dict | None = None, epoch: int = 0, step: int = 0,
                    metrics: dict | None = None, host: bool = True, **extra) -> dict:
    """The inference part of a checkpoint (the trainer adds optimizer/scaler/RNG states).
    ``dataset``: the dataset value as a dict (``Dataset.to_dict()``). ``host=False``: the weights
    stay where they are (the trainer's snapshot copies them)."""
    import datetime as _dt
    state = model_state(model)
    if host:
        state = {k: v.cpu() for k, v in state.items()}
    return {
        'format': FORMAT, 'format_version': FORMAT_VERSION,
        'model': state, 'model_config': dict(model_config),
        'dataset': dict(dataset), 'class_names': list(dataset['class_names']),
        'coarse_names': _list_or_none(dataset.get('superclass_names'), str),
        'fine_to_coarse': _list_or_none(dataset.get('superclass_of'), int),
        'normalization': {'mean': [float(m) for m in dataset['mean']],
                          'std': [float(s) for s in dataset['std']], 'scale': 255},
        'image_size': int(dataset['image_size']), 'config': config or {}, 'epoch': int(epoch), 'step': int(step),
        'metrics': dict(metrics or {}),
        'created': _dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds'),
        'torch_version': str(torch.__version__), **extra,
    }


def _list_or_none(v, kind):
    return None if v is None else [kind(x) for x in v]


def slim_checkpoint(ckpt: dict, *, fp16: bool = False) -> dict:
    """The inference-only part of ``ckpt``: weights and metadata, without :data:`RESUME_KEYS`
    (about half the file). ``fp16``: floating-point weights stored as float16 (half again);
    ``model_from_checkpoint`` loads them into the float32 model as usual."""
    slim = {k: v for k, v in ckpt.items() if k not in RESUME_KEYS + EMA_KEYS}
    if fp16:
        slim['model'] = {k: v.half() if v.is_floating_point() else v
                         for k, v in ckpt['model'].items()}
    slim['inference_only'] = True
    slim['weights_dtype'] = 'float16' if fp16 else 'float32'
    return slim
