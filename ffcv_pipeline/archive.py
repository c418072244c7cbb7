"""Reading (and downloading) CIFAR-100 in the official ``cifar-100-python`` layout.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.errors import UserError

from .constants import (ARCHIVE_DIR, CIFAR100_MD5, CIFAR100_URL, IMAGE_SHAPE, NUM_COARSE,
                        NUM_FINE)

MEMBERS = ('train', 'test', 'meta')
PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]  # 3072 values per row


class DatasetError(UserError, ValueError):
    """A problem with the user's input data or output folder; ``str()`` is one clear line."""


@dataclass
class Split:
    images: np.ndarray  # (N, 32, 32, 3) uint8, C-contiguous, RGB
    fine: np.ndarray  # (N,) int64 in [0, 100)
    coarse: np.ndarray  # (N,) int64 in [0, 20)

    def __len__(self) -> int:
        return len(self.fine)


@dataclass
class Cifar100:
    train: Split
    test: Split
    fine_names: list[str]
    coarse_names: list[str]
    source: str  # path the data was read from
    md5: str  # md5 of the archive, or of the three member files for a folder

    @property
    def official(self) -> bool:
        return self.md5 == CIFAR100_MD5


def md5sum(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_md5(path: str | os.PathLike) -> str:
    """md5 of an archive file, or a combined md5 of a folder's three member files."""
    path = Path(path)
    if path.is_dir():
        folder = _member_folder(path)
        h = hashlib.md5()
        for name in MEMBERS:
            h.update(md5sum(_member_path(folder, name)).encode())
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


def _names(value, expected: int, where: str, key: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or len(value) != expected:
        n = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
        raise DatasetError(f'{where}: {key!r} must list {expected} names, found {n}')
    return [v.decode('latin1') if isinstance(v, bytes) else str(v) for v in value]


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


def _split(d: dict, where: str) -> Split:
    for key in ('data', 'fine_labels', 'coarse_labels'):
        if key not in d:
            raise DatasetError(f'{where}: missing key {key!r} (found {sorted(map(str, d))})')
    data = d['data']
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != PIXELS:
        shape = getattr(data, 'shape', type(data).__name__)
        raise DatasetError(f"{where}: 'data' must be an N x {PIXELS} uint8 array, found {shape}")
    if data.dtype != np.uint8:
        if not np.issubdtype(data.dtype, np.integer) or (data.size and (data.min() < 0 or data.max() > 255)):
            raise DatasetError(f"{where}: 'data' must hold uint8 pixels, found dtype {data.dtype}")
        data = data.astype(np.uint8)
    n = data.shape[0]
    if n == 0:
        raise DatasetError(f"{where}: 'data' holds no images")
    fine = _labels(d['fine_labels'], n, NUM_FINE, where, 'fine_labels')
    coarse = _labels(d['coarse_labels'], n, NUM_COARSE, where, 'coarse_labels')
    # rows are 1024 R, 1024 G, 1024 B values, row-major -> (N, H, W, C)
    h, w, c = IMAGE_SHAPE
    images = np.ascontiguousarray(data.reshape(n, c, h, w).transpose(0, 2, 3, 1))
    return Split(images, fine, coarse)


def _parse(raw: dict[str, bytes], where: str, source: str, md5: str) -> Cifar100:
    meta = _unpickle(raw['meta'], f'{where}/meta')
    for key in ('fine_label_names', 'coarse_label_names'):
        if key not in meta:
            raise DatasetError(f'{where}/meta: missing key {key!r}')
    fine_names = _names(meta['fine_label_names'], NUM_FINE, f'{where}/meta', 'fine_label_names')
    coarse_names = _names(meta['coarse_label_names'], NUM_COARSE, f'{where}/meta', 'coarse_label_names')
    train = _split(_unpickle(raw['train'], f'{where}/train'), f'{where}/train')
    test = _split(_unpickle(raw['test'], f'{where}/test'), f'{where}/test')
    return Cifar100(train, test, fine_names, coarse_names, source, md5)


# --- sources: archive or folder ------------------------------------------------------------------
def _member_folder(path: Path) -> Path:
    """The folder holding train/test/meta: ``path`` itself or ``path/cifar-100-python``."""
    if (path / ARCHIVE_DIR).is_dir():
        return path / ARCHIVE_DIR
    return path


def _member_path(folder: Path, name: str) -> Path:
    p = folder / name
    if not p.is_file():
        raise DatasetError(f'{folder}: missing member {name!r} (expected {ARCHIVE_DIR}/{{train,test,meta}})')
    return p


def _read_folder(path: Path, md5: str) -> Cifar100:
    folder = _member_folder(path)
    raw = {}
    for name in MEMBERS:
        p = _member_path(folder, name)
        try:
            raw[name] = p.read_bytes()
        except OSError as e:
            raise DatasetError(f'{p}: cannot read ({e.strerror or e})') from None
    return _parse(raw, str(folder), str(path), md5)


def _read_archive(path: Path, md5: str) -> Cifar100:
    raw: dict[str, bytes] = {}
    try:
        with tarfile.open(path, 'r:*') as tar:
            for member in tar:
                parts = Path(member.name).parts
                if member.isfile() and len(parts) >= 1 and parts[-1] in MEMBERS and \
                        (len(parts) == 1 or parts[-2] == ARCHIVE_DIR):
                    f = tar.extractfile(member)
                    raw[parts[-1]] = f.read()
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as e:
        reason = getattr(e, 'strerror', None) or str(e).splitlines()[0].rstrip(':') or type(e).__name__
        if 'could not be opened' in reason:  # tarfile tried every compression and gave up
            reason = 'not a tar, tar.gz, tar.bz2 or tar.xz file'
        raise DatasetError(f'{path}: corrupt or truncated archive ({reason})') from None
    missing = [m for m in MEMBERS if m not in raw]
    if missing:
        raise DatasetError(f'{path}: missing member {ARCHIVE_DIR}/{missing[0]} in the archive')
    return _parse(raw, f'{path}:{ARCHIVE_DIR}', str(path), md5)


def read_cifar100(source: str | os.PathLike, md5: str | None = None) -> Cifar100:
    """Read and validate CIFAR-100 from an archive (``.tar.gz``) or an extracted folder."""
    path = Path(source)
    if not path.exists():
        raise DatasetError(f'{path}: no such file or folder')
    md5 = md5 or source_md5(path)
    if path.is_dir():
        return _read_folder(path, md5)
    return _read_archive(path, md5)


def download(dest: str | os.PathLike, url: str = CIFAR100_URL, md5: str = CIFAR100_MD5,
             progress: bool = True, timeout: float = 60.0) -> Path:
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
