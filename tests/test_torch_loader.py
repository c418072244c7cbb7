"""The ffcv-free loader (``data.loader: torchvision``), device selection, and training where ffcv
cannot be imported at all.

The two loaders must produce identically distributed batches: here they produce *the same*
augmented pixels for the same (seed, epoch, image), which the augmentation statistics below also
show, and exactly the source pixels without augmentation."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch

from conftest import PY, ROOT, images_of, tiny
from conftest import BETON_NAMES, CIFAR100_MEAN, CIFAR100_STD

CPU = torch.device('cpu')
AUG = dict(flip=True, translate=4, cutout=8)


def denorm(x: torch.Tensor) -> np.ndarray:
    """Normalized NCHW float -> uint8-valued NHWC."""
    mean = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    return (x * std + mean).round().permute(0, 2, 3, 1).numpy().astype(np.int16)


def ffcv_loader(betons, *, split='train', seed=0, aug=AUG):
    from ffcv_pipeline.loaders import make_loader, test_pipeline, train_pipeline
    from ffcv_pipeline.ops import AugmentationState
    state = AugmentationState(seed)
    pipes = (train_pipeline(device=CPU, dtype=torch.float32, state=state, mean=CIFAR100_MEAN, std=CIFAR100_STD,
                            image_size=32, **aug) if split == 'train'
             else test_pipeline(device=CPU, dtype=torch.float32, mean=CIFAR100_MEAN, std=CIFAR100_STD))
    return make_loader(betons / BETON_NAMES[split], batch_size=100, num_workers=1, order='sequential',
                       os_cache=True, drop_last=False, state=state, pipelines=pipes)


OPEN: list = []  # loaders made by a test, closed after it (their worker processes end at once)


@pytest.fixture(autouse=True)
def close_loaders():
    yield
    while OPEN:
        OPEN.pop().close()


def torch_loader(betons, *, split='train', seed=0, aug=AUG, workers=2, shuffle=False, batch=100, **kw):
    from ffcv_pipeline.torch_loader import make_torch_loader
    OPEN.append(make_torch_loader(betons / f'cifar100_{split}.npy', batch_size=batch, num_workers=workers,
                                  device=CPU, dtype=torch.float32, seed=seed, train=split == 'train',
                                  augment=aug, shuffle=shuffle, mean=CIFAR100_MEAN, std=CIFAR100_STD, **kw))
    return OPEN[-1]


def epoch_of(loader, epoch):
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader.epoch(epoch)])
    return torch.cat(xs), torch.cat(ys)


def aug_stats(aug: np.ndarray, src: np.ndarray) -> dict:
    """Flip rate, translate offsets, cutout coverage and per-channel normalized mean, measured
    from the images alone (the same measurement for both loaders)."""
    fill = np.round(CIFAR100_MEAN)
    n = len(src)
    flips, shifts, cover = [], [], []
    for i in range(n):
        found = None
        for flip in (False, True):
            s = src[i][:, ::-1] if flip else src[i]
            for dy in range(-4, 5):
                for dx in range(-4, 5):
                    ys, xs = slice(max(0, -dy), min(32, 32 - dy)), slice(max(0, -dx), min(32, 32 - dx))
                    window = s[max(0, dy):min(32, 32 + dy), max(0, dx):min(32, 32 + dx)]
                    same = (aug[i][ys, xs] == window).all(-1)
                    if same.mean() > 0.8:  # cutout hides at most 64 of the pixels
                        found = (flip, dy, dx, (aug[i][ys, xs] == fill).all(-1).sum())
                        break
                if found:
                    break
            if found:
                break
        assert found, i
        flips.append(found[0])
        shifts.append(found[1:3])
        cover.append(found[3] / 1024)  # cutout pixels on the image (not on the shifted-in border)
    norm = (aug - np.array(CIFAR100_MEAN)) / np.array(CIFAR100_STD)
    return {'flip_rate': np.mean(flips), 'dy': np.bincount(np.array(shifts)[:, 0] + 4, minlength=9),
            'dx': np.bincount(np.array(shifts)[:, 1] + 4, minlength=9), 'cutout_cover': np.mean(cover),
            'channel_mean': norm.reshape(-1, 3).mean(0)}


@pytest.fixture(scope='module')
def both(synthetic_betons):
    f, t = ffcv_loader(synthetic_betons), torch_loader(synthetic_betons)
    return {e: (epoch_of(f, e), epoch_of(t, e)) for e in (0, 1)}


def test_both_loaders_augment_every_image_identically(both, synthetic_data):
    """Same (seed, epoch, image) -> same flip, shift and cutout, pixel for pixel, in both
    loaders; and statistics of the right shape (flip ~1/2, shifts over [-4, 4], 8x8 cutouts)."""
    src = images_of(synthetic_data[1]).astype(np.int16)
    for e, ((fx, fy), (tx, ty)) in both.items():
        assert torch.equal(fy, ty) and fy.tolist() == synthetic_data[1]['fine_labels']
        a, b = denorm(fx), denorm(tx)
        assert (a == b).all(), f'epoch {e}: {(a != b).any(-1).sum()} pixels differ'
        sa, sb = aug_stats(a, src), aug_stats(b, src)
        for k in sa:
            np.testing.assert_allclose(sa[k], sb[k], err_msg=k)
        assert 0.4 < sa['flip_rate'] < 0.6
        assert (sa['dy'] > 20).all() and (sa['dx'] > 20).all()  # 400 images over 9 offsets each
        assert 0.03 < sa['cutout_cover'] <= 64 / 1024  # the 8x8 square, less what fell on the border
        assert np.abs(sa['channel_mean']).max() < 0.5
    assert not torch.equal(both[0][1][0], both[1][1][0])  # other draws in another epoch


@pytest.mark.parametrize('name', ['every op', *__import__('ffcv_pipeline.augment').augment.OPS])
def test_every_registered_op_gives_the_same_pixels_in_both_loaders(synthetic_betons, synthetic_data, name):
    """Each op of the registry alone (with its example value), and all of them together: the
    FFCV JIT op and the torchvision loader's worker give the same uint8 pixels, and the op
    changes images. A new op is covered by registering it."""
    from ffcv_pipeline.augment import OPS
    aug = {n: o.example for n, o in OPS.items() if name in (n, 'every op')}
    a = denorm(epoch_of(ffcv_loader(synthetic_betons, aug=aug), 2)[0])
    b = denorm(epoch_of(torch_loader(synthetic_betons, aug=aug, workers=1), 2)[0])
    assert (a == b).all(), f'{name}: {(a != b).any(-1).sum()} pixels differ'
    src = images_of(synthetic_data[1]).astype(np.int16)
    assert (a != src).any(axis=(1, 2, 3)).mean() > 0.3, f'{name} changed too few images'


def test_without_augmentation_both_give_the_exact_pixels(synthetic_betons, synthetic_data):
    src = images_of(synthetic_data[2]).astype(np.int16)
    fx, fy = epoch_of(ffcv_loader(synthetic_betons, split='test'), 0)
    tx, ty = epoch_of(torch_loader(synthetic_betons, split='test'), 0)
    assert (denorm(fx) == src).all() and (denorm(tx) == src).all()
    assert torch.allclose(fx, tx, atol=1e-6) and torch.equal(fy, ty)
    assert tx.is_contiguous(memory_format=torch.channels_last) and tx.dtype == torch.float32


def test_order_and_augmentation_are_functions_of_seed_and_epoch(synthetic_betons):
    """Shuffled: each epoch a permutation of all images; the same for the same (seed, epoch)
    whatever the worker count or what ran before (a resumed run sees the same batches)."""
    a = torch_loader(synthetic_betons, shuffle=True, workers=2, batch=64)
    e1_after_e0 = (epoch_of(a, 0), epoch_of(a, 1))[1]
    alone = epoch_of(torch_loader(synthetic_betons, shuffle=True, workers=1, batch=64), 1)
    assert torch.equal(e1_after_e0[0], alone[0]) and torch.equal(e1_after_e0[1], alone[1])
    e0 = epoch_of(a, 0)
    assert len(e0[1]) == 384  # drop_last: 6 batches of 64 out of 400
    assert not torch.equal(e0[1], alone[1])
    other_seed = epoch_of(torch_loader(synthetic_betons, shuffle=True, seed=1, batch=64), 1)
    assert not torch.equal(other_seed[1], alone[1])


def test_distributed_shards_are_disjoint(synthetic_betons):
    seen = [torch_loader(synthetic_betons, shuffle=True, workers=0, batch=10, rank=r, world_size=2)
            for r in (0, 1)]
    idx = [np.concatenate([i for _, i in s.sampler]) for s in seen]
    assert len(idx[0]) == len(idx[1]) == 200 and not set(idx[0]) & set(idx[1])
    assert set(idx[0]) | set(idx[1]) == set(range(400))


def test_device_selection(monkeypatch):
    """CUDA -> MPS -> CPU, and what each implies; checked here by faking what this machine
    lacks (the real MPS path has not run on a Mac: README says so)."""
    from training.config import ConfigError
    from training import runtime as R
    if not torch.cuda.is_available():
        assert R.resolve_device('auto') == CPU
        with pytest.raises(ConfigError, match="'mps' requested but MPS is not available here"):
            R.resolve_device('mps')
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):  # bf16 where the CPU has it
        monkeypatch.setattr(R, 'cpu_has_native_bf16', lambda: native)
        assert R.resolve_precision('auto', CPU) == want
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="'fp16' is not supported on the CPU"):
        R.resolve_precision('fp16', CPU)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(R, 'mps_available', lambda: True)
    mps = R.resolve_device('auto')
    assert mps == torch.device('mps')
    assert R.resolve_precision('auto', mps) == torch.float16  # autocast fp16 + GradScaler
    monkeypatch.setattr(R, '_mps_bf16', lambda: False)
    with pytest.raises(ConfigError, match="'bf16' on MPS needs macOS 14"):
        R.resolve_precision('bf16', mps)
    from model import use_channels_last
    rn18 = {'arch': 'resnet18', 'width': 64}
    assert use_channels_last({**rn18, 'channels_last': None}, mps) is False
    assert use_channels_last({**rn18, 'channels_last': True}, mps) is True
    assert use_channels_last(rn18, CPU) is True and use_channels_last({**rn18, 'width': 8}, CPU) is False
    assert R.accum_dtype(mps) == torch.float32 and R.accum_dtype(CPU) == torch.float64
    from training.distributed import DistInfo
    with pytest.raises(ConfigError, match="'mps' does not support torchrun"):
        R.resolve_device('mps', DistInfo(rank=0, world_size=2))


def test_auto_loader_falls_back_without_ffcv(monkeypatch):
    import sys
    from ffcv_pipeline.data import resolve_loader
    assert resolve_loader('auto') == ('ffcv', None)
    monkeypatch.setitem(sys.modules, 'ffcv.loader', None)  # "import ffcv.loader" now fails
    kind, notice = resolve_loader('auto')
    assert kind == 'torchvision' and notice.startswith('notice: ffcv does not import here')
    from ffcv_pipeline.archive import DatasetError
    with pytest.raises(DatasetError, match="data.loader: 'ffcv' does not import here"):
        resolve_loader('ffcv')


NO_FFCV = '''
import atexit, os, sys
for name in ('ffcv', 'numba', 'cv2'):  # "import ffcv" raises ImportError from here on
    sys.modules[name] = None
report = lambda: print('loaded:', [m for m in ('ffcv', 'numba', 'cv2') if sys.modules.get(m) is not None], flush=True)
atexit.register(report)
_exit = os._exit
def fast_exit(code):  # scripts/train.py ends a finished run with os._exit (no atexit)
    report()
    _exit(code)
os._exit = fast_exit
'''


def test_convert_and_train_where_ffcv_cannot_be_imported(synthetic_data, tmp_path):
    """A host where ffcv (and numba, OpenCV) do not import (a sitecustomize blocks them): the
    converter writes the arrays only, with a notice; training tiny_cpu.yaml with
    --data.loader torchvision works, and nothing imported ffcv, numba or OpenCV."""
    (tmp_path / 'site').mkdir()
    (tmp_path / 'site' / 'sitecustomize.py').write_text(NO_FFCV)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(tmp_path / 'site'), os.environ.get('PYTHONPATH', '')])}
    out = tmp_path / 'data'
    r = subprocess.run([PY, 'scripts/write_datasets.py', '--source', synthetic_data[0], '--out', out, '--quiet'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'notice: ffcv does not import here' in r.stdout and 'loaded: []' in r.stdout
    assert sorted(p.name for p in out.glob('cifar100_*')) == ['cifar100_test.npy', 'cifar100_train.npy']
    run = tmp_path / 'run'
    r = subprocess.run([PY, 'scripts/train.py', '--config', 'tiny_cpu',
                        *[f'--{o}' for o in tiny(out, run, **{'data.loader': 'torchvision'})]],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'torchvision loader' in r.stdout and 'loaded: []' in r.stdout
    s = json.loads((run / 'summary.json').read_text())
    assert s['loader'] == 'torchvision' and s['ffcv_version'] is None and s['final_top1'] is not None
