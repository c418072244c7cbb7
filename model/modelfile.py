"""A model as a Hugging Face model repository holds it: the weights in ``model.safetensors``,
everything else the predictor needs in ``config.json`` beside them; and the one loader that
takes either this or a ``.pt`` checkpoint.

    save_model_folder(ckpt, 'export/model-repo')   # model.safetensors + config.json
    ckpt = load_model_file('export/model-repo')    # the folder, its model.safetensors or its config.json
    ckpt = load_model_file('runs/<run>/best.pt')   # a checkpoint, as load_checkpoint reads it

``load_model_file`` returns the same dict a slim checkpoint is (``model.checkpoint``), so the
predictor, the app and the export treat both alike. ``config.json`` (format version 1)::

    format            'cifar100-ffcv-model'      (identifies our files)
    format_version    1
    weights           {'file': 'model.safetensors', 'dtype': 'float32' or 'float16'}
    model_config      {'arch': 'resnet18', 'num_classes': 100, 'width': 64}: the network to build
    image_size        pixels per side the network takes
    normalization     {'mean': [r, g, b], 'std': [r, g, b], 'scale': 255}
    class_names       one name per output;  coarse_names, fine_to_coarse: superclasses, or null
    ...               every other metadata key of the checkpoint (dataset, epoch, metrics, the
                      training config, created, torch_version): passed through unchanged

Weights in safetensors, not a pickle: loading them runs no code, and any framework reads them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint import EMA_KEYS, FORMAT, FORMAT_VERSION, RESUME_KEYS, CheckpointError, check_format, load_checkpoint
from .fileio import atomic_write, atomic_write_text

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
CONFIG_FORMAT = 'cifar100-ffcv-model'
CONFIG_FORMAT_VERSION = 1
# Checkpoint keys that are not metadata: the weights, the checkpoint's own format fields, and what
# only resuming a run needs (its position, optimizer, RNG states).
NOT_METADATA = ('model', 'format', 'format_version', 'inference_only', 'weights_dtype', 'step', 'batch',
                'elapsed_s', 'partial') + RESUME_KEYS + EMA_KEYS
# model_config keys that describe how a run laid out memory, not what the network is
RUNTIME_MODEL_KEYS = ('channels_last',)


def is_model_folder_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names the safetensors form: a folder, a ``.safetensors`` file or a
    ``config.json`` (anything else is read as a ``.pt`` checkpoint)."""
    path = Path(path)
    return path.is_dir() or path.suffix.lower() == '.safetensors' or path.name == CONFIG_NAME


def model_config_json(ckpt: dict) -> dict:
    """What ``config.json`` holds for ``ckpt`` (a checkpoint dict)."""
    weights = ckpt['model']
    dtypes = {str(v.dtype).replace('torch.', '') for v in weights.values() if v.is_floating_point()}
    meta = {k: v for k, v in ckpt.items() if k not in NOT_METADATA}
    meta['model_config'] = {k: v for k, v in ckpt['model_config'].items() if k not in RUNTIME_MODEL_KEYS}
    first = {k: meta.pop(k) for k in ('model_config', 'image_size', 'normalization') if k in meta}  # the short keys on top
    return {'format': CONFIG_FORMAT, 'format_version': CONFIG_FORMAT_VERSION,
            'weights': {'file': WEIGHTS_NAME, 'dtype': '+'.join(sorted(dtypes)) or 'float32'}, **first, **meta}


def save_model_folder(ckpt: dict, folder: str | os.PathLike) -> list[Path]:
    """Write ``ckpt``'s weights as ``model.safetensors`` and its metadata as ``config.json`` into
    ``folder`` (each atomically); returns the two paths."""
    from safetensors.torch import save
    folder = Path(folder)
    # safetensors stores each tensor's own bytes: no views into shared storage, no strides
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in ckpt['model'].items()}
    blob = save(tensors, metadata={'format': 'pt'})  # 'pt': the key transformers' loaders look for
    atomic_write(folder / WEIGHTS_NAME, lambda f: f.write(blob))
    # default=str: a config value JSON has no type for (a path) is written as its text
    atomic_write_text(folder / CONFIG_NAME, json.dumps(model_config_json(ckpt), indent=2, default=str) + '\n')
    return [folder / WEIGHTS_NAME, folder / CONFIG_NAME]


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f'{path}: no such file; model.safetensors needs the {CONFIG_NAME} written '
                              f'beside it (scripts/export.py --hub-model)')
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f'{path}: not readable JSON ({type(e).__name__}: {str(e).splitlines()[0]})') from None
    if not isinstance(config, dict) or config.get('format') != CONFIG_FORMAT:
        raise CheckpointError(f'{path}: not a {CONFIG_FORMAT} config (written by scripts/export.py --hub-model)')
    if config.get('format_version', 0) > CONFIG_FORMAT_VERSION:
        raise CheckpointError(f'{path}: config format version {config["format_version"]} is newer than this '
                              f'code supports ({CONFIG_FORMAT_VERSION}); update the code')
    return config


def load_model_folder(path: str | os.PathLike) -> dict:
    """The checkpoint dict of a ``model.safetensors`` + ``config.json`` pair; ``path`` is their
    folder or either file. :class:`~model.checkpoint.CheckpointError` naming the file otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f'{path}: no such file or folder')
    folder = path if path.is_dir() else path.parent
    config_path = folder / CONFIG_NAME
    if path.is_dir() and not (folder / WEIGHTS_NAME).exists() and not config_path.exists():
        raise CheckpointError(f'{path}: a folder without {WEIGHTS_NAME} and {CONFIG_NAME} (a model '
                              f'repository written by scripts/export.py --hub-model)')
    config = _read_config(config_path)
    weights_info = config.pop('weights', None) or {}
    weights = path if path.suffix.lower() == '.safetensors' else folder / str(weights_info.get('file', WEIGHTS_NAME))
    if not weights.is_file():
        raise CheckpointError(f'{weights}: no such weights file (named by {config_path})')
    try:
        from safetensors.torch import load_file
        state = load_file(str(weights), device='cpu')
    except ImportError as e:
        raise CheckpointError(f'{weights}: reading it needs the safetensors package ({e})') from None
    except Exception as e:  # safetensors raises its own SafetensorError (a header it cannot parse, ...)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ''
        raise CheckpointError(f'{weights}: not a readable safetensors file ({type(e).__name__}: {first})') from None
    for key in ('format', 'format_version'):
        config.pop(key, None)
    ckpt = {'format': FORMAT, 'format_version': FORMAT_VERSION, **config, 'model': state,
            'inference_only': True, 'weights_dtype': weights_info.get('dtype', 'float32')}
    check_format(ckpt, config_path)
    return ckpt


def load_model_file(path: str | os.PathLike) -> dict:
    """A ``.pt`` checkpoint (:func:`~model.checkpoint.load_checkpoint`) or the safetensors form
    (:func:`load_model_folder`), by what ``path`` names."""
    return load_model_folder(path) if is_model_folder_path(path) else load_checkpoint(path)
