"""Throughput, side by side on this machine: loaders, the trainer's own step, full epochs, conversion.

    python scripts/benchmark.py                      # rn18.yaml's batch/augmentation/model; minutes on 2 cores
    python scripts/benchmark.py --tiny --out /tmp/b  # seconds, for tests

Every section builds what the trainer builds (``ffcv_pipeline.data.build_data`` for the
loaders, ``training.step.TrainStep`` for the step), from a training config:

- loaders: images/s of the whole training input pipeline up to the normalized tensors the model
  consumes -- ``ffcv`` (FFCV, numba JIT ops), ``torchvision`` (the project's ffcv-free torch
  DataLoader, the same augmentation pixel for pixel) and ``classic`` (torchvision's per-image PIL
  transforms, the usual CIFAR pipeline FFCV replaces: the acceptance ratio is against it). The
  first epoch (numba compilation, worker start) is reported apart from the steady ones.
- augmentation ops (full runs): our reproducible FFCV ops vs FFCV's built-in ones, uint8 out.
- model step: synthetic batches through the trainer's step; on a GPU also fp32 NCHW, and
  ``torch.compile`` vs eager.
- full epoch: loader + step, with the time spent waiting for data (loader- or compute-bound?),
  per loader on a GPU, the FFCV one on the CPU.
- conversion: ``scripts/write_datasets.py`` on the real archive, as a subprocess.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ffcv_pipeline.augment import active, settings
from ffcv_pipeline.data import build_data, dataset_files, resolved_values
from model import build_model, use_channels_last

from training.config import ROOT, load_config, with_values
from training.runtime import dtype_name, resolve_device, resolve_precision, sync, workers_per_process
from training.optim import make_optimizer
from training.step import TrainStep

from . import environment

LOADERS = ('ffcv', 'torchvision', 'classic')


@dataclass
class Settings:
    config: str = 'rn18.yaml'  # batch size, augmentation, model and optimizer of the benchmark
    overrides: list[str] = field(default_factory=list)  # ['data.train_path=...', ...]
    device: str = 'auto'
    workers: int = -1  # loader workers; -1 = all usable cores
    loaders: tuple[str, ...] = LOADERS
    epochs: int = 3  # steady-state loader epochs after the warm-up epoch
    per_class: int = 0  # loader benchmark on the first N images of each class; 0 = all
    model_batch: int = 0  # 0 = the config's batch on a GPU, 32 on the CPU
    model_steps: int = 0  # 0 = 50 on a GPU, 5 on the CPU
    epoch_per_class: int = -1  # full epoch on N images per class; -1 = all on a GPU, 10 on the CPU
    compile: bool | None = None  # also time torch.compile's step; None = on a GPU
    compare_ops: bool = True
    archive: Path | None = None  # for the conversion timing; None skips it
    ffcv_delay_s: float = 0.0  # a sleep per FFCV training batch: a deliberately slow loader (make check)


# --- timing ------------------------------------------------------------------------------------
def run_epoch(batches: Iterable, device: torch.device, step: Callable | None = None) -> tuple[int, float, float]:
    """Iterate one epoch: (images, seconds, seconds spent waiting for the next batch)."""
    n, wait = 0, 0.0
    t0 = time.perf_counter()
    it = iter(batches)
    while True:
        t = time.perf_counter()
        try:
            x, y = next(it)[:2]
        except StopIteration:
            break
        wait += time.perf_counter() - t
        if step is not None:
            step(x, y)
        n += y.shape[0]
    sync(device)
    return n, time.perf_counter() - t0, wait


def time_epochs(epoch: Callable[[int], Iterable], epochs: int, device: torch.device,
                step: Callable | None = None) -> dict:
    """A warm-up epoch (compilation, worker start, autotuning), then ``epochs`` timed ones."""
    t0 = time.perf_counter()
    run_epoch(epoch(0), device, step)
    warmup = time.perf_counter() - t0
    runs = [run_epoch(epoch(e), device, step) for e in range(1, epochs + 1)]
    rates = [n / s for n, s, _ in runs]
    return {'warmup_epoch_s': round(warmup, 3), 'images_per_epoch': runs[0][0],
            'images_per_s_median': round(statistics.median(rates), 1),
            'images_per_s_min': round(min(rates), 1), 'images_per_s_max': round(max(rates), 1),
            'epochs': [round(r, 1) for r in rates], 'epoch_s': round(statistics.median(s for _, s, _ in runs), 4),
            'data_wait_fraction': round(sum(w for *_, w in runs) / sum(s for _, s, _ in runs), 5)}


# --- what is timed -----------------------------------------------------------------------------
class Bench:
    def __init__(self, s: Settings):
        self.s = s
        self.cfg = self.config()
        # what the data files hold decides the head, the image size and the augmentation sizes
        self.ds, (self.train_path, _), _ = dataset_files(self.cfg.data, ROOT)
        self.aug = settings(self.cfg.augment, self.ds.image_size)
        self.cfg = with_values(self.cfg, resolved_values(self.ds, self.aug))
        self.dev = resolve_device(self.cfg.training.device)
        self.dtype = resolve_precision(self.cfg.training.precision, self.dev)
        self.cuda = self.dev.type == 'cuda'
        self.workers = workers_per_process(s.workers)

    def config(self, *extra: str):
        return load_config(self.s.config, [*self.s.overrides, f'training.device={self.s.device}', *extra])

    def data(self, loader: str, per_class: int, batch: int | None = None):
        cfg = self.config(f'data.loader={loader}', f'data.train_per_class={per_class}',
                          *([f'data.batch_size={batch}'] if batch else []))
        data = build_data(cfg, device=self.dev, dtype=self.dtype, root=ROOT, workers=self.workers,
                          channels_last=use_channels_last(cfg.model, self.dev))
        if loader == 'ffcv' and self.s.ffcv_delay_s:
            data.train = _Slowed(data.train, self.s.ffcv_delay_s)
        return data

    def loader(self, kind: str) -> dict:
        if kind == 'classic':
            return self.classic_loader()
        train = self.data(kind, self.s.per_class).train
        return time_epochs(train.epoch, self.s.epochs, self.dev)

    def classic_loader(self) -> dict:
        """torchvision's per-image transforms, each op's own (``augment.Op.torchvision``): uint8
        array -> PIL -> flip/crop/... -> tensor -> normalize -> erase (cutout, mean fill = 0 after
        normalizing), what the usual CIFAR training scripts (and torchvision's CIFAR datasets)
        do per image."""
        import torchvision.transforms as T
        from ffcv_pipeline.data import per_class_indices
        from ffcv_pipeline.pixels import fill_colour, load_arrays
        cfg, ds = self.cfg, self.ds
        arrays = load_arrays(self.train_path.with_suffix('.npy'))
        idx = per_class_indices(arrays['label'], self.s.per_class)
        images, labels = (arrays['image'], arrays['label']) if idx is None else \
            (arrays['image'][idx], arrays['label'][idx])
        aug, fill = self.aug, fill_colour(ds.mean)
        stages = [o.torchvision(aug[o.name], ds.image_size, fill)
                  for o, _ in active(aug, ds.image_size, fill) if o.torchvision is not None]
        transform = T.Compose([*(t for kind, t in stages if kind == 'pil'), T.ToTensor(),
                               T.Normalize([m / 255 for m in ds.mean], [v / 255 for v in ds.std]),
                               *(t for kind, t in stages if kind == 'tensor')])
        loader = torch.utils.data.DataLoader(
            _PilDataset(images, labels, transform), batch_size=cfg.data.batch_size, shuffle=True,
            num_workers=self.workers, drop_last=True, persistent_workers=True, pin_memory=self.cuda)

        def epoch(_):
            for x, y in loader:
                yield x.to(self.dev, non_blocking=True).contiguous(memory_format=torch.channels_last), y
        return time_epochs(epoch, self.s.epochs, self.dev)

    def step(self, *, dtype: torch.dtype, channels_last: bool, compile: bool = False):
        """The trainer's step on a fresh model of the config's architecture."""
        torch.manual_seed(0)
        tc = self.cfg.training
        model = build_model({**self.cfg.model, 'channels_last': channels_last}, device=self.dev)
        net = torch.compile(model) if compile else model
        step = TrainStep(net, make_optimizer(model, tc), device=self.dev, dtype=dtype,
                         label_smoothing=tc.label_smoothing, grad_clip=tc.grad_clip)
        return lambda x, y: step(x, y, 0.1)  # a tenth of the peak LR: the figure is time, not accuracy

    def model_step(self, *, dtype: torch.dtype, channels_last: bool, compile: bool = False) -> dict:
        batch = self.s.model_batch or (self.cfg.data.batch_size if self.cuda else 32)
        steps = self.s.model_steps or (50 if self.cuda else 5)
        step = self.step(dtype=dtype, channels_last=channels_last, compile=compile)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        size = self.ds.image_size
        x = torch.randn(batch, 3, size, size, device=self.dev).contiguous(memory_format=fmt)
        y = torch.randint(0, self.cfg.model.num_classes, (batch,), device=self.dev)
        t = time.perf_counter()
        for _ in range(3 if compile else 2 if not self.cuda else 10):  # compile, autotune, warm up
            step(x, y)
        sync(self.dev)
        warm = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        sync(self.dev)
        dt = time.perf_counter() - t
        return {'images_per_s': round(steps * batch / dt, 1), 'batch': batch, 'steps': steps,
                'warmup_s': round(warm, 3), 'precision': dtype_name(dtype),
                'channels_last': channels_last, 'compiled': compile, 'width': self.cfg.model.width}

    def full_epoch(self, kind: str) -> dict:
        """Loader + step, as the trainer runs them; the share of time spent waiting for data."""
        per_class = self.s.epoch_per_class if self.s.epoch_per_class >= 0 else 0 if self.cuda else 10
        batch = None if self.cuda else (self.s.model_batch or 32)
        train = self.data(kind, per_class, batch).train
        cl = use_channels_last(self.cfg.model, self.dev)
        out = time_epochs(train.epoch, 1, self.dev,
                          step=self.step(dtype=self.dtype, channels_last=cl))
        return {**out, 'batch': batch or self.cfg.data.batch_size, 'precision': dtype_name(self.dtype)}

    def augmentation_ops(self) -> dict:
        """uint8 output, augmentation only: our reproducible ops vs FFCV's built-in ones, both
        through the trainer's own pipeline builder (``loaders.train_pipeline``)."""
        from ffcv_pipeline.loaders import make_loader, train_pipeline
        from ffcv_pipeline.ops import AugmentationState
        cpu, out = torch.device('cpu'), {}
        for name in ('ours', 'ffcv_builtin'):
            state = AugmentationState(0)
            pipelines = train_pipeline(device=cpu, dtype=torch.float32, state=state, normalize=False,
                                       ffcv_builtin=name == 'ffcv_builtin', mean=self.ds.mean,
                                       std=self.ds.std, image_size=self.ds.image_size, **self.aug)
            loader = make_loader(self.train_path, batch_size=self.cfg.data.batch_size,
                                 num_workers=self.workers, order='quasi_random', os_cache=True,
                                 drop_last=True, state=state, pipelines=pipelines)
            out[name] = time_epochs(loader.epoch, self.s.epochs, cpu)['images_per_s_median']
        out['speedup'] = round(out['ours'] / out['ffcv_builtin'], 2)
        return out


@dataclass
class _Slowed:
    """A training loader that sleeps ``delay_s`` before handing over each batch."""
    loader: object
    delay_s: float

    def epoch(self, epoch: int):
        for batch in self.loader.epoch(epoch):
            time.sleep(self.delay_s)
            yield batch


class _PilDataset(torch.utils.data.Dataset):
    """What torchvision's CIFAR datasets do per item: a uint8 array -> PIL image -> transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def bench_conversion(archive: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / 'scripts' / 'write_datasets.py'), '--source', str(archive),
               '--out', tmp, '--force', '--quiet']
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        dt = time.perf_counter() - t
        if r.returncode != 0:
            raise RuntimeError(f'conversion failed: {r.stderr.strip()}')
        m = json.loads((Path(tmp) / 'manifest.json').read_text())
    return {'seconds': round(dt, 3), 'images': sum(v['count'] for v in m['splits'].values()),
            'command': f'python scripts/write_datasets.py --source {archive} --out DIR --force --quiet'}


def run_benchmark(s: Settings, log=print, save: Callable[[dict], None] | None = None) -> dict:
    """Every section, most telling first (a time limit keeps the rest: ``save`` gets the result
    after each section)."""
    b = Bench(s)
    res: dict = {'settings': {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(s).items()},
                 'environment': environment(b.dev), 'loaders': {}, 'full_epoch': {}}
    save = save or (lambda _: None)
    cl = use_channels_last(b.cfg.model, b.dev)
    for kind in s.loaders:
        log(f'loader: {kind}, batch {b.cfg.data.batch_size}, {b.workers} workers ...')
        res['loaders'][kind] = b.loader(kind)
        rate = {k: v['images_per_s_median'] for k, v in res['loaders'].items()}
        res['loader_speedup'] = {f'ffcv/{k}': round(rate['ffcv'] / rate[k], 2)
                                 for k in rate if k != 'ffcv' and 'ffcv' in rate}
        save(res)
    for kind in [k for k in s.loaders if k != 'classic'][:None if b.cuda else 1]:
        log(f'full epoch ({kind} loader + step) ...')
        res['full_epoch'][kind] = b.full_epoch(kind)
        first = next(iter(res['full_epoch'].values()))
        res['verdict'] = 'loader-bound' if first['data_wait_fraction'] > 0.05 else 'compute-bound'
        save(res)
    log('model step ...')
    res['model_step'] = b.model_step(dtype=b.dtype, channels_last=cl)
    if b.cuda:
        res['model_step_fp32_nchw'] = b.model_step(dtype=torch.float32, channels_last=False)
        res['amp_channels_last_speedup'] = round(res['model_step']['images_per_s'] /
                                                 res['model_step_fp32_nchw']['images_per_s'], 2)
    save(res)
    if s.compare_ops and 'ffcv' in s.loaders:
        log('augmentation ops: ours vs FFCV built-in (uint8 out) ...')
        res['augmentation_ops'] = b.augmentation_ops()
        save(res)
    if s.compile if s.compile is not None else b.cuda:
        log('model step, torch.compile ...')
        res['model_step_compiled'] = b.model_step(dtype=b.dtype, channels_last=cl, compile=True)
        res['compile_speedup'] = round(res['model_step_compiled']['images_per_s'] /
                                       res['model_step']['images_per_s'], 2)
        save(res)
    if s.archive is not None and Path(s.archive).is_file():
        log('conversion ...')
        res['conversion'] = bench_conversion(Path(s.archive))
        save(res)
    return res
