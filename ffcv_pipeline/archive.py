"""Reading (and downloading) a dataset in CIFAR's python layout (``cifar-100-python``,
``cifar-10-batches-py``; the members and keys come from the dataset's
:class:`~ffcv_pipeline.datasets.PickleLayout`).

Everything a user can get wrong about the input -- a truncated or corrupt archive, a missing
member, wrong array shapes, labels out of range, a failed download -- raises
:class:`DatasetError` with one line naming the file and the problem. Nothing here writes into
the output folder except :func:`download`, which writes ``<dest>.part`` and renames it only
once the checksum matches.
"""
from __future__ import annotations

import hashlib
import io
import lzma
import os
import pickle
import tarfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from model.errors import UserError

from .datasets import Dataset, PickleLayout


class DatasetError(UserError, ValueError):
    """A problem with the user's input data or output folder; ``str()`` is one clear line."""


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, 3) uint8, C-contiguous, RGB
    labels: np.ndarray  # (N,) int64 in [0, classes)
    superclasses: np.ndarray | None = None  # (N,) int64 in [0, superclasses), where the dataset has them

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class SourceData:
    """A dataset read from its source: both splits and the dataset value (with the class names
    as the source gives them)."""
    dataset: Dataset
    train: Split
    test: Split
    source: str  # path the data was read from
    md5: str  # md5 of the archive, or of the member files for a folder (or a folder fingerprint)

    @property
    def official(self) -> bool:
        return self.dataset.download is not None and self.md5 == self.dataset.download.md5


def md5sum(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_md5(path: str | os.PathLike, layout: PickleLayout) -> str:
    """md5 of an archive file, or a combined md5 of a folder's member files."""
    path = Path(path)
    if path.is_dir():
        folder = _member_folder(path, layout)
        h = hashlib.md5()
        for name in layout.members:
            h.update(md5sum(_member_path(folder, name, layout)).encode())
        return h.hexdigest()
    try:
        return md5sum(path)
    except OSError as e:
        raise DatasetError(f'{path}: cannot read ({e.strerror or e})') from None


# --- safe unpickling ---------------------------------------------------------------------------
# The data files are pickles; a pickle can run arbitrary code. Only what a CIFAR pickle needs
# (numpy arrays and Python 2 strings) may be loaded.
_ALLOWED_GLOBALS = {
    ('numpy', 'ndarray'), ('numpy', 'dtype'),
    ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
    ('_codecs', 'encode'),
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'refusing to load {module}.{name}')


def _unpickle(raw: bytes, where: str) -> dict:
    """Load a CIFAR pickle whose keys (and strings) may be ``str`` or ``bytes``."""
    try:
        # latin1 maps Python 2 byte strings 1:1; pickles written by Python 3 with bytes keys
        # stay bytes and are decoded below.
        obj = _CifarUnpickler(io.BytesIO(raw), encoding='latin1').load()
    except Exception as e:  # any unpickling failure is a corrupt member
        raise DatasetError(f'{where}: not a readable CIFAR pickle ({type(e).__name__}: {e})') from None
    if not isinstance(obj, dict):
        raise DatasetError(f'{where}: expected a dict, found {type(obj).__name__}')
    return {(k.decode('latin1') if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _names(value, expected: int, where: str, key: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != expected:
        n = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
        raise DatasetError(f'{where}: {key!r} must list {expected} names, found {n}')
    return tuple(v.decode('latin1') if isinstance(v, bytes) else str(v) for v in value)


def _labels(value, n: int, upper: int, where: str, key: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception:
        arr = None
    if arr is None or arr.ndim != 1 or len(arr) != n or not np.issubdtype(arr.dtype, np.integer):
        shape = getattr(arr, 'shape', '?')
        raise DatasetError(f'{where}: {key!r} must be {n} integers, found shape {shape}')
    if n and (arr.min() < 0 or arr.max() >= upper):
        raise DatasetError(f'{where}: {key!r} out of range: values must lie in [0, {upper - 1}], '
                           f'found [{arr.min()}, {arr.max()}]')
    return arr.astype(np.int64)


def _split(d: dict, where: str, ds: Dataset) -> Split:
    layout, s = ds.layout, ds.image_size
    keys = ('data', layout.labels) + ((layout.superclass_labels,) if layout.superclass_labels else ())
    for key in keys:
        if key not in d:
            raise DatasetError(f'{where}: missing key {key!r} (found {sorted(map(str, d))})')
    data, pixels = d['data'], 3 * s * s
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != pixels:
        shape = getattr(data, 'shape', type(data).__name__)
        raise DatasetError(f"{where}: 'data' must be an N x {pixels} uint8 array, found {shape}")
    if data.dtype != np.uint8:
        if not np.issubdtype(data.dtype, np.integer) or (data.size and (data.min() < 0 or data.max() > 255)):
            raise DatasetError(f"{where}: 'data' must hold uint8 pixels, found dtype {data.dtype}")
        data = data.astype(np.uint8)
    n = data.shape[0]
    if n == 0:
        raise DatasetError(f"{where}: 'data' holds no images")
    labels = _labels(d[layout.labels], n, ds.num_classes, where, layout.labels)
    sup = (_labels(d[layout.superclass_labels], n, len(ds.superclass_names), where, layout.superclass_labels)
           if layout.superclass_labels else None)
    # rows are H*W R values, then G, then B, row-major -> (N, H, W, C)
    images = np.ascontiguousarray(data.reshape(n, 3, s, s).transpose(0, 2, 3, 1))
    return Split(images, labels, sup)


def _concat(splits: list[Split]) -> Split:
    if len(splits) == 1:
        return splits[0]
    sup = None if splits[0].superclasses is None else np.concatenate([s.superclasses for s in splits])
    return Split(np.concatenate([s.images for s in splits]), np.concatenate([s.labels for s in splits]), sup)


def _parse(raw: dict[str, bytes], where: str, source: str, md5: str, ds: Dataset) -> SourceData:
    layout = ds.layout
    meta_where = f'{where}/{layout.meta}'
    meta = _unpickle(raw[layout.meta], meta_where)
    keys = (layout.names,) + ((layout.superclass_names,) if layout.superclass_names else ())
    for key in keys:
        if key not in meta:
            raise DatasetError(f'{meta_where}: missing key {key!r}')
    # the source's own names (the official ones; a re-split archive keeps them)
    names = _names(meta[layout.names], ds.num_classes, meta_where, layout.names)
    sup_names = (_names(meta[layout.superclass_names], len(ds.superclass_names), meta_where,
                        layout.superclass_names) if layout.superclass_names else ds.superclass_names)
    ds = replace(ds, class_names=names, superclass_names=sup_names)
    train = _concat([_split(_unpickle(raw[m], f'{where}/{m}'), f'{where}/{m}', ds) for m in layout.train])
    test = _concat([_split(_unpickle(raw[m], f'{where}/{m}'), f'{where}/{m}', ds) for m in layout.test])
    return SourceData(ds, train, test, source, md5)


# --- sources: archive or folder ------------------------------------------------------------------
def _member_folder(path: Path, layout: PickleLayout) -> Path:
    """The folder holding the members: ``path`` itself or ``path/<layout.folder>``."""
    if (path / layout.folder).is_dir():
        return path / layout.folder
    return path


def _member_path(folder: Path, name: str, layout: PickleLayout) -> Path:
    p = folder / name
    if not p.is_file():
        raise DatasetError(f'{folder}: missing member {name!r} (expected {layout.folder}/'
                           f'{{{",".join(layout.members)}}})')
    return p


def _read_folder(path: Path, md5: str, ds: Dataset) -> SourceData:
    folder = _member_folder(path, ds.layout)
    raw = {}
    for name in ds.layout.members:
        p = _member_path(folder, name, ds.layout)
        try:
            raw[name] = p.read_bytes()
        except OSError as e:
            raise DatasetError(f'{p}: cannot read ({e.strerror or e})') from None
    return _parse(raw, str(folder), str(path), md5, ds)


def _read_archive(path: Path, md5: str, ds: Dataset) -> SourceData:
    layout, raw = ds.layout, {}
    try:
        with tarfile.open(path, 'r:*') as tar:
            for member in tar:
                parts = Path(member.name).parts
                if member.isfile() and len(parts) >= 1 and parts[-1] in layout.members and \
                        (len(parts) == 1 or parts[-2] == layout.folder):
                    f = tar.extractfile(member)
                    raw[parts[-1]] = f.read()
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as e:
        reason = getattr(e, 'strerror', None) or str(e).splitlines()[0].rstrip(':') or type(e).__name__
        if 'could not be opened' in reason:  # tarfile tried every compression and gave up
            reason = 'not a tar, tar.gz, tar.bz2 or tar.xz file'
        raise DatasetError(f'{path}: corrupt or truncated archive ({reason})') from None
    missing = [m for m in layout.members if m not in raw]
    if missing:
        hint = ''
        if not any(m in raw for m in layout.members):
            hint = f' (is it an archive of {ds.title}? none of its members are there)'
        raise DatasetError(f'{path}: missing member {layout.folder}/{missing[0]} in the archive{hint}')
    return _parse(raw, f'{path}:{layout.folder}', str(path), md5, ds)


def read_archive(dataset: Dataset, source: str | os.PathLike, md5: str | None = None) -> SourceData:
    """Read and validate ``dataset`` from an archive (``.tar.gz``) or an extracted folder in its
    layout (``dataset.layout``)."""
    if dataset.layout is None:
        raise ValueError(f'{dataset.name} has no archive layout to read')
    path = Path(source)
    if not path.exists():
        raise DatasetError(f'{path}: no such file or folder')
    md5 = md5 or source_md5(path, dataset.layout)
    if path.is_dir():
        return _read_folder(path, md5, dataset)
    return _read_archive(path, md5, dataset)


def download(dest: str | os.PathLike, url: str, md5: str, progress: bool = True,
             timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (via ``dest.part``), checking its md5; returns ``dest``."""
    from tqdm import tqdm

    dest = Path(dest)
    part = dest.with_name(dest.name + '.part')
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, 'wb') as out:
            total = int(resp.headers.get('Content-Length') or 0) or None
            h = hashlib.md5()
            with tqdm(total=total, unit='B', unit_scale=True, desc=f'download {dest.name}',
                      disable=not progress) as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, 'reason', None) or getattr(e, 'strerror', None) or e
        raise DatasetError(f'download of {url} failed ({reason}); pass --source PATH to use a local '
                           f'copy of {dest.name}') from None
    except BaseException:  # Ctrl-C: leave no partial file behind
        part.unlink(missing_ok=True)
        raise
    if h.hexdigest() != md5:
        part.unlink(missing_ok=True)
        raise DatasetError(f'download of {url} failed: md5 {h.hexdigest()} != expected {md5}')
    os.replace(part, dest)
    return dest
