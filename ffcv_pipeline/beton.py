"""Check a ``.beton`` file before ffcv reads it.

ffcv trusts its input: a truncated, empty, foreign or differently laid-out file ends in an
``AssertionError``, an ``IndexError`` deep inside its reader, or a segfault in a loader thread.
:func:`check_beton` reads the header, the field descriptors and the allocation table with numpy
and raises :class:`~ffcv_pipeline.archive.DatasetError` -- one line naming the file, what is
wrong and how to fix it -- for anything the loaders could not read safely. It also checks the
sample count and byte size against ``manifest.json`` when the converter's manifest is at hand.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .archive import DatasetError

FIX = 'rewrite it with `python scripts/write_datasets.py --force`'
# name -> ffcv type id (ffcv.types.TYPE_ID_HANDLER): what scripts/write_datasets.py writes
EXPECTED_FIELDS = {'image': 2, 'label': 1}  # RGBImageField, IntField
OPTIONAL_FIELDS = {'coarse_label': 1}
MAX_FIELDS = 64


def _fail(path: Path, what: str) -> DatasetError:
    return DatasetError(f'{path}: {what}; {FIX}')


def check_beton(path: str | os.PathLike, *, expected: dict | None = None,
                image_size: int | None = None) -> int:
    """Raise :class:`DatasetError` unless ``path`` is a complete ``.beton`` as
    ``write_datasets.py`` writes it; returns its sample count. ``expected``: the manifest's
    entry for this split (``{'count': ..., 'bytes': ...}``), checked when given; ``image_size``:
    the dataset's (every image must have it; else all images one square size)."""
    from . import load_ffcv
    load_ffcv()
    from ffcv.types import (ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType,
                            get_handlers, get_metadata_type)
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f'{path}: no such .beton file; run `python scripts/write_datasets.py` '
                           f'first (or set data.train_path / data.test_path)')
    size = path.stat().st_size
    if size == 0:
        raise _fail(path, 'the file is empty')
    if size < HeaderType.itemsize:
        raise _fail(path, f'not a .beton file ({size} bytes, shorter than its header)')
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if header['version'] != CURRENT_VERSION or not 0 < header['num_fields'] <= MAX_FIELDS:
        raise _fail(path, f'not an FFCV .beton file, or a corrupt one (header: format version '
                          f'{header["version"]}, {header["num_fields"]} fields; expected version '
                          f'{CURRENT_VERSION})')
    n, nf, table_at = int(header['num_samples']), int(header['num_fields']), int(header['alloc_table_ptr'])
    desc_end = HeaderType.itemsize + nf * FieldDescType.itemsize
    if desc_end > size:
        raise _fail(path, f'truncated ({size:,} bytes; its header alone needs {desc_end:,})')
    descs = np.fromfile(path, dtype=FieldDescType, count=nf, offset=HeaderType.itemsize)
    names = [bytes(d['name']).split(b'\0', 1)[0].decode('latin1') for d in descs]
    fields = dict(zip(names, (int(d['type_id']) for d in descs)))
    wanted = {**EXPECTED_FIELDS, **{k: v for k, v in OPTIONAL_FIELDS.items() if k in fields}}
    if fields != wanted:
        raise _fail(path, f'written with other fields ({_describe(fields)}; expected '
                          f'{_describe({**EXPECTED_FIELDS, **OPTIONAL_FIELDS})})')
    meta_type = get_metadata_type(get_handlers(descs))
    meta_end = desc_end + n * meta_type.itemsize
    if not meta_end <= table_at <= size:
        raise _fail(path, f'truncated or corrupt ({size:,} bytes; its header places the '
                          f'allocation table at byte {table_at:,} after {n:,} samples of metadata '
                          f'ending at {meta_end:,})')
    if (size - table_at) % ALLOC_TABLE_TYPE.itemsize or (size - table_at) // ALLOC_TABLE_TYPE.itemsize != n:
        raise _fail(path, f'truncated or corrupt ({size:,} bytes: its allocation table holds '
                          f'{(size - table_at) / ALLOC_TABLE_TYPE.itemsize:,.1f} entries for {n:,} images)')
    table = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table_at)
    image = np.fromfile(path, dtype=meta_type, count=n, offset=desc_end)[f'f{names.index("image")}']
    h = w = image_size if image_size is not None else (int(image['height'][0]) if n else 0)
    if n and (np.any(image['height'] != h) or np.any(image['width'] != w)
              or np.any(table['ptr'] + table['size'] > table_at) or np.any(table['sample_id'] >= n)
              or np.any(image['data_ptr'] + h * w * 3 > table_at)):
        got = f'{int(image["height"][0])}x{int(image["width"][0])}'
        raise _fail(path, f'corrupt: image records point outside the file or are not {h}x{w} pixels '
                          f'(the first is {got})')
    if expected:
        if expected.get('count') is not None and n != expected['count']:
            raise _fail(path, f'holds {n:,} images but manifest.json records {expected["count"]:,}')
        if expected.get('bytes') is not None and size != expected['bytes']:
            raise _fail(path, f'is {size:,} bytes but manifest.json records {expected["bytes"]:,} '
                              f'(modified or cut short since it was written?)')
    return n


def _describe(fields: dict) -> str:
    kinds = {1: 'int', 2: 'image'}
    return ', '.join(f'{k} ({kinds.get(v, f"type {v}")})' for k, v in fields.items()) or 'none'


RAW_MODE = 1  # ffcv's RGBImageField IMAGE_MODES['raw']: pixels stored as they are (what we write)


def _reader(path: str | os.PathLike):
    from . import load_ffcv
    load_ffcv()
    from ffcv.reader import Reader
    return Reader(str(path))


def _column(reader, field: str) -> np.ndarray:
    """One field's metadata column (for an image: mode, size, pointer per sample)."""
    return reader.metadata[f'f{list(reader.handlers).index(field)}']


def beton_labels(path: str | os.PathLike) -> np.ndarray:
    """Labels of a ``.beton``, read from its metadata table (no decoding)."""
    return np.asarray(_column(_reader(path), 'label')).astype(np.int64).ravel()


def read_beton_images(path: str | os.PathLike, indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC images, int64 labels) of a raw-mode ``.beton``, read with numpy
    (no loader, no JIT): the resident test set's source. ``indices``: a subset, in that order."""
    reader = _reader(path)
    image = _column(reader, 'image')
    labels = np.asarray(_column(reader, 'label')).astype(np.int64).ravel()
    idx = np.arange(len(labels)) if indices is None else np.asarray(indices)
    if np.any(image['mode'][idx] != RAW_MODE):
        raise DatasetError(f'{path}: holds JPEG-compressed images; the resident test set reads raw '
                           f'pixels ({FIX}, which writes raw images)')
    h, w, c = (int(image['height'][0]), int(image['width'][0]), 3) if len(image) else (0, 0, 3)
    data = np.memmap(path, dtype=np.uint8, mode='r')
    out = np.empty((len(idx), h, w, c), np.uint8)
    for i, p in enumerate(image['data_ptr'][idx].astype(np.int64)):  # 10,000 slices: ~10 ms
        out[i] = data[p:p + h * w * c].reshape(h, w, c)
    return out, labels[idx]
