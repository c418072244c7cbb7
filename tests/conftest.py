"""Shared fixtures: synthetic CIFAR-100 archives in the official layout, small .beton files,
the real archive from ../shared/data when present (tests that need it skip otherwise), tiny
training runs, and the scripts' ``main`` functions for in-process command-line tests."""
from __future__ import annotations

import os

# The tests' JIT-compiled FFCV pipelines run a few hundred images: numba's lowest optimization
# level compiles them ~30% sooner and computes the same results (semantics do not depend on
# it). Set before numba is imported; subprocesses inherit it. Benchmarks and `make check` run
# outside pytest, at numba's default level. numba's disk cache does not tell the levels apart:
# the tests keep their own (else a training run would load the tests' unoptimized kernels from
# __pycache__: a flip 40x slower, measured), which persists between test runs.
import tempfile  # noqa: E402
os.environ.setdefault('NUMBA_OPT', '0')
os.environ.setdefault('NUMBA_CACHE_DIR', os.path.join(tempfile.gettempdir(), f'cifar100-ffcv-tests-numba-{os.getuid()}'))

import contextlib
import importlib.util
import io
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ffcv_pipeline.datasets import CIFAR10, CIFAR100, SPLITS
from model.project import PROJECT_ROOT as ROOT

PY = sys.executable
# CIFAR-100's file names and constants, as the tests use them (the product reads them from the
# dataset value, ffcv_pipeline/datasets.py)
BETON_NAMES = {s: CIFAR100.file(s) for s in SPLITS}
ARRAY_NAMES = {s: CIFAR100.file(s, 'npy') for s in SPLITS}
MANIFEST_NAME = 'manifest.json'
FINE_LABEL_NAMES, COARSE_LABEL_NAMES = CIFAR100.class_names, CIFAR100.superclass_names
FINE_TO_COARSE = CIFAR100.superclass_of
CIFAR100_MEAN, CIFAR100_STD = CIFAR100.mean, CIFAR100.std
REAL_ARCHIVE = Path(os.environ.get('CIFAR100_ARCHIVE',
                                   ROOT.parent / 'shared' / 'data' / 'cifar-100-python.tar.gz'))


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
    return write_members(path, 'cifar-100-python', blobs, folder=folder)


def write_members(path: Path, top: str, blobs: dict[str, bytes], *, folder: bool) -> Path:
    """``blobs`` as ``top/<name>`` files: a .tar.gz at ``path``, or an extracted ``path/top/``."""
    if folder:
        d = path / top
        d.mkdir(parents=True)
        for name, blob in blobs.items():
            (d / name).write_bytes(blob)
        return path
    with tarfile.open(path, 'w:gz', compresslevel=1) as tar:  # level 9: 4x the time, 2% smaller
        for name, blob in blobs.items():
            info = tarfile.TarInfo(f'{top}/{name}')
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def cifar10_batch(split: dict, label: str) -> dict:
    """A CIFAR-10 data member as the official pickles hold it (``labels``, no superclasses)."""
    return {'batch_label': label, 'labels': list(split['fine_labels']), 'data': split['data'],
            'filenames': split['filenames']}


def build_cifar10_archive(path: Path, *, train: list[dict] | None = None, test: dict | None = None,
                          meta: dict | None = None, drop: tuple = (), folder: bool = False,
                          bytes_keys: bool = True) -> Path:
    """A ``cifar-10-python.tar.gz`` in the official layout: ``cifar-10-batches-py/`` with
    ``data_batch_1`` ... ``data_batch_5``, ``test_batch``, ``batches.meta`` and ``readme.html``;
    each a protocol-2 pickle of a dict with bytes keys (the real files are Python 2 pickles:
    ``b'data'`` a uint8 N x 3072 array, ``b'labels'`` a list of ints, ``b'filenames'``,
    ``b'batch_label'``; meta ``b'label_names'``, ``b'num_cases_per_batch'``, ``b'num_vis'``).
    ``train``: five batch dicts (default: 2 images per class each, seeded)."""
    train = train if train is not None else [
        cifar10_batch(make_split(2, seed=10 + i, classes=10), f'training batch {i + 1} of 5') for i in range(5)]
    members = {f'data_batch_{i + 1}': b for i, b in enumerate(train)}
    members['test_batch'] = test if test is not None else cifar10_batch(make_split(2, seed=20, classes=10),
                                                                        'testing batch 1 of 1')
    members['batches.meta'] = meta if meta is not None else {
        'num_cases_per_batch': 10000,
        'label_names': list(CIFAR10.class_names), 'num_vis': 3072}
    blobs = {name: obj if isinstance(obj, bytes) else
             pickle.dumps(_to_bytes_keys(obj) if bytes_keys else obj, protocol=2)
             for name, obj in members.items() if name not in drop}
    blobs['readme.html'] = b'<html>synthetic CIFAR-10 for tests</html>'
    return write_members(path, 'cifar-10-batches-py', blobs, folder=folder)


def make_image_folder(root: Path, *, classes=('cat', 'dog', 'emu'), per_class: int = 12,
                      layout: str = 'classes', val_per_class: int = 3, shape=(72, 90), seed: int = 0,
                      formats=('JPEG', 'PNG', 'WEBP', 'BMP')) -> Path:
    """A folder of learnable images (each class its own two colours, plus noise), non-square
    (the converter centre-crops), in turns JPEG/PNG/WebP/BMP: ``root/<class>/*`` (``layout
    'classes'``) or ``root/train/<class>/*`` and ``root/val/<class>/*`` (``'train/val'``)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(99).integers(0, 256, size=(len(classes), 2, 3))
    h, w = shape
    ext = {'JPEG': 'jpg', 'PNG': 'png', 'WEBP': 'webp', 'BMP': 'bmp'}
    splits = {'': per_class} if layout == 'classes' else {'train': per_class, 'val': val_per_class}
    k = 0
    for split, n in splits.items():
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.empty((h, w, 3), np.float32)
                img[:h // 2], img[h // 2:] = palette[c, 0], palette[c, 1]
                img = np.clip(img + rng.normal(0, 15, img.shape), 0, 255).astype(np.uint8)
                fmt = formats[k % len(formats)]
                k += 1
                Image.fromarray(img).save(d / f'{name}_{i:03d}.{ext[fmt]}', fmt)
    return root


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


# --- tiny training runs ---------------------------------------------------------------------------
def tiny(betons: Path, out: Path, **extra) -> list[str]:
    """Overrides for a fast CPU run: 400 images, batch 50 -> 8 steps per epoch, width 8, no
    curves.png (0.7 s of matplotlib per process; the tests of the plot turn it on)."""
    o = {'data.train_path': betons / BETON_NAMES['train'], 'data.test_path': betons / BETON_NAMES['test'],
         'data.batch_size': 50, 'data.test_batch_size': 100, 'data.num_workers': 2,
         'model.width': 8, 'training.epochs': 2, 'training.lr': 0.2, 'training.warmup_epochs': 0.5,
         'training.device': 'cpu', 'training.precision': 'fp32', 'output.dir': out.parent, 'output.name': out.name,
         'output.progress': 'off', 'output.plot': False, **extra}
    return [f'{k}={v}' for k, v in o.items()]


def tv(betons: Path, out: Path, **extra) -> list[str]:
    """:func:`tiny` with the torchvision loader (no FFCV JIT: seconds faster per run)."""
    return tiny(betons, out, **{'data.loader': 'torchvision', **extra})


def one_line(err: str) -> str:
    """A user error as the CLI prints it: exactly one line, ``error: ...``; that line."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    return lines[0]


def as_cli(overrides: list[str]) -> list[str]:
    return [f'--{o}' for o in overrides]


def weights(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)['model']


def same_weights(a: Path | dict, b: Path | dict) -> bool:
    wa, wb = (weights(x) if isinstance(x, Path) else x for x in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# --- scripts in-process ------------------------------------------------------------------------------
def script(name: str):
    """``scripts/<name>.py`` as a module (its ``main(argv)``), without touching sys.path: the
    scripts import their sibling ``_cli``, registered here the same way."""
    def load(mod_name: str, path: Path):
        spec = importlib.util.spec_from_file_location(mod_name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod
        spec.loader.exec_module(mod)
        return mod
    if '_cli' not in sys.modules:
        load('_cli', ROOT / 'scripts' / '_cli.py')
    return sys.modules.get(f'script_{name}') or load(f'script_{name}', ROOT / 'scripts' / f'{name}.py')


def run_main(name: str, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``python scripts/<name>.py ARGS``, run in this process."""
    mod, out, err = script(name), io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = sys.modules['_cli'].call(mod.main, [str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def _tmpfs(mnt: Path, options: str):
    mnt.mkdir()
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here ({r.stderr.decode().strip()})')
    yield mnt
    subprocess.run(['umount', '-l', str(mnt)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 2.5 MB tmpfs (root only; skipped elsewhere): a real full disk, not a mock."""
    yield from _tmpfs(tmp_path / 'disk', 'size=2500k')


@pytest.fixture
def disk_40m(tmp_path):
    """A 40 MB tmpfs: room for 10,000 images' arrays, not for their .beton as well."""
    yield from _tmpfs(tmp_path / 'disk40', 'size=40m')


@pytest.fixture
def few_inodes_disk(tmp_path):
    """A tmpfs with room for 8 files (inodes) and plenty of bytes: creating a file fails."""
    yield from _tmpfs(tmp_path / 'inodes', 'size=10m,nr_inodes=8')


@pytest.fixture(scope='session')
def baseline_run(synthetic_betons, tmp_path_factory):
    """An uninterrupted 2-epoch run through the FFCV loader, keeping epoch_001.pt (shared by the
    training and resume tests): (run folder, summary, log lines)."""
    from training.trainer import train
    out = tmp_path_factory.mktemp('runs') / 'baseline'
    logs = []
    summary = train('tiny_cpu', tiny(synthetic_betons, out, **{'output.save_every': 1, 'output.plot': True,
                                                               'data.loader': 'ffcv'}), log=logs.append)
    return out, summary, logs


# --- checkpoints for the serving tests -----------------------------------------------------------------
def make_test_checkpoint(path: Path, *, width: int = 8, seed: int = 0) -> Path:
    """An untrained ResNet-18 checkpoint with non-trivial BatchNorm statistics (so that folding
    BatchNorm into the convs is really exercised) and made-up training metrics."""
    from model import build_model
    from model.checkpoint import atomic_save, make_checkpoint
    torch.manual_seed(seed)
    model = build_model({'arch': 'resnet18', 'num_classes': 100, 'width': width, 'channels_last': True})
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    ckpt = make_checkpoint(model, model_config={'arch': 'resnet18', 'num_classes': 100, 'width': width},
                           dataset=CIFAR100.to_dict(),
                           metrics={'test_top1': 0.7512, 'test_top5': 0.9301, 'train_seconds': 812.5,
                                    'epochs_planned': 40},
                           config={'note': 'test'}, epoch=40)
    atomic_save(ckpt, path)
    return path


@pytest.fixture(scope='session')
def full_size_ckpt(tmp_path_factory) -> Path:
    """Full width (11.2 M parameters): latency and load figures measure the real model's cost."""
    return make_test_checkpoint(tmp_path_factory.mktemp('ckpt64') / 'rn18.pt', width=64)
