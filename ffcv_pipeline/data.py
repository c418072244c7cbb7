"""From a training config to the two loaders the trainer iterates.

    data = build_data(cfg, device=device, dtype=torch.bfloat16, root=ROOT, workers=8)
    for x, y in data.train.epoch(3): ...          # same batches for the same (seed, epoch)
    data.dataset                                  # the dataset value (classes, size, mean/std)

``data.loader``: ``ffcv`` (the ``.beton`` files through FFCV's JIT pipeline), ``torchvision``
(the ``.npy`` arrays beside them through a torch DataLoader, ``torch_loader.py``: no ffcv,
numba or OpenCV), or ``auto`` (ffcv where it imports). Both give the same augmentation, pixel for
pixel. The files are ``data.train_path`` / ``data.test_path``, by default those of
``data.dataset`` (``data_beton/<dataset>/``); what they hold -- the dataset value: classes, image
size, mean/std -- comes from the ``manifest.json`` beside them, and everything downstream
(normalization, augmentation sizes, the model's head, the checkpoint) follows it. Checks before
a loader opens anything, each a one-line :class:`DatasetError` naming the offending file: the
files (:func:`~ffcv_pipeline.beton.check_beton`), train and test of one dataset and size, labels
inside the dataset's classes. Also warns when the training file is the test split, takes the
class-balanced subsets ``data.train_per_class`` / ``data.test_per_class`` and shards the test
set over ``torchrun`` processes. Importing this module does not import ffcv; building FFCV
loaders does.
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
from .datasets import BUILTIN, DATA_DIR, LEGACY, Dataset
from .interface import Batches
from .writer import array_dtype, manifest_dataset, migrate_legacy, read_manifest

RESIDENT_MAX_BYTES = 1 << 30  # data.resident_test auto: the test split's uint8 pixels up to 1 GiB


@dataclass
class TrainingData:
    train: Batches  # interface.Batches: .epoch(e) -> (x, y) batches; len() = batches per epoch
    test: Batches  # the resident split, or a test loader
    dataset: Dataset  # what the files hold (their manifest.json)
    loader: str = 'ffcv'  # which loader: 'ffcv' or 'torchvision'
    notices: list[str] = field(default_factory=list)  # one-line warnings for the log
    # config values the data decided (auto -> their value): recorded in the run's config
    resolved: dict = field(default_factory=dict)
    paths: tuple = ()  # (train file, test file) as read

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset.class_names)

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


def data_paths(d, root: Path, notices: list[str] | None = None) -> tuple[list[Path], list[bool]]:
    """The (train, test) ``.beton`` files of the config's ``data`` section and whether each was
    given explicitly (else: ``data.dataset``'s default, ``data_beton/<dataset>/``, where a
    CIFAR-100 conversion in the layout before dataset folders is moved first)."""
    folder = root / DATA_DIR / d.dataset
    given = [d.train_path is not None, d.test_path is not None]
    if not all(given) and d.dataset == LEGACY:
        migrate_legacy(folder, log=(notices.append if notices is not None else print))
    paths = [resolve_path(p, root) if p is not None else folder / f'{d.dataset}_{split}.beton'
             for p, split in ((d.train_path, 'train'), (d.test_path, 'test'))]
    return paths, given


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


def check_arrays(path: Path, *, expected: dict | None = None, dataset: Dataset | None = None,
                 reader: str = 'the torchvision loader') -> np.ndarray:
    """The split's memory-mapped arrays, or :class:`DatasetError` naming what is wrong (the one
    check of a ``.npy`` split; ``dataset``: what its manifest says it holds; ``reader``: who
    needs it, for the missing-file message)."""
    from .pixels import load_arrays
    fix = 'rewrite it with `python scripts/write_datasets.py --force`'
    if not path.is_file():
        raise DatasetError(f'{path}: no such file ({reader} reads the arrays beside '
                           f'{path.with_suffix(".beton").name}); run `python scripts/write_datasets.py`')
    try:
        arrays = load_arrays(path)
    except (OSError, ValueError) as e:
        raise DatasetError(f'{path}: not a readable .npy file ({e}); {fix}') from None
    names = arrays.dtype.names or ()
    image = arrays.dtype.fields['image'][0] if 'image' in names else None
    ok = (arrays.ndim == 1 and 'label' in names and image is not None and image.base == np.uint8
          and len(image.shape) == 3 and image.shape[2] == 3 and image.shape[0] == image.shape[1])
    if ok and dataset is not None:
        ok = arrays.dtype == array_dtype(dataset)
    if not ok:
        want = f' ({dataset.describe()})' if dataset is not None else ''
        raise DatasetError(f'{path}: holds {arrays.dtype} {arrays.shape}, not the images and labels '
                           f'write_datasets.py writes{want}; {fix}')
    if expected and expected.get('count') is not None and len(arrays) != expected['count']:
        raise DatasetError(f'{path}: holds {len(arrays):,} images but manifest.json records '
                           f'{expected["count"]:,}; {fix}')
    return arrays


SPLIT_KEYS = ('data.train_path', 'data.test_path')


def dataset_of(paths: list[Path], given: list[bool], datasets: list[Dataset | None],
               fallback: str) -> Dataset:
    """The dataset both files hold: the manifest of the one given explicitly (else of the
    training file) decides, and the other must hold the same dataset at the same size --
    :class:`DatasetError` naming the other file otherwise. Files without a manifest (written by
    other tools) count as the built-in dataset ``fallback`` (``data.dataset``)."""
    ref = 1 if given[1] and not given[0] else 0
    if datasets[ref] is None:
        ref = 1 - ref
    other = 1 - ref
    if datasets[ref] is None:
        if fallback not in BUILTIN:
            raise DatasetError(f'{paths[0].parent / "manifest.json"}: no such file; the trainer learns '
                               f'the dataset ({fallback}) from it: convert it with '
                               f'`python scripts/write_datasets.py`')
        return BUILTIN[fallback]
    ds = datasets[ref]
    if datasets[other] is not None and (diff := ds.difference(datasets[other])):
        fix = (f'give {SPLIT_KEYS[other]} the {ds.name} file' if given[other] else
               f'set --data.dataset {ds.name} (it picks both files) or {SPLIT_KEYS[other]}')
        raise DatasetError(f'{paths[other]}: holds {diff}, but {SPLIT_KEYS[ref]} {paths[ref]} holds '
                           f'{ds.describe()}; {fix}')
    return ds


def dataset_files(d, root: Path, kind: str = 'ffcv', notices: list[str] | None = None
                  ) -> tuple[Dataset, list[Path], list[dict | None]]:
    """(the dataset, [train file, test file], their manifests) of the config's ``data`` section
    for the loader ``kind`` (``torchvision``: the ``.npy`` arrays beside the ``.beton`` files);
    :class:`DatasetError` if the two files hold different datasets (:func:`dataset_of`)."""
    paths, given = data_paths(d, root, notices)
    if kind == 'torchvision':  # the .npy arrays written beside the .beton files
        paths = [p.with_suffix('.npy') for p in paths]
    manifests = [read_manifest(p.parent) for p in paths]
    ds = dataset_of(paths, given, [manifest_dataset(m, p.parent) if m else None
                                   for m, p in zip(manifests, paths)], d.dataset)
    return ds, paths, manifests


def check_labels(path: Path, labels: np.ndarray, ds: Dataset) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= ds.num_classes):
        raise DatasetError(f'{path}: labels out of range for {ds.title}: they must lie in '
                           f'[0, {ds.num_classes - 1}], found [{labels.min()}, {labels.max()}]; '
                           f'rewrite it with `python scripts/write_datasets.py --force`')


def build_data(cfg, *, device: torch.device, dtype: torch.dtype, root: Path, workers: int,
               channels_last: bool = True, rank: int = 0, world_size: int = 1) -> TrainingData:
    """The train/test loaders of ``cfg`` (the training config) on ``device``, with ``workers``
    loader threads (FFCV) or processes (torchvision); under torchrun, ``rank``/``world_size``
    shard the data."""
    d = cfg.data
    kind, notice = resolve_loader(d.loader)
    notices = [notice] if notice else []
    ds, paths, manifests = dataset_files(d, root, kind, notices)
    (train_split, train_entry), (_, test_entry) = (_split_entry(m, p) for m, p in zip(manifests, paths))
    if train_split == 'test':
        notices.append(f'warning: data.train_path {paths[0]} is the TEST split (manifest.json); '
                       f'test accuracy will be meaningless')
    if kind == 'ffcv':
        from .beton import beton_labels, check_beton
        for p, e in zip(paths, (train_entry, test_entry)):
            check_beton(p, expected=e, image_size=ds.image_size)
        train_labels, test_labels = beton_labels(paths[0]), beton_labels(paths[1])
    else:
        train_labels, test_labels = (check_arrays(p, expected=e, dataset=ds)['label'].astype(np.int64)
                                     for p, e in zip(paths, (train_entry, test_entry)))
    for p, labels in zip(paths, (train_labels, test_labels)):
        check_labels(p, labels, ds)
    if cfg.model.num_classes is not None and cfg.model.num_classes != ds.num_classes:
        raise DatasetError(f'model.num_classes: {cfg.model.num_classes}, but {paths[0]} holds '
                           f'{ds.describe()}; leave it unset (null) to take the dataset\'s')
    train_idx = per_class_indices(train_labels, d.train_per_class)
    test_idx = per_class_indices(test_labels, d.test_per_class)
    if test_idx is None:
        test_idx = np.arange(len(test_labels))
    if world_size > 1:  # exact, disjoint evaluation shards; sums are all-reduced
        test_idx = test_idx[rank::world_size]
    try:
        aug = settings(cfg.augment, ds.image_size)
    except ValueError as e:
        raise DatasetError(f'{e} ({paths[0]})') from None
    # null = auto: on while the split's uint8 pixels fit in RESIDENT_MAX_BYTES (CIFAR: 30 MB)
    resident = d.resident_test if d.resident_test is not None else \
        len(test_idx) * ds.image_size ** 2 * 3 <= RESIDENT_MAX_BYTES
    make = _ffcv_loaders if kind == 'ffcv' else _torch_loaders
    train, test = make(cfg, paths, aug, train_idx, None if resident else test_idx, ds, device=device,
                       dtype=dtype, workers=workers, channels_last=channels_last, rank=rank,
                       world_size=world_size)
    if resident:  # evaluated at the training batch shape: cuDNN tunes no second set of kernels
        from .resident import ResidentSplit
        test = ResidentSplit.from_file(paths[1], indices=test_idx, device=device,
                                       dtype=torch.float32 if device.type == 'cpu' else dtype,
                                       batch_size=d.batch_size, channels_last=channels_last,
                                       mean=ds.mean, std=ds.std)
    return TrainingData(train, test, ds, kind, notices, resolved_values(ds, aug), tuple(paths))


def resolved_values(ds: Dataset, aug: dict) -> dict:
    """The config values the data files decide (``null`` = auto in the config): the dataset, the
    head's size and the augmentation sizes (``augment.settings``)."""
    return {'data.dataset': ds.name, 'model.num_classes': ds.num_classes, **{f'augment.{k}': v for k, v in aug.items()}}


def _ffcv_loaders(cfg, paths, aug, train_idx, test_idx, ds, *, device, dtype, workers, channels_last,
                  rank, world_size):
    from .loaders import make_loader, test_pipeline, train_pipeline
    from .ops import AugmentationState
    d, seed = cfg.data, cfg.training.seed
    state = AugmentationState(seed)
    train = make_loader(paths[0], batch_size=d.batch_size, num_workers=workers, order=d.order,
                        os_cache=d.os_cache, drop_last=True, distributed=world_size > 1, seed=seed,
                        indices=train_idx, batches_ahead=d.batches_ahead, state=state,
                        pipelines=train_pipeline(device=device, dtype=dtype, state=state,
                                                 channels_last=channels_last, mean=ds.mean,
                                                 std=ds.std, image_size=ds.image_size, **aug))
    if test_idx is None:  # the test split is resident on the device instead
        return train, None
    test = make_loader(paths[1], batch_size=d.test_batch_size, num_workers=workers, order='sequential',
                       os_cache=d.os_cache, drop_last=False, indices=test_idx,
                       batches_ahead=d.batches_ahead,
                       pipelines=test_pipeline(device=device, dtype=dtype, channels_last=channels_last,
                                               mean=ds.mean, std=ds.std))
    return train, test


def _torch_loaders(cfg, paths, aug, train_idx, test_idx, ds, *, device, dtype, workers, channels_last,
                   rank, world_size):
    from .torch_loader import make_torch_loader
    d, seed = cfg.data, cfg.training.seed
    # float32 on the CPU, as the FFCV path's CPU normalization gives (autocast handles bf16)
    dtype = torch.float32 if device.type == 'cpu' else dtype
    common = dict(num_workers=workers, device=device, dtype=dtype, seed=seed, prefetch=d.batches_ahead,
                  channels_last=channels_last, mean=ds.mean, std=ds.std)
    train = make_torch_loader(paths[0], batch_size=d.batch_size, train=True, augment=aug,
                              indices=train_idx, rank=rank, world_size=world_size, **common)
    if test_idx is None:  # the test split is resident on the device instead
        return train, None
    test = make_torch_loader(paths[1], batch_size=d.test_batch_size, train=False, indices=test_idx,
                             **common)
    return train, test
