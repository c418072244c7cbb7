"""Shared fixtures: synthetic CIFAR-100 archives in the official layout, small .beton files,
the real archive from ../shared/data when present (tests that need it skip otherwise)."""
from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
REAL_ARCHIVE = Path(os.environ.get('CIFAR100_ARCHIVE',
                                   ROOT.parent / 'shared' / 'data' / 'cifar-100-python.tar.gz'))
from ffcv_pipeline.constants import COARSE_LABEL_NAMES, FINE_LABEL_NAMES, FINE_TO_COARSE  # noqa: E402


def make_split(n_per_class: int, seed: int, classes: int = 100) -> dict:
    """A learnable synthetic split: each class has its own colour pattern plus noise."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(1234).integers(0, 256, size=(classes, 2, 3))
    fine = np.tile(np.arange(classes), n_per_class)
    rng.shuffle(fine)
    n = len(fine)
    img = np.empty((n, 32, 32, 3), np.float32)
    img[:, :16] = palette[fine, 0][:, None, None, :]  # top half: colour A of the class
    img[:, 16:] = palette[fine, 1][:, None, None, :]  # bottom half: colour B
    img += rng.normal(0, 20, size=img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    data = img.transpose(0, 3, 1, 2).reshape(n, 3072)  # official row layout: R plane, G, B
    return {'data': data, 'fine_labels': fine.tolist(),
            'coarse_labels': [FINE_TO_COARSE[f] for f in fine], 'filenames': [f'{i}.png' for i in range(n)],
            'batch_label': 'synthetic'}


def images_of(split: dict) -> np.ndarray:
    return split['data'].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _to_bytes_keys(d: dict) -> dict:
    def conv(v):
        if isinstance(v, str):
            return v.encode()
        if isinstance(v, list) and v and isinstance(v[0], str):
            return [x.encode() for x in v]
        return v
    return {k.encode(): conv(v) for k, v in d.items()}


def build_archive(path: Path, *, train: dict | None = None, test: dict | None = None,
                  meta: dict | None = None, bytes_keys: bool = False, drop: tuple = (),
                  folder: bool = False) -> Path:
    """Write a cifar-100-python archive (or extracted folder) with the given members."""
    members = {
        'train': train if train is not None else make_split(2, seed=1),
        'test': test if test is not None else make_split(1, seed=2),
        'meta': meta if meta is not None else {'fine_label_names': list(FINE_LABEL_NAMES),
                                               'coarse_label_names': list(COARSE_LABEL_NAMES)},
    }
    blobs = {}
    for name, obj in members.items():
        if name in drop:
            continue
        if isinstance(obj, bytes):
            blobs[name] = obj
        else:
            blobs[name] = pickle.dumps(_to_bytes_keys(obj) if bytes_keys else obj, protocol=2)
    if folder:
        d = path / 'cifar-100-python'
        d.mkdir(parents=True)
        for name, blob in blobs.items():
            (d / name).write_bytes(blob)
        return path
    with tarfile.open(path, 'w:gz') as tar:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(f'cifar-100-python/{name}')
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def run_script(*args, timeout=600, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, **kw)


@pytest.fixture(scope='session')
def synthetic_data(tmp_path_factory):
    """(archive path, train split dict, test split dict): 4/class train, 2/class test."""
    d = tmp_path_factory.mktemp('synthetic')
    train, test = make_split(4, seed=1), make_split(2, seed=2)
    return build_archive(d / 'cifar-100-python.tar.gz', train=train, test=test), train, test


@pytest.fixture(scope='session')
def synthetic_betons(synthetic_data, tmp_path_factory):
    """A data_beton-like folder written from the synthetic archive (400 train / 200 test)."""
    from ffcv_pipeline.writer import write_datasets
    out = tmp_path_factory.mktemp('betons')
    write_datasets(synthetic_data[0], out, progress=False, num_workers=2, log=lambda *_: None)
    return out


@pytest.fixture(scope='session')
def real_betons(tmp_path_factory):
    if not REAL_ARCHIVE.is_file():
        pytest.skip(f'real CIFAR-100 archive not found at {REAL_ARCHIVE}')
    from ffcv_pipeline.writer import write_datasets
    out = tmp_path_factory.mktemp('real_betons')
    result = write_datasets(REAL_ARCHIVE, out, progress=False, log=lambda *_: None)
    return out, result
