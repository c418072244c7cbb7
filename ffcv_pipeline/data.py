"""From a training config to the two loaders the trainer iterates.

    data = build_data(cfg, device=device, dtype=torch.bfloat16, root=ROOT, workers=8)
    for x, y in data.train.epoch(3): ...          # same batches for the same (seed, epoch)

``data.loader``: ``ffcv`` (the ``.beton`` files through FFCV's JIT pipeline), ``torchvision``
(the ``.npy`` arrays beside them through a torch DataLoader, ``torch_loader.py``: no ffcv,
numba or OpenCV), or ``auto`` (ffcv where it imports). Both give the same augmentation, pixel for
pixel. Reads ``manifest.json`` (class names; split sizes and file sizes to check the files
against), checks the files before a loader opens them (:func:`~ffcv_pipeline.beton.check_beton`),
warns when the training file is the test split, takes the class-balanced subsets
``data.train_per_class`` / ``data.test_per_class`` and shards the test set over ``torchrun``
processes. Importing this module does not import ffcv; building FFCV loaders does.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import ffcv_import_error
from .augment import settings
from .archive import DatasetError
from .constants import COARSE_LABEL_NAMES, FINE_LABEL_NAMES
from .interface import Batches
from .writer import read_manifest


@dataclass
class TrainingData:
    train: Batches  # interface.Batches: .epoch(e) -> (x, y) batches; len() = batches per epoch
    test: Batches  # the resident split, or a test loader
    class_names: list[str]
    coarse_names: list[str]
    loader: str = 'ffcv'  # which loader: 'ffcv' or 'torchvision'
    notices: list[str] = field(default_factory=list)  # one-line warnings for the log

    def warm_up(self) -> float:
        """Compile the FFCV pipelines (numba; the resident test split has none) before the
        epochs are timed: one batch of each; returns seconds."""
        t = time.perf_counter()
        for loader in (self.train, self.test):
            for _ in loader.epoch(0):
                break  # closing the iterator joins its thread before the next loader starts
        return time.perf_counter() - t

    def close(self) -> None:
        self.train.close()
        self.test.close()


def resolve_path(p: str | Path, root: Path) -> Path:
    """Config paths are relative to the repository root, not to the working directory."""
    return Path(p) if Path(p).is_absolute() else root / p


def per_class_indices(labels: np.ndarray, per_class: int) -> np.ndarray | None:
    """The first ``per_class`` indices of every class (sorted), or None for all."""
    if per_class <= 0:
        return None
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
    return np.sort(keep)


def _split_entry(manifest: dict | None, path: Path) -> tuple[str | None, dict | None]:
    """(split name, {'count', 'bytes'}) of the file ``path`` names, if the manifest lists it."""
    for split, e in ((manifest or {}).get('splits') or {}).items():
        if e.get('file') == path.name:
            return split, {'count': e.get('count'), 'bytes': e.get('bytes')}
        if e.get('arrays') == path.name:
            return split, {'count': e.get('count'), 'bytes': e.get('arrays_bytes')}
    return None, None


def resolve_loader(name: str) -> tuple[str, str | None]:
    """``data.loader`` -> ('ffcv' | 'torchvision', a one-line notice or None)."""
    if name == 'torchvision':
        return name, None
    err = ffcv_import_error()
    if err is None:
        return 'ffcv', None
    if name == 'ffcv':
        raise DatasetError(f"data.loader: 'ffcv' does not import here ({err}); use "
                           f"--data.loader torchvision (or auto)")
    return 'torchvision', f'notice: ffcv does not import here ({err}); using the torchvision loader'


def check_arrays(path: Path, *, expected: dict | None = None,
                 reader: str = 'the torchvision loader') -> np.ndarray:
    """The split's memory-mapped arrays, or :class:`DatasetError` naming what is wrong (the one
    check of a ``.npy`` split; ``reader``: who needs it, for the missing-file message)."""
    from .pixels import load_arrays
    from .writer import ARRAY_DTYPE
    fix = 'rewrite it with `python scripts/write_datasets.py --force`'
    if not path.is_file():
        raise DatasetError(f'{path}: no such file ({reader} reads the arrays beside '
                           f'{path.with_suffix(".beton").name}); run `python scripts/write_datasets.py`')
    try:
        arrays = load_arrays(path)
    except (OSError, ValueError) as e:
        raise DatasetError(f'{path}: not a readable .npy file ({e}); {fix}') from None
    if arrays.dtype != ARRAY_DTYPE or arrays.ndim != 1:
        raise DatasetError(f'{path}: holds {arrays.dtype} {arrays.shape}, not CIFAR images and '
                           f'labels; {fix}')
    if expected and expected.get('count') is not None and len(arrays) != expected['count']:
        raise DatasetError(f'{path}: holds {len(arrays):,} images but manifest.json records '
                           f'{expected["count"]:,}; {fix}')
    return arrays


def build_data(cfg, *, device: torch.device, dtype: torch.dtype, root: Path, workers: int,
               channels_last: bool = True, rank: int = 0, world_size: int = 1) -> TrainingData:
    """The train/test loaders of ``cfg`` (the training config) on ``device``, with ``workers``
    loader threads (FFCV) or processes (torchvision); under torchrun, ``rank``/``world_size``
    shard the data."""
    d = cfg.data
    kind, notice = resolve_loader(d.loader)
    paths = [resolve_path(p, root) for p in (d.train_path, d.test_path)]
    if kind == 'torchvision':  # the .npy arrays written beside the .beton files
        paths = [p.with_suffix('.npy') for p in paths]
    manifests = [read_manifest(p.parent) for p in paths]
    (train_split, train_entry), (_, test_entry) = (_split_entry(m, p) for m, p in zip(manifests, paths))
    notices = [notice] if notice else []
    if train_split == 'test':
        notices.append(f'warning: data.train_path {paths[0]} is the TEST split (manifest.json); '
                       f'test accuracy will be meaningless')
    if kind == 'ffcv':
        from .beton import beton_labels, check_beton
        for p, e in zip(paths, (train_entry, test_entry)):
            check_beton(p, expected=e)
        train_labels, test_labels = beton_labels(paths[0]), beton_labels(paths[1])
    else:
        train_labels, test_labels = (check_arrays(p, expected=e)['label'].astype(np.int64)
                                     for p, e in zip(paths, (train_entry, test_entry)))
    n_labels = int(max(train_labels.max(), test_labels.max())) + 1
    if cfg.model.num_classes < n_labels:
        raise DatasetError(f'model.num_classes: {cfg.model.num_classes} is fewer than the '
                           f'{n_labels} classes in {paths[0].name}')
    train_idx = per_class_indices(train_labels, d.train_per_class)
    test_idx = per_class_indices(test_labels, d.test_per_class)
    if test_idx is None:
        test_idx = np.arange(len(test_labels))
    if world_size > 1:  # exact, disjoint evaluation shards; sums are all-reduced
        test_idx = test_idx[rank::world_size]
    aug = settings(cfg.augment)
    resident = d.resident_test is not False  # null = auto: always (30 MB fit on any device)
    make = _ffcv_loaders if kind == 'ffcv' else _torch_loaders
    train, test = make(cfg, paths, aug, train_idx, None if resident else test_idx, device=device,
                       dtype=dtype, workers=workers, channels_last=channels_last, rank=rank,
                       world_size=world_size)
    if resident:  # evaluated at the training batch shape: cuDNN tunes no second set of kernels
        from .resident import ResidentSplit
        test = ResidentSplit.from_file(paths[1], indices=test_idx, device=device,
                                       dtype=torch.float32 if device.type == 'cpu' else dtype,
                                       batch_size=d.batch_size, channels_last=channels_last)
    m = manifests[0] or {}
    return TrainingData(train, test, list(m.get('fine_label_names', FINE_LABEL_NAMES)),
                        list(m.get('coarse_label_names', COARSE_LABEL_NAMES)), kind, notices)


def _ffcv_loaders(cfg, paths, aug, train_idx, test_idx, *, device, dtype, workers, channels_last,
                  rank, world_size):
    from .loaders import make_loader, test_pipeline, train_pipeline
    from .ops import AugmentationState
    d, seed = cfg.data, cfg.training.seed
    state = AugmentationState(seed)
    train = make_loader(paths[0], batch_size=d.batch_size, num_workers=workers, order=d.order,
                        os_cache=d.os_cache, drop_last=True, distributed=world_size > 1, seed=seed,
                        indices=train_idx, batches_ahead=d.batches_ahead, state=state,
                        pipelines=train_pipeline(device=device, dtype=dtype, state=state,
                                                 channels_last=channels_last, **aug))
    if test_idx is None:  # the test split is resident on the device instead
        return train, None
    test = make_loader(paths[1], batch_size=d.test_batch_size, num_workers=workers, order='sequential',
                       os_cache=d.os_cache, drop_last=False, indices=test_idx,
                       batches_ahead=d.batches_ahead,
                       pipelines=test_pipeline(device=device, dtype=dtype, channels_last=channels_last))
    return train, test


def _torch_loaders(cfg, paths, aug, train_idx, test_idx, *, device, dtype, workers, channels_last,
                   rank, world_size):
    from .torch_loader import make_torch_loader
    d, seed = cfg.data, cfg.training.seed
    # float32 on the CPU, as the FFCV path's CPU normalization gives (autocast handles bf16)
    dtype = torch.float32 if device.type == 'cpu' else dtype
    common = dict(num_workers=workers, device=device, dtype=dtype, seed=seed, prefetch=d.batches_ahead,
                  channels_last=channels_last)
    train = make_torch_loader(paths[0], batch_size=d.batch_size, train=True, augment=aug,
                              indices=train_idx, rank=rank, world_size=world_size, **common)
    if test_idx is None:  # the test split is resident on the device instead
        return train, None
    test = make_torch_loader(paths[1], batch_size=d.test_batch_size, train=False, indices=test_idx,
                             **common)
    return train, test
