"""Throughput benchmark: FFCV vs a torchvision DataLoader, model step, full epoch, conversion.

    python scripts/benchmark.py                  # full run (a few minutes on 2 CPU cores)
    python scripts/benchmark.py --tiny           # seconds; used by the tests

All figures come from one run on one machine, side by side:

- loader: images/s of the whole training augmentation pipeline up to the normalized float
  tensors the model consumes -- FFCV (numba crop/flip/cutout on uint8, normalize on the device)
  vs. torchvision (PIL -> RandomCrop(32, 4) -> RandomHorizontalFlip -> ToTensor -> Normalize ->
  RandomErasing as cutout), same data, batch size and worker count. The first epoch (numba
  compilation, worker start) is reported apart from the steady-state epochs (median, min, max).
- model step: forward + backward + SGD step on synthetic tensors (no loader); on CUDA also
  AMP + channels-last vs. fp32 NCHW.
- full epoch: loader + model together, with the time spent waiting for data, which says
  whether training is loader-bound or compute-bound.
- conversion: ``scripts/write_datasets.py`` on the real archive, as a subprocess.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ffcv_pipeline.constants import BETON_NAMES, CIFAR100_MEAN, CIFAR100_STD
from model import build_model

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Settings:
    train_beton: Path
    batch_size: int = 512
    workers: int = 0  # 0 = all cores
    loader_epochs: int = 3  # steady-state epochs after the warm-up epoch
    loader_images: int = 0  # 0 = the whole training set
    model_batch: int = 0  # 0 = batch_size on CUDA, 32 on the CPU
    model_steps: int = 0  # 0 = 50 on CUDA, 5 on the CPU
    model_width: int = 64
    epoch_images: int = 0  # images in the full-epoch measurement; 0 = all on CUDA, 1024 on CPU
    archive: Path | None = None  # for the conversion timing; None skips it
    device: str = 'auto'

    def resolved(self) -> 'Settings':
        cuda = self.dev.type == 'cuda'
        self.workers = self.workers or os.cpu_count()
        self.model_batch = self.model_batch or (self.batch_size if cuda else 32)
        self.model_steps = self.model_steps or (50 if cuda else 5)
        if not self.epoch_images:
            self.epoch_images = 0 if cuda else 1024
        return self

    @property
    def dev(self) -> torch.device:
        if self.device == 'auto':
            return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
        return torch.device(self.device)


def _sync(dev: torch.device) -> None:
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)


def _summary(epoch_rates: list[float], warmup_s: float, images: int) -> dict:
    return {'warmup_epoch_s': round(warmup_s, 3), 'images_per_epoch': images,
            'images_per_s_median': round(statistics.median(epoch_rates), 1),
            'images_per_s_min': round(min(epoch_rates), 1),
            'images_per_s_max': round(max(epoch_rates), 1),
            'epochs': [round(r, 1) for r in epoch_rates]}


def _subset(n_total: int, n: int) -> np.ndarray | None:
    return None if not n or n >= n_total else np.arange(n)


# --- loaders ---------------------------------------------------------------------------------------
def bench_ffcv_loader(s: Settings) -> dict:
    from ffcv_pipeline.loaders import make_loader, train_pipeline
    from ffcv_pipeline.ops import AugmentationState
    from training.trainer import beton_labels

    n_total = len(beton_labels(s.train_beton))
    state = AugmentationState(0)
    dtype = torch.float16 if s.dev.type == 'cuda' else torch.float32
    t0 = time.perf_counter()
    loader = make_loader(s.train_beton, batch_size=s.batch_size, num_workers=s.workers,
                         order='quasi_random', os_cache=True, drop_last=True, state=state,
                         indices=_subset(n_total, s.loader_images),
                         pipelines=train_pipeline(device=s.dev, dtype=dtype, state=state, cutout=8))
    rates, warmup = [], 0.0
    for epoch in range(s.loader_epochs + 1):
        t = time.perf_counter()
        n = 0
        for x, _ in loader.epoch(epoch):
            n += x.shape[0]
        _sync(s.dev)
        dt = time.perf_counter() - t
        if epoch == 0:
            warmup = time.perf_counter() - t0  # construction + numba compilation + one epoch
        else:
            rates.append(n / dt)
    out = _summary(rates, warmup, n)
    out['output'] = f'{tuple(x.shape)} {str(x.dtype).replace("torch.", "")} on {x.device}, channels_last'
    return out


def bench_augmentation_ops(s: Settings) -> dict:
    """uint8 output, augmentation only: our reproducible ops vs FFCV's built-in ones."""
    import ffcv.transforms as FT
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.transforms import ToTensor, ToTorchImage
    from ffcv_pipeline import ops as O
    from ffcv_pipeline.loaders import _fill, label_pipeline, make_loader

    fill = _fill(CIFAR100_MEAN)
    out = {}
    for name in ('ours', 'ffcv_builtin'):
        state = O.AugmentationState(0)
        aug = ([O.RandomHorizontalFlip(state), O.RandomTranslate(state, padding=4, fill=fill),
                O.Cutout(state, size=8, fill=fill)] if name == 'ours' else
               [FT.RandomHorizontalFlip(), FT.RandomTranslate(padding=4, fill=fill), FT.Cutout(8, fill)])
        loader = make_loader(s.train_beton, batch_size=s.batch_size, num_workers=s.workers,
                             order='quasi_random', os_cache=True, drop_last=True, state=state,
                             pipelines={'image': [SimpleRGBImageDecoder(), *aug, ToTensor(),
                                                  ToTorchImage(channels_last=True)],
                                        'label': label_pipeline(device=torch.device('cpu'))})
        rates = []
        for epoch in range(s.loader_epochs + 1):
            t, n = time.perf_counter(), 0
            for x, _ in loader.epoch(epoch):
                n += x.shape[0]
            if epoch:
                rates.append(n / (time.perf_counter() - t))
        out[name] = round(statistics.median(rates), 1)
    out['speedup'] = round(out['ours'] / out['ffcv_builtin'], 2)
    return out


class _ArrayDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR100 does per item: a uint8 array -> PIL image -> transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def read_beton_arrays(path: Path, n: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The same images and labels the FFCV loader reads (sequential, no augmentation)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from training.trainer import beton_labels
    # an index past the end would make FFCV read out of bounds (a segfault, not an error)
    ld = Loader(str(path), batch_size=1000, num_workers=os.cpu_count(), order=OrderOption.SEQUENTIAL,
                drop_last=False, indices=_subset(len(beton_labels(path)), n),
                pipelines={'image': [SimpleRGBImageDecoder()], 'label': [IntDecoder()], 'coarse_label': None})
    xs, ys = zip(*[(np.array(x), np.array(y).ravel()) for x, y in ld])
    return np.concatenate(xs), np.concatenate(ys)


def bench_torchvision_loader(s: Settings, images: np.ndarray, labels: np.ndarray, cutout: int = 8) -> dict:
    import torchvision.transforms as T
    area = cutout * cutout / (32 * 32)
    transform = T.Compose([
        T.RandomCrop(32, padding=4, fill=tuple(int(round(m)) for m in CIFAR100_MEAN)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize([m / 255 for m in CIFAR100_MEAN], [v / 255 for v in CIFAR100_STD]),
        T.RandomErasing(p=1.0, scale=(area, area), ratio=(1.0, 1.0), value=0),  # cutout, mean fill
    ])
    cuda = s.dev.type == 'cuda'
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(
        _ArrayDataset(images, labels, transform), batch_size=s.batch_size, shuffle=True,
        num_workers=s.workers, drop_last=True, persistent_workers=True, pin_memory=cuda)
    rates, warmup = [], 0.0
    for epoch in range(s.loader_epochs + 1):
        t = time.perf_counter()
        n = 0
        for x, _ in loader:
            if cuda:
                x = x.to(s.dev, non_blocking=True).to(memory_format=torch.channels_last)
            n += x.shape[0]
        _sync(s.dev)
        dt = time.perf_counter() - t
        if epoch == 0:
            warmup = time.perf_counter() - t0  # includes starting the worker processes
        else:
            rates.append(n / dt)
    out = _summary(rates, warmup, n)
    out['output'] = f'{tuple(x.shape)} {str(x.dtype).replace("torch.", "")} on {x.device}'
    return out


# --- model ---------------------------------------------------------------------------------------
def _train_setup(s: Settings, dtype: torch.dtype, channels_last: bool = True):
    """Model, and a training step ``step(x, y)`` as the trainer takes it (AMP, SGD, scaler)."""
    dev = s.dev
    torch.manual_seed(0)
    model = build_model('resnet18', width=s.model_width, channels_last=channels_last).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    if dev.type == 'cuda':
        torch.backends.cudnn.benchmark = True

    def step(x, y):
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return model, step


def bench_model_step(s: Settings, *, dtype: torch.dtype, channels_last: bool) -> dict:
    dev = s.dev
    _, step = _train_setup(s, dtype, channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(s.model_batch, 3, 32, 32, device=dev).to(memory_format=fmt)
    y = torch.randint(0, 100, (s.model_batch,), device=dev)
    t = time.perf_counter()
    for _ in range(2 if dev.type == 'cpu' else 10):  # cuDNN autotuning, allocator warm-up
        step(x, y)
    _sync(dev)
    warm = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(s.model_steps):
        step(x, y)
    _sync(dev)
    dt = time.perf_counter() - t
    return {'images_per_s': round(s.model_steps * s.model_batch / dt, 1), 'batch': s.model_batch,
            'steps': s.model_steps, 'warmup_s': round(warm, 3),
            'precision': str(dtype).replace('torch.', ''), 'channels_last': channels_last,
            'width': s.model_width}


def bench_full_epoch(s: Settings) -> dict:
    """Loader + model: the real training loop's structure, timing the wait for each batch."""
    from ffcv_pipeline.loaders import make_loader, train_pipeline
    from ffcv_pipeline.ops import AugmentationState
    from training.trainer import beton_labels, resolve_precision

    dev = s.dev
    dtype = resolve_precision('auto', dev)
    state = AugmentationState(0)
    n_total = len(beton_labels(s.train_beton))
    batch = s.batch_size if dev.type == 'cuda' else s.model_batch
    loader = make_loader(s.train_beton, batch_size=batch, num_workers=s.workers, order='quasi_random',
                         os_cache=True, drop_last=True, state=state,
                         indices=_subset(n_total, s.epoch_images),
                         pipelines=train_pipeline(device=dev, dtype=dtype, state=state, cutout=8))
    _, train_step = _train_setup(s, dtype)

    def epoch(e):
        wait, n = 0.0, 0
        t_epoch = time.perf_counter()
        it = loader.epoch(e)
        while True:
            t = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                break
            wait += time.perf_counter() - t
            train_step(x, y)
            n += y.shape[0]
        _sync(dev)
        return n, time.perf_counter() - t_epoch, wait

    t0 = time.perf_counter()
    epoch(0)  # warm-up: numba compilation, cuDNN autotuning
    warm = time.perf_counter() - t0
    n, dt, wait = epoch(1)
    return {'images': n, 'batch': batch, 'epoch_s': round(dt, 3), 'images_per_s': round(n / dt, 1),
            'data_wait_s': round(wait, 4), 'data_wait_fraction': round(wait / dt, 5),
            'warmup_epoch_s': round(warm, 3), 'precision': str(dtype).replace('torch.', ''),
            'width': s.model_width}


def bench_conversion(archive: Path, tmp: Path) -> dict:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'write_datasets.py'), '--source', str(archive),
                        '--out', str(tmp), '--force', '--quiet'], capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f'conversion failed: {r.stderr.strip()}')
    m = json.loads((tmp / 'manifest.json').read_text())
    return {'seconds': round(dt, 3), 'images': sum(v['count'] for v in m['splits'].values()),
            'command': f'python scripts/write_datasets.py --source {archive} --out {tmp} --force --quiet'}


def environment(dev: torch.device) -> dict:
    from importlib.metadata import version
    cpu = platform.processor()
    try:
        cpu = next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return {'cpu': cpu, 'cores': os.cpu_count(), 'python': platform.python_version(),
            'gpu': torch.cuda.get_device_name(dev) if dev.type == 'cuda' else None,
            'torch': str(torch.__version__), 'torchvision': version('torchvision'),
            'ffcv': version('ffcv'), 'numba': version('numba'), 'numpy': version('numpy'),
            'torch_threads': torch.get_num_threads()}


def run_benchmark(s: Settings, log=print, compare_ops: bool = True) -> dict:
    s = s.resolved()
    res: dict = {'settings': {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(s).items()},
                 'environment': environment(s.dev)}
    log(f'FFCV loader: batch {s.batch_size}, {s.workers} workers ...')
    res['loader_ffcv'] = bench_ffcv_loader(s)
    if compare_ops:
        log('augmentation ops: ours vs FFCV built-in (uint8 out) ...')
        res['augmentation_ops'] = bench_augmentation_ops(s)
    images, labels = read_beton_arrays(s.train_beton, s.loader_images)
    log(f'torchvision loader: batch {s.batch_size}, {s.workers} workers ...')
    res['loader_torchvision'] = bench_torchvision_loader(s, images, labels)
    res['loader_speedup'] = round(res['loader_ffcv']['images_per_s_median'] /
                                  res['loader_torchvision']['images_per_s_median'], 2)
    log('model step ...')
    from training.trainer import resolve_precision
    amp = resolve_precision('auto', s.dev)  # fp32 on the CPU
    res['model_step'] = bench_model_step(s, dtype=amp, channels_last=True)
    if s.dev.type == 'cuda':
        res['model_step_fp32_nchw'] = bench_model_step(s, dtype=torch.float32, channels_last=False)
        res['amp_channels_last_speedup'] = round(res['model_step']['images_per_s'] /
                                                 res['model_step_fp32_nchw']['images_per_s'], 2)
    log('full epoch (loader + model) ...')
    res['full_epoch'] = bench_full_epoch(s)
    fe, ld = res['full_epoch'], res['loader_ffcv']
    res['verdict'] = ('loader-bound' if ld['images_per_s_median'] < res['model_step']['images_per_s']
                      or fe['data_wait_fraction'] > 0.05 else 'compute-bound')
    if s.archive is not None and Path(s.archive).is_file():
        import tempfile
        log('conversion ...')
        with tempfile.TemporaryDirectory() as tmp:
            res['conversion'] = bench_conversion(Path(s.archive), Path(tmp))
    return res


def format_table(res: dict) -> str:
    f, t = res['loader_ffcv'], res['loader_torchvision']
    rows = [('what', 'images/s (median)', 'min-max / notes')]
    rows.append(('loader: FFCV (JIT aug + normalize)', f'{f["images_per_s_median"]:,.0f}',
                 f'{f["images_per_s_min"]:,.0f}-{f["images_per_s_max"]:,.0f}; warm-up {f["warmup_epoch_s"]:.1f} s'))
    rows.append(('loader: torchvision DataLoader', f'{t["images_per_s_median"]:,.0f}',
                 f'{t["images_per_s_min"]:,.0f}-{t["images_per_s_max"]:,.0f}; warm-up {t["warmup_epoch_s"]:.1f} s'))
    rows.append(('loader speed-up FFCV / torchvision', f'{res["loader_speedup"]:.1f}x', ''))
    if 'augmentation_ops' in res:
        a = res['augmentation_ops']
        rows.append(('aug ops only, uint8 out: ours / FFCV built-in', f'{a["ours"]:,.0f}',
                     f'FFCV built-in {a["ffcv_builtin"]:,.0f}: {a["speedup"]:.1f}x'))
    m = res['model_step']
    rows.append((f'model step ({m["precision"]}, channels-last, batch {m["batch"]})',
                 f'{m["images_per_s"]:,.1f}', f'{m["steps"]} steps, synthetic tensors'))
    if 'model_step_fp32_nchw' in res:
        m2 = res['model_step_fp32_nchw']
        rows.append(('model step (fp32, NCHW)', f'{m2["images_per_s"]:,.1f}',
                     f'AMP+channels-last speed-up {res["amp_channels_last_speedup"]:.2f}x'))
    e = res['full_epoch']
    rows.append((f'full epoch: loader + model ({e["images"]:,} images)', f'{e["images_per_s"]:,.1f}',
                 f'data wait {100 * e["data_wait_fraction"]:.2f}% of {e["epoch_s"]:.1f} s -> {res["verdict"]}'))
    if 'conversion' in res:
        c = res['conversion']
        rows.append((f'conversion ({c["images"]:,} images)', f'{c["images"] / c["seconds"]:,.0f}',
                     f'{c["seconds"]:.1f} s wall-clock'))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [' | '.join(r[i].ljust(w[i]) for i in range(3)) for r in rows]
    lines.insert(1, '-+-'.join('-' * x for x in w))
    env = res['environment']
    head = (f"{env['cpu']} ({env['cores']} cores), GPU: {env['gpu'] or 'none'}; torch {env['torch']}, "
            f"ffcv {env['ffcv']}, numba {env['numba']}")
    return head + '\n' + '\n'.join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    labels = ['FFCV loader', 'torchvision loader', 'model step', 'full epoch']
    values = [res['loader_ffcv']['images_per_s_median'], res['loader_torchvision']['images_per_s_median'],
              res['model_step']['images_per_s'], res['full_epoch']['images_per_s']]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.barh(labels, values, color=['C0', 'C1', 'C2', 'C3'])
    ax.set_xscale('log')
    ax.set_xlabel('images/s (log scale)')
    ax.bar_label(bars, labels=[f'{v:,.0f}' for v in values], padding=3)
    env = res['environment']
    ax.set_title(f"{env['gpu'] or env['cpu']} ({env['cores']} cores): FFCV {res['loader_speedup']:.1f}x torchvision")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def default_train_beton() -> Path:
    return ROOT / 'data_beton' / BETON_NAMES['train']
