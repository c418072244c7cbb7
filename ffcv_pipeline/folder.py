"""A folder of the user's own images -> a dataset value and ``.beton`` files, like CIFAR's.

    python scripts/write_datasets.py --image-folder photos/ --size 64       # -> data_beton/photos/
    python scripts/train.py --config rn18.yaml --data.dataset photos

Layouts (class names are the folder names, in sorted order):

    DIR/train/<class>/*  and  DIR/val/<class>/*   (or DIR/test/<class>/*): the given split
    DIR/<class>/*                                   : ``val_fraction`` of each class (stratified,
                                                      seeded) becomes the test split

Every file Pillow opens by its extension (JPEG, PNG, WebP, BMP, GIF, TIFF, ...), at any depth
below its class folder, is decoded in parallel worker processes with the app's own preparation
(``app.images.prepare_image``: EXIF orientation, RGB -- transparency on white --, centre square
crop, antialiased resize to ``size``), so a served image is prepared as the training images
were. Mean/std are computed on the training split and stored in the dataset value.

Bad input loses nothing and stops only where it must: an unreadable or truncated image is named
and skipped, with a count at the end (``strict``: it stops the conversion instead); a folder
with no class folders, a class folder without images, or train/val folders with different
classes stop with one line. A second run over an unchanged folder (same files, sizes and
modification times, same options) does nothing.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .archive import DatasetError, Split, SourceData
from .datasets import BUILTIN, NAME_PATTERN, Dataset
from .writer import WriteResult, default_out, is_up_to_date, prepare_out_dir, write_outputs

VAL_NAMES = ('val', 'validation', 'test')  # the held-out split's folder, beside train/
CHUNK = 64  # images per task sent to a worker: few round trips, even progress


def image_extensions() -> frozenset[str]:
    """File extensions Pillow opens (lower case, with the dot)."""
    from PIL import Image
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


@dataclass
class FolderScan:
    class_names: tuple[str, ...]
    train: list[tuple[Path, int]]  # (file, class index)
    test: list[tuple[Path, int]]
    layout: str  # 'train/val' or 'classes'
    ignored: list[Path]  # files that are not images by their extension

    def fingerprint(self, root: Path, *options) -> str:
        """md5 of every file's path, size and modification time, and the options: 'unchanged'."""
        h = hashlib.md5(repr(options).encode())
        for split, items in (('train', self.train), ('test', self.test)):
            for p, label in items:
                st = p.stat()
                h.update(f'{split}\0{p.relative_to(root)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
        return h.hexdigest()


def _visible(p: Path) -> bool:
    return not p.name.startswith('.')


def _class_folders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)


def _images(folder: Path, exts: frozenset[str], ignored: list[Path]) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        for f in sorted(filenames):
            if f.startswith('.'):
                continue
            p = Path(dirpath) / f
            (out if p.suffix.lower() in exts else ignored).append(p)
    return out


def _classes(folder: Path, exts, ignored, root: Path) -> dict[str, list[Path]]:
    classes = _class_folders(folder)
    if not classes:
        raise DatasetError(f'{folder}: no class folders (expected {root}/<class>/<images>, or '
                           f'{root}/train/<class>/... and {root}/val/<class>/...)')
    out = {}
    for c in classes:
        files = _images(c, exts, ignored)
        if not files:
            raise DatasetError(f'{c}: no images in this class folder (JPEG, PNG, WebP, BMP, ... by '
                               f'their extension); add some or remove the folder')
        out[c.name] = files
    return out


def scan(root: str | os.PathLike, *, val_fraction: float = 0.1, seed: int = 0) -> FolderScan:
    """The classes and the files of each split (see the module docstring); :class:`DatasetError`
    in one line for a layout that cannot be trained on."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f'{root}: no such folder' if not root.exists() else f'{root}: not a folder')
    exts, ignored = image_extensions(), []
    val_dir = next((root / v for v in VAL_NAMES if (root / v).is_dir()), None)
    train_dir = root / 'train' if (root / 'train').is_dir() else None
    by_class = _classes(train_dir or root, exts, ignored, root)
    if len(by_class) < 2:  # either layout
        raise DatasetError(f'{train_dir or root}: one class folder ({next(iter(by_class))}); a classifier needs '
                           f'at least 2')
    if train_dir is not None and val_dir is not None:
        val = _classes(val_dir, exts, ignored, root)
        if set(by_class) != set(val):
            only_t, only_v = sorted(set(by_class) - set(val)), sorted(set(val) - set(by_class))
            diff = '; '.join(f'only in {w}: {", ".join(n[:5])}{" ..." if len(n) > 5 else ""}'
                             for w, n in ((train_dir, only_t), (val_dir, only_v)) if n)
            raise DatasetError(f'{root}: train and {val_dir.name} hold different classes ({diff})')
        names = tuple(sorted(by_class))
        return FolderScan(names, [(p, i) for i, n in enumerate(names) for p in by_class[n]],
                          [(p, i) for i, n in enumerate(names) for p in val[n]], 'train/val', ignored)
    if not 0 < val_fraction < 1:
        raise DatasetError(f'--val-fraction: must lie in (0, 1) to split {root} into train and test, '
                           f'got {val_fraction}')
    names = tuple(sorted(by_class))
    rng = np.random.default_rng(seed)
    train_items, test_items = [], []
    for i, n in enumerate(names):  # stratified: the same fraction of every class, seeded
        files = by_class[n]
        order = rng.permutation(len(files))
        k = min(len(files) - 1, int(round(len(files) * val_fraction))) if len(files) > 1 else 0
        test_items += [(files[j], i) for j in sorted(order[:k])]
        train_items += [(files[j], i) for j in sorted(order[k:])]
    if not test_items:
        raise DatasetError(f'{root}: --val-fraction {val_fraction} leaves no test images '
                           f'({len(train_items)} images in all); raise it or add a val/ folder')
    return FolderScan(names, train_items, test_items, 'classes', ignored)


# --- decoding, in worker processes -------------------------------------------------------------------
_OUT: np.ndarray | None = None  # where forked workers write their images (shared memory), if set


def _decode_chunk(task):
    """(start, paths, size) -> (start, count, {index: reason it failed}, images or None): the
    images go straight into the shared output where there is one (forked workers: no pickling
    of pixels back to the parent), else back with the result (spawned workers, macOS)."""
    from app.images import ImageError, prepare_image
    start, paths, size = task
    failed, images = {}, None if _OUT is not None else np.zeros((len(paths), size, size, 3), np.uint8)
    out = _OUT[start:start + len(paths)] if _OUT is not None else images
    for j, p in enumerate(paths):
        try:
            out[j] = prepare_image(p, size=size)[0]
        except ImageError as e:
            failed[j] = str(e)
        except Exception as e:  # a decoder bug on one odd file: that file, not the conversion
            failed[j] = f'{p}: cannot decode ({type(e).__name__}: {e})'
    return start, len(paths), failed, images


def _ignore_sigint() -> None:
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def decode_images(paths: list[Path], size: int, *, workers: int, progress: bool, desc: str,
                  on_failure: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray]:
    """(N x size x size x 3 uint8, N bools: decoded) for ``paths``, decoded by ``workers``
    processes; ``on_failure(reason)`` for each file that could not be (it may raise to stop)."""
    global _OUT
    import mmap
    from tqdm import tqdm
    fork = sys.platform.startswith('linux')  # fork: workers start in ~ms and share the output
    shape = (len(paths), size, size, 3)
    if fork and workers > 1:  # anonymous shared memory: what a forked worker writes, we read
        images = np.frombuffer(mmap.mmap(-1, max(1, int(np.prod(shape)))), np.uint8)[:int(np.prod(shape))]
        images = images.reshape(shape)
    else:
        images = np.zeros(shape, np.uint8)
    ok = np.ones(len(paths), bool)
    tasks = [(i, paths[i:i + CHUNK], size) for i in range(0, len(paths), CHUNK)]
    bar = tqdm(total=len(paths), desc=desc, unit='img', disable=not progress)

    def take(start, count, failed, chunk):
        if chunk is not None:
            images[start:start + count] = chunk
        for j, reason in failed.items():
            ok[start + j] = False
            on_failure(reason)
        bar.update(count)

    try:
        if workers <= 1 or len(tasks) <= 1:
            _OUT = images
            for t in tasks:
                take(*_decode_chunk(t))
        else:
            _OUT = images if fork else None
            ctx = multiprocessing.get_context('fork' if fork else 'spawn')
            with ctx.Pool(workers, initializer=_ignore_sigint) as pool:
                for result in pool.imap_unordered(_decode_chunk, tasks):
                    take(*result)
    finally:
        _OUT = None
        bar.close()
    return images, ok


def _mean_std(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0-255) of uint8 NHWC images: exact, from each channel's
    histogram of the 256 values (10,000 64x64 images: ~0.4 s; summing float64 copies took ~4 s)."""
    hist = np.zeros((3, 256), np.int64)
    for i in range(0, len(images), 2048):  # chunks that stay in the cache
        rows = images[i:i + 2048].reshape(-1, 3)
        for c in range(3):
            hist[c] += np.bincount(rows[:, c], minlength=256)
    v = np.arange(256, dtype=np.float64)
    mean, std = np.zeros(3), np.zeros(3)
    for c in range(3):
        counts = hist[c].astype(np.float64)
        n = counts.sum()
        mean[c] = (counts * v).sum() / n
        std[c] = np.sqrt((counts * (v - mean[c]) ** 2).sum() / n)
    std = np.where(std > 1e-3, std, 1.0)  # a constant channel: leave it unscaled, not divided by 0
    return tuple(round(float(m), 3) for m in mean), tuple(round(float(s), 3) for s in std)


def default_name(folder: Path) -> str:
    name = re.sub(r'[^A-Za-z0-9_.-]+', '_', folder.resolve().name).strip('._-') or 'images'
    return name[:64]


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def write_image_folder(folder: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                       name: str | None = None, size: int = 32, val_fraction: float = 0.1,
                       seed: int = 0, strict: bool = False, force: bool = False, num_workers: int = -1,
                       progress: bool = True, log: Callable[[str], None] = print) -> WriteResult:
    """Convert the image folder ``folder`` (see the module docstring) into ``out_dir`` (default
    ``data_beton/<name>/``, ``name`` default: the folder's name)."""
    t0 = time.perf_counter()
    folder = Path(folder)
    name = name or default_name(folder)
    if not NAME_PATTERN.match(name):
        raise DatasetError(f'--name: {name!r} must be letters, digits, _ . - (at most 64)')
    if name in BUILTIN:  # its folder holds (or will hold) the official conversion
        raise DatasetError(f'--name: {name!r} is the built-in dataset\'s (data_beton/{name}/); give the images '
                           f'of {folder} another --name')
    if not 8 <= size <= 1024:
        raise DatasetError(f'--size: must lie in [8, 1024] pixels, got {size}')
    found = scan(folder, val_fraction=val_fraction, seed=seed)
    out_dir = Path(out_dir) if out_dir is not None else default_out(name)
    no_ffcv = prepare_out_dir(out_dir, log)
    fingerprint = found.fingerprint(folder, size, val_fraction if found.layout == 'classes' else None, seed)
    if not force and (m := is_up_to_date(out_dir, fingerprint, with_beton=not no_ffcv, dataset=name)):
        log(f'{out_dir}: .beton files are up to date for {folder} (same files and options); nothing '
            f'to do (--force rewrites them)')
        return WriteResult('skipped', m, time.perf_counter() - t0, out_dir)
    if found.ignored:
        log(f'note: ignored {len(found.ignored):,} files that are not images by their extension '
            f'(e.g. {found.ignored[0]})')
    workers = usable_cores() if num_workers < 1 else num_workers
    failures: list[str] = []

    def failed(reason: str) -> None:
        if strict:
            raise DatasetError(f'{reason} (--strict stops at the first unreadable image)')
        failures.append(reason)
        log(f'warning: skipped {reason}')

    splits = {}
    for split, items in (('train', found.train), ('test', found.test)):
        images, ok = decode_images([p for p, _ in items], size, workers=workers, progress=progress,
                                   desc=f'decode {split} {size}x{size}', on_failure=failed)
        labels = np.array([label for _, label in items], np.int64)
        # a copy of the whole split only when an image was skipped
        splits[split] = Split(images if ok.all() else np.ascontiguousarray(images[ok]), labels[ok])
        if not len(splits[split]):
            raise DatasetError(f'{folder}: no readable images for the {split} split')
    if failures:
        log(f'skipped {len(failures):,} unreadable images of {len(found.train) + len(found.test):,} '
            f'(named above; --strict stops at the first instead)')
    mean, std = _mean_std(splits['train'].images)
    ds = Dataset(name=name, title=name, class_names=found.class_names, image_size=size, mean=mean, std=std)
    ds.check(str(folder))
    data = SourceData(ds, splits['train'], splits['test'], str(folder), fingerprint)
    extra = {'kind': 'image folder', 'layout': found.layout, 'size': size, 'skipped': len(failures),
             **({'val_fraction': val_fraction, 'seed': seed} if found.layout == 'classes' else {})}
    return write_outputs(data, out_dir, no_ffcv=no_ffcv, num_workers=num_workers, progress=progress,
                         t0=t0, log=log, source_extra=extra)
