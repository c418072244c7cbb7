"""The training loop: FFCV loaders -> channels-last ResNet under AMP -> metrics, checkpoints.

    python scripts/train.py --config rn18.yaml                 # one GPU (or the CPU)
    torchrun --nproc_per_node 8 scripts/train.py --config rn18.yaml

SGD + Nesterov, weight decay on weights only, label smoothing, a per-iteration LR array
(linear warm-up, then linear or cosine decay to zero), one AMP code path (bf16 where the GPU
has it, else fp16 with a gradient scaler; fp32 or bf16 on the CPU), optional torch.compile,
flip test-time augmentation. Data order and augmentation are functions of (seed, epoch), and
checkpoints carry everything else (weights, optimizer, scaler, step, RNG states), so a resumed
run -- even one interrupted mid-epoch by Ctrl-C -- continues exactly where it stopped.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ffcv_pipeline.constants import (CIFAR100_MEAN, CIFAR100_STD, COARSE_LABEL_NAMES,
                                     FINE_LABEL_NAMES, FINE_TO_COARSE, MANIFEST_NAME)
from model import build_model, count_parameters
from model.checkpoint import atomic_save, load_checkpoint, make_checkpoint

from . import distributed as D
from .config import ROOT, ConfigError, load_config, to_dict, to_yaml
from .metrics import append_jsonl, plot_curves, read_jsonl, time_to_target, truncate_jsonl, write_json_atomic

NAN_CHECK_EVERY = 20  # steps between loss finiteness checks (each one is a host-device sync)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(Exception):
    """Ctrl-C; a resumable checkpoint was written."""


class _StopAtBatchBoundary(Exception):
    pass


class StopRequest:
    """While active, the first Ctrl-C (SIGINT) or SIGTERM (preemption, torchrun shutting down)
    only sets ``requested``; the loop stops at the next batch boundary, so a checkpoint never
    holds a half-applied optimizer step. A second one raises KeyboardInterrupt at once."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._prev: dict = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._prev = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, prev in self._prev.items():
            signal.signal(sig, prev)
        self._prev = {}


# --- small pieces -------------------------------------------------------------------------------
def resolve_device(name: str, info: D.DistInfo) -> torch.device:
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda'):
        if not torch.cuda.is_available():
            raise ConfigError(f'training.device: {name!r} requested but CUDA is not available; '
                              f'use --training.device cpu')
        if name == 'cuda':
            name = f'cuda:{info.local_rank}'
        elif info.enabled:
            raise ConfigError(f'training.device: {name!r} would put every torchrun process on one '
                              f'GPU; use cuda (each process takes its LOCAL_RANK)')
        dev = torch.device(name)
        torch.cuda.set_device(dev)
        return dev
    return torch.device('cpu')


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    if name == 'auto':
        if device.type == 'cuda':
            # native bf16 (Ampere and newer); V100/T4 would only emulate it: fp16 + scaler there
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return torch.float32
    if name == 'fp16' and device.type == 'cpu':
        raise ConfigError('training.precision: fp16 is not supported on the CPU; use bf16 or fp32')
    return {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}[name]


def lr_schedule(*, lr: float, epochs: int, iters_per_epoch: int, warmup_epochs: float,
                kind: str) -> np.ndarray:
    """LR for every optimizer step: linear warm-up 0 -> lr, then decay to 0 (linear/cosine)."""
    total = epochs * iters_per_epoch
    warm = int(round(warmup_epochs * iters_per_epoch))
    steps = np.arange(total, dtype=np.float64)
    sched = np.empty(total)
    up = steps < warm
    sched[up] = lr * (steps[up] + 1) / warm  # first step already > 0
    t = (steps[~up] - warm) / max(total - warm, 1)  # 0 -> 1 over the decay
    sched[~up] = lr * (1 - t) if kind == 'linear' else lr * 0.5 * (1 + np.cos(np.pi * t))
    return sched


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights (dim >= 2) only, not on biases or BatchNorm."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]


def beton_labels(path: str) -> np.ndarray:
    """Fine labels of a .beton, read from its metadata table (no decoding)."""
    from ffcv.reader import Reader
    reader = Reader(str(path))
    return np.asarray(reader.metadata[f'f{list(reader.handlers).index("label")}']).astype(np.int64).ravel()


def per_class_indices(labels: np.ndarray, per_class: int) -> np.ndarray | None:
    """The first ``per_class`` indices of every class (sorted), or None for all."""
    if per_class <= 0:
        return None
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
    return np.sort(keep)


def _abs(p: str) -> Path:
    return Path(p) if Path(p).is_absolute() else ROOT / p


def get_rng_state() -> dict:
    st = {'python': random.getstate(), 'numpy': list(np.random.get_state()),
          'torch': torch.get_rng_state()}
    st['numpy'][1] = torch.from_numpy(st['numpy'][1].copy())  # weights_only-loadable
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st['cuda'] = torch.cuda.get_rng_state()  # this process's device only: resumable elsewhere
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in st['python']))
    np_state = list(st['numpy'])
    np_state[1] = np_state[1].numpy()
    np.random.set_state(tuple(np_state))
    torch.set_rng_state(st['torch'])
    if isinstance(st.get('cuda'), torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(st['cuda'])


@dataclass
class EpochStats:
    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int = 0
    seconds: float = 0.0

    @classmethod
    def zeros(cls, device):
        return cls(torch.zeros((), device=device, dtype=torch.float64),
                   torch.zeros((), device=device, dtype=torch.float64))


@dataclass
class Trainer:
    cfg: object
    config_name: str = 'config'
    resume: str | None = None
    log: callable = print
    info: D.DistInfo = field(default_factory=D.dist_from_env)

    # ---- set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        self.t_start = time.perf_counter()
        cfg = self.cfg
        self.device = resolve_device(cfg.training.device, self.info)
        D.init(self.info, self.device)
        self.dtype = resolve_precision(cfg.training.precision, self.device)
        torch.manual_seed(cfg.training.seed)
        np.random.seed(cfg.training.seed)
        random.seed(cfg.training.seed)
        if self.device.type == 'cuda':
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self._setup_data()
        m = cfg.model
        self.model = build_model(m.arch, num_classes=m.num_classes, width=m.width,
                                 channels_last=m.channels_last).to(self.device)
        self.n_params = count_parameters(self.model)
        self.optimizer = torch.optim.SGD(param_groups(self.model, cfg.training.weight_decay),
                                         lr=0.0, momentum=cfg.training.momentum,
                                         nesterov=cfg.training.nesterov and cfg.training.momentum > 0)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.lrs = lr_schedule(lr=cfg.training.lr, epochs=cfg.training.epochs,
                               iters_per_epoch=len(self.train_loader),
                               warmup_epochs=cfg.training.warmup_epochs, kind=cfg.training.lr_schedule)
        self.start_epoch, self.start_batch, self.step = 0, 0, 0
        self.best_top1, self.elapsed_before = 0.0, 0.0
        self.partial: dict | None = None
        self.stop = StopRequest()
        if self.resume:
            self._load_resume(self.resume)

        # eval_net: the (compiled) model without DDP. DDP syncs buffers before every forward, so
        # evaluating through it would need the same number of batches on every rank.
        self.eval_net = torch.compile(self.model) if cfg.training.compile else self.model
        self.net = self.eval_net
        if self.info.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == 'cuda' else None)
        self._setup_run_dir()

    def _setup_data(self) -> None:
        from ffcv_pipeline.loaders import make_loader, test_pipeline, train_pipeline
        from ffcv_pipeline.ops import AugmentationState

        cfg, info = self.cfg, self.info
        train_path, test_path = _abs(cfg.data.train_path), _abs(cfg.data.test_path)
        for p in (train_path, test_path):
            if not p.is_file():
                raise FileNotFoundError(f'{p}: no such .beton file; run `python scripts/write_datasets.py` '
                                        f'first (or set data.train_path / data.test_path)')
        manifest = train_path.parent / MANIFEST_NAME
        self.class_names, self.coarse_names = list(FINE_LABEL_NAMES), list(COARSE_LABEL_NAMES)
        if manifest.is_file():
            import json
            m = json.loads(manifest.read_text())
            self.class_names = m.get('fine_label_names', self.class_names)
            self.coarse_names = m.get('coarse_label_names', self.coarse_names)

        # -1: all cores, shared among the processes torchrun starts on this node
        local_procs = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
        workers = cfg.data.num_workers if cfg.data.num_workers > 0 else max(1, os.cpu_count() // local_procs)
        train_labels, test_labels = beton_labels(train_path), beton_labels(test_path)
        n_labels = int(max(train_labels.max(), test_labels.max())) + 1
        if cfg.model.num_classes < n_labels:
            raise ConfigError(f'model.num_classes: {cfg.model.num_classes} is fewer than the '
                              f'{n_labels} classes in {train_path.name}')
        train_idx = per_class_indices(train_labels, cfg.data.train_per_class)
        test_idx = per_class_indices(test_labels, cfg.data.test_per_class)
        if test_idx is None:
            test_idx = np.arange(len(test_labels))
        if info.enabled:  # exact, disjoint evaluation shards; sums are all-reduced
            test_idx = test_idx[info.rank::info.world_size]
        self.aug_state = AugmentationState(cfg.training.seed)
        a = cfg.augment
        self.train_loader = make_loader(
            train_path, batch_size=cfg.data.batch_size, num_workers=workers, order=cfg.data.order,
            os_cache=cfg.data.os_cache, drop_last=True, distributed=info.enabled,
            seed=cfg.training.seed, indices=train_idx, batches_ahead=cfg.data.batches_ahead,
            state=self.aug_state,
            pipelines=train_pipeline(device=self.device, dtype=self.dtype, state=self.aug_state,
                                     flip=a.flip, padding=a.translate, cutout=a.cutout))
        self.test_loader = make_loader(
            test_path, batch_size=cfg.data.test_batch_size, num_workers=workers, order='sequential',
            os_cache=cfg.data.os_cache, drop_last=False, indices=test_idx,
            batches_ahead=cfg.data.batches_ahead,
            pipelines=test_pipeline(device=self.device, dtype=self.dtype))
        if len(self.train_loader) == 0:
            raise ConfigError(f'data.batch_size {cfg.data.batch_size} exceeds the '
                              f'{self.train_loader.num_samples} training images per process')

    def _setup_run_dir(self) -> None:
        cfg = self.cfg
        if self.resume:
            self.run_dir = Path(self.resume).resolve().parent
        else:
            name = cfg.output.name or f'{self.config_name}-{_dt.datetime.now():%Y%m%d-%H%M%S}'
            self.run_dir = _abs(cfg.output.dir) / name
        self.metrics_path = self.run_dir / 'metrics.jsonl'
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / 'config.yaml').write_text(to_yaml(cfg))
            if self.resume:
                truncate_jsonl(self.metrics_path, self.start_epoch)
            else:
                self.metrics_path.unlink(missing_ok=True)

    # ---- checkpoints ----------------------------------------------------------------------
    def _checkpoint(self, *, epoch: int, batch: int = 0, metrics: dict | None = None,
                    partial: dict | None = None) -> dict:
        cfg = self.cfg
        return make_checkpoint(
            self.model, model_config=dict(cfg.model), class_names=self.class_names,
            coarse_names=self.coarse_names, fine_to_coarse=FINE_TO_COARSE,
            mean=CIFAR100_MEAN, std=CIFAR100_STD, config=to_dict(cfg), epoch=epoch, step=self.step,
            metrics={**(metrics or {}), 'best_top1': self.best_top1, 'epochs_planned': cfg.training.epochs,
                     'params': self.n_params, 'train_seconds': self._elapsed()},
            batch=batch, best_top1=self.best_top1, elapsed_s=self._elapsed(),
            optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
            rng=get_rng_state(), partial=partial)

    def _save(self, ckpt: dict, *names: str) -> None:
        """Serialize once (~90 MB for ResNet-18 with momentum), then hard-link the other names:
        checkpointing sits on the time-to-accuracy path every epoch."""
        if not self.info.is_main:
            return
        first = self.run_dir / names[0]
        atomic_save(ckpt, first)
        for n in names[1:]:
            tmp = self.run_dir / f'.{n}.link-{os.getpid()}'
            tmp.unlink(missing_ok=True)
            try:
                os.link(first, tmp)  # last.pt is later replaced by a new file; this one stays
            except OSError:  # no hard links on this filesystem
                shutil.copyfile(first, tmp)
            os.replace(tmp, self.run_dir / n)

    def _load_resume(self, path: str) -> None:
        ckpt = load_checkpoint(path, map_location='cpu')
        for key in ('optimizer', 'scaler', 'rng'):
            if key not in ckpt:
                raise ConfigError(f'{path}: checkpoint has no {key} state; it cannot be resumed '
                                  f'(inference-only export?)')
        self.model.load_state_dict(ckpt['model'])
        self.optimizer.load_state_dict(ckpt['optimizer'])
        if ckpt['scaler'] and self.scaler.is_enabled():  # empty when saved by a bf16/fp32 run
            self.scaler.load_state_dict(ckpt['scaler'])
        set_rng_state(ckpt['rng'])
        self.start_epoch, self.start_batch = ckpt['epoch'], ckpt.get('batch', 0)
        self.step, self.best_top1 = ckpt['step'], ckpt.get('best_top1', 0.0)
        self.elapsed_before = ckpt.get('elapsed_s', 0.0)
        self.partial = ckpt.get('partial')
        where = f'epoch {self.start_epoch + 1}, batch {self.start_batch}' if self.start_batch else \
            f'the start of epoch {self.start_epoch + 1}'
        if self.info.is_main:
            self.log(f'resuming {path} at {where} (step {self.step})')

    # ---- the loop -------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def _progress(self):
        mode = self.cfg.output.progress
        return self.info.is_main and (sys.stderr.isatty() if mode is None else mode)

    def warmup_jit(self) -> float:
        """Compile the FFCV pipelines (numba) before timing epochs; returns seconds."""
        t = time.perf_counter()
        for loader in (self.train_loader, self.test_loader):
            it = loader.epoch(0)
            next(it)
            it.close()
        return time.perf_counter() - t

    def train_epoch(self, epoch: int, stats: EpochStats) -> EpochStats:
        from tqdm import tqdm
        cfg, device = self.cfg, self.device
        n_batches = len(self.train_loader)
        skip = self.start_batch if epoch == self.start_epoch else 0
        self.net.train()
        autocast = torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        bar = tqdm(total=n_batches, initial=skip, desc=f'epoch {epoch + 1}/{cfg.training.epochs}',
                   unit='batch', disable=not self._progress(), leave=False, dynamic_ncols=True)
        t0 = time.perf_counter()
        first_step = epoch * n_batches  # every epoch has n_batches steps (drop_last)
        try:
            for b, (x, y) in enumerate(self.train_loader.epoch(epoch)):
                if b < skip:  # resuming mid-epoch: the same batches, already trained on
                    continue
                if self._stop_requested(b):
                    raise _StopAtBatchBoundary
                for g in self.optimizer.param_groups:
                    g['lr'] = float(self.lrs[self.step])  # a numpy scalar would not load with weights_only
                with autocast:
                    logits = self.net(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.training.label_smoothing)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if cfg.training.grad_clip > 0:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.training.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.step += 1
                stats.loss_sum += loss.detach().double() * y.shape[0]
                stats.correct += (logits.detach().argmax(1) == y).sum()
                stats.seen += y.shape[0]
                bar.update(1)
                if (b + 1) % NAN_CHECK_EVERY == 0 or b + 1 == n_batches:
                    self._check_finite(stats.loss_sum, epoch, b)
                    if not bar.disable:
                        bar.set_postfix(img_s=f'{stats.seen / (time.perf_counter() - t0 + stats.seconds):.0f}',
                                        loss=f'{(stats.loss_sum / stats.seen).item():.3f}')
        except _StopAtBatchBoundary:
            self._sync()
            stats.seconds += time.perf_counter() - t0
            self._save(self._checkpoint(epoch=epoch, batch=self.step - first_step,
                                        partial=self._partial(stats)), 'interrupted.pt')
            raise TrainingInterrupted(self.run_dir / 'interrupted.pt') from None
        finally:
            bar.close()
        self._sync()
        stats.seconds += time.perf_counter() - t0
        return stats

    def _partial(self, s: EpochStats) -> dict:
        """The interrupted epoch's statistics summed over ranks (called on every rank)."""
        t = D.all_reduce_sum(torch.stack([s.loss_sum, s.correct, torch.tensor(
            float(s.seen), device=self.device, dtype=torch.float64)]))
        loss_sum, correct, seen = t.tolist()
        return {'loss_sum': loss_sum, 'correct': correct, 'seen': int(seen), 'seconds': s.seconds}

    def _check_finite(self, loss_sum: torch.Tensor, epoch: int, batch: int) -> None:
        # summed over ranks: every rank takes the same decision (a lone raise would deadlock DDP)
        total = D.all_reduce_sum(loss_sum.detach().clone()) if self.info.enabled else loss_sum
        if not math.isfinite(total.item()):
            raise TrainingDiverged(
                f'training diverged: the loss is {total.item()} at epoch {epoch + 1}, batch '
                f'{batch + 1} (step {self.step}); the last good checkpoint is kept in {self.run_dir} '
                f'(try a lower --training.lr than {self.cfg.training.lr})')

    def _sync(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def evaluate(self) -> tuple[float, float, float, int]:
        """(top-1, top-5, seconds, images) on the test set (all ranks), flip TTA if configured."""
        t0 = time.perf_counter()
        D.broadcast_buffers(self.model)  # BatchNorm statistics: rank 0's, as DDP trains with
        net = self.eval_net
        net.eval()
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # top1, top5, count
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        for x, y in self.test_loader.epoch(0):
            with autocast:
                logits = net(x).float()
                if self.cfg.training.tta:
                    logits = logits + net(torch.flip(x, dims=[3])).float()
            top5 = logits.topk(5, dim=1).indices
            sums[0] += (top5[:, 0] == y).sum()
            sums[1] += (top5 == y[:, None]).any(1).sum()
            sums[2] += y.shape[0]
        D.all_reduce_sum(sums)
        top1, top5, n = sums.tolist()
        return top1 / n, top5 / n, time.perf_counter() - t0, int(n)

    def run(self) -> dict:
        self.setup()
        cfg, info = self.cfg, self.info
        if info.is_main:
            self.log(f'{cfg.model.arch} ({self.n_params:,} parameters) on {self.device} '
                     f'[{str(self.dtype).replace("torch.", "")}, world size {info.world_size}], '
                     f'{len(self.train_loader) * cfg.data.batch_size:,} training images/process, batch '
                     f'{cfg.data.batch_size}, {len(self.train_loader)} steps/epoch; run folder {self.run_dir}')
        if info.is_main and self.device.type == 'cpu' and self.n_params > 5_000_000 \
                and self.train_loader.num_samples > 10_000:
            self.log('note: training a full-size model on the CPU (no GPU found): expect ~50 images/s '
                     'on 2 cores, ~15 min per CIFAR-100 epoch. For a quick check use '
                     '--config cpu_small.yaml')
        jit_s = self.warmup_jit()
        setup_s = time.perf_counter() - self.t_start
        if info.is_main:
            self.log(f'set-up {setup_s:.1f} s, of which FFCV/numba JIT compilation {jit_s:.1f} s')

        for epoch in range(self.start_epoch, cfg.training.epochs):
            stats = EpochStats.zeros(self.device)
            if self.partial and epoch == self.start_epoch:
                p = self.partial
                stats.seconds = p['seconds']
                if self.info.is_main:  # totals over all ranks: add them once
                    stats.loss_sum += p['loss_sum']
                    stats.correct += p['correct']
                    stats.seen = p['seen']
            with self.stop:
                self.train_epoch(epoch, stats)  # a stop request in here saves interrupted.pt
                self.end_epoch(epoch, stats)
            if self._stop_requested(None):  # during evaluation or saving: last.pt is complete
                raise TrainingInterrupted(self.run_dir / 'last.pt')
        return self.finish(jit_s, setup_s)

    def _stop_requested(self, batch: int | None) -> bool:
        """Ctrl-C seen (by any rank: checked collectively every few steps under DDP)."""
        if not self.info.enabled:
            return self.stop.requested
        if batch is None or batch % NAN_CHECK_EVERY == 0:
            return D.broadcast_flag(self.stop.requested, self.device)
        return False

    def end_epoch(self, epoch: int, stats: EpochStats) -> None:
        """Reduce metrics over ranks, evaluate, log, checkpoint."""
        cfg, info = self.cfg, self.info
        totals = D.all_reduce_sum(torch.stack([stats.loss_sum, stats.correct,
                                               torch.tensor(float(stats.seen), device=self.device,
                                                            dtype=torch.float64)]))
        loss_sum, correct, seen = totals.tolist()
        last = epoch + 1 == cfg.training.epochs
        top1 = top5 = None
        eval_s, n_test = 0.0, 0
        if (epoch + 1) % cfg.training.eval_every == 0 or last:
            top1, top5, eval_s, n_test = self.evaluate()
        record = {
            'epoch': epoch + 1, 'lr': float(self.lrs[self.step - 1]),
            'train_loss': loss_sum / seen, 'train_acc': correct / seen,
            'test_top1': top1, 'test_top5': top5,
            'epoch_seconds': round(stats.seconds, 4), 'eval_seconds': round(eval_s, 4),
            'train_images_per_s': round(seen / stats.seconds, 1),
            'train_images': int(seen), 'test_images': n_test,
            'wallclock_s': round(self._elapsed(), 3),
        }
        improved = top1 is not None and top1 > self.best_top1
        if improved:
            self.best_top1 = top1
        if not info.is_main:
            return
        append_jsonl(self.metrics_path, record)
        t1 = f'{top1:.4f}' if top1 is not None else '-'
        self.log(f'epoch {epoch + 1:3d}/{cfg.training.epochs}  lr {record["lr"]:.4f}  '
                 f'loss {record["train_loss"]:.4f}  train {record["train_acc"]:.4f}  '
                 f'test top-1 {t1}  {record["train_images_per_s"]:,.0f} img/s  '
                 f'{stats.seconds:.1f}+{eval_s:.1f} s  [{record["wallclock_s"]:.1f} s]')
        ckpt = self._checkpoint(epoch=epoch + 1, metrics={'test_top1': top1, 'test_top5': top5})
        names = ['last.pt'] + (['best.pt'] if improved else [])
        if cfg.output.save_every and (epoch + 1) % cfg.output.save_every == 0:
            names.append(f'epoch_{epoch + 1:03d}.pt')
        self._save(ckpt, *names)
        (self.run_dir / 'interrupted.pt').unlink(missing_ok=True)

    def finish(self, jit_s: float, setup_s: float) -> dict:
        cfg = self.cfg
        summary = {}
        if self.info.is_main:
            records = read_jsonl(self.metrics_path)
            tt, te = time_to_target(records, cfg.training.target_top1)
            evals = [r for r in records if r['test_top1'] is not None]
            best = max(evals, key=lambda r: r['test_top1']) if evals else None
            ips = sorted(r['train_images_per_s'] for r in records[1:] or records)
            summary = {
                'config': self.config_name, 'run_dir': str(self.run_dir),
                'best_top1': best and best['test_top1'], 'best_epoch': best and best['epoch'],
                'final_top1': evals[-1]['test_top1'] if evals else None,
                'final_top5': evals[-1]['test_top5'] if evals else None,
                'target_top1': cfg.training.target_top1,
                'time_to_target_s': tt, 'epoch_reached_target': te,
                'total_seconds': round(self._elapsed(), 3),
                'train_seconds': round(sum(r['epoch_seconds'] for r in records), 3),
                'eval_seconds': round(sum(r['eval_seconds'] for r in records), 3),
                'setup_seconds': round(setup_s, 3), 'numba_compile_seconds': round(jit_s, 3),
                'median_train_images_per_s': ips[len(ips) // 2] if ips else None,
                'epochs': cfg.training.epochs, 'world_size': self.info.world_size,
                'device': (torch.cuda.get_device_name(self.device) if self.device.type == 'cuda'
                           else f'cpu ({os.cpu_count()} cores)'),
                'precision': str(self.dtype).replace('torch.', ''), 'params': self.n_params,
                'torch_version': str(torch.__version__),
            }
            write_json_atomic(self.run_dir / 'summary.json', summary)
            if cfg.output.plot and records:
                plot_curves(records, self.run_dir / 'curves.png',
                            title=f'{self.config_name}: best top-1 {summary["best_top1"]:.4f}'
                            if summary['best_top1'] is not None else self.config_name)
            reached = f'reached {cfg.training.target_top1:.0%} at {tt:.1f} s (epoch {te})' if tt is not None \
                else f'did not reach {cfg.training.target_top1:.0%}'
            best = 'n/a' if summary['best_top1'] is None else f'{summary["best_top1"]:.4f}'
            final = 'n/a' if summary['final_top1'] is None else f'{summary["final_top1"]:.4f}'
            self.log(f'done: best top-1 {best}, final {final}, {reached}; '
                     f'total {summary["total_seconds"]:.1f} s; {self.run_dir}/summary.json')
        return summary


def train(config: str | None, overrides: list[str] | None = None, resume: str | None = None,
          log=print) -> dict:
    """Load the config (or the resumed checkpoint's) and run; returns the summary (rank 0)."""
    if resume:
        cfg = load_config(None, overrides, base=load_checkpoint(resume)['config'])
        name = Path(resume).resolve().parent.name
    else:
        cfg = load_config(config, overrides)
        name = Path(config).stem if config else 'default'
    trainer = Trainer(cfg, config_name=name, resume=resume, log=log)
    try:
        return trainer.run()
    finally:
        D.shutdown()
