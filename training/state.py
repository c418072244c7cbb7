"""A run's state on disk: its folder (resolved config, metrics, checkpoints) and what a
checkpoint holds so that a resumed run continues exactly (weights, optimizer, scaler, RNG
states, position in the schedule, the interrupted epoch's statistics).

    runs/<name>/config.yaml      the resolved config
    runs/<name>/metrics.jsonl    one JSON object per finished epoch (rewritten atomically)
    runs/<name>/last.pt          after every epoch; best.pt when test top-1 improved
    runs/<name>/interrupted.pt   after Ctrl-C / SIGTERM mid-epoch (removed at the next epoch end)

Every file goes through :func:`model.fileio.atomic_write`: a crash or a full disk never leaves
a half-written file, and the previous checkpoint stays loadable.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ffcv_pipeline.constants import CIFAR100_MEAN, CIFAR100_STD, FINE_TO_COARSE
from model.checkpoint import RESUME_KEYS, atomic_save, load_checkpoint, make_checkpoint, unwrap
from model.fileio import atomic_write, atomic_write_text

from .config import ConfigError, to_dict, to_yaml
from .metrics import read_jsonl

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
class Position:
    """Where a run stands: what a resumed run starts from (all zero for a new run)."""
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the next epoch already trained on (a mid-epoch stop)
    step: int = 0  # optimizer steps taken
    best_top1: float = 0.0
    elapsed_s: float = 0.0  # wall-clock of earlier sessions of this run
    partial: dict | None = None  # the interrupted epoch's statistics, summed over ranks

    def describe(self) -> str:
        where = (f'epoch {self.epoch + 1}, batch {self.batch}' if self.batch
                 else f'the start of epoch {self.epoch + 1}')
        return f'{where} (step {self.step})'


def _cpu_weights(model) -> dict:
    """The bare model's state_dict on the CPU, floating point as float32 (as ``make_checkpoint``)."""
    return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
            for k, v in unwrap(model).state_dict().items()}


def training_checkpoint(model, cfg, *, class_names, coarse_names, pos: Position,
                        metrics: dict | None, n_params: int, optimizer, scaler, ema=None) -> dict:
    """A resumable checkpoint: the inference part (``model.checkpoint``) plus optimizer,
    scaler and RNG states and the run's position. With an EMA (``training.ema``), 'model' is the
    averaged model -- the one evaluated, so the metrics describe it, and the one the app and
    export load -- and the raw training weights go to 'raw_model' for resuming."""
    meta = {**(metrics or {}), 'best_top1': pos.best_top1, 'epochs_planned': cfg.training.epochs,
            'params': n_params, 'train_seconds': pos.elapsed_s}
    extra = {} if ema is None else {'raw_model': _cpu_weights(model), 'ema': ema.state_dict()}
    return make_checkpoint(
        model if ema is None else ema.module, model_config=dict(cfg.model), class_names=class_names, coarse_names=coarse_names,
        fine_to_coarse=FINE_TO_COARSE, mean=CIFAR100_MEAN, std=CIFAR100_STD, config=to_dict(cfg),
        epoch=pos.epoch, step=pos.step, metrics=meta, batch=pos.batch, best_top1=pos.best_top1,
        elapsed_s=pos.elapsed_s, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
        rng=get_rng_state(), partial=pos.partial, **extra)


def restore(path: str | os.PathLike, *, model, optimizer, scaler, ema=None) -> Position:
    """Load ``path`` into the model, optimizer, scaler (and EMA), restore the RNG states;
    returns where the run stopped. An inference-only checkpoint cannot be resumed. A checkpoint
    without an EMA resumed with one starts the average from its weights."""
    ckpt = load_checkpoint(path, map_location='cpu')
    missing = [k for k in RESUME_KEYS if k not in ckpt and k != 'best_top1']  # older files lack it
    if missing:
        raise ConfigError(f'{path}: checkpoint has no {missing[0]} state; it cannot be resumed '
                          f'(inference-only export?)')
    model.load_state_dict(ckpt.get('raw_model', ckpt['model']))
    if ema is not None:
        ema.load_state_dict(ckpt.get('ema', {'updates': 0}), ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    if ckpt['scaler'] and scaler.is_enabled():  # empty when saved by a bf16/fp32 run
        scaler.load_state_dict(ckpt['scaler'])
    set_rng_state(ckpt['rng'])
    return Position(epoch=ckpt['epoch'], batch=ckpt.get('batch', 0), step=ckpt['step'],
                    best_top1=ckpt.get('best_top1', 0.0), elapsed_s=ckpt.get('elapsed_s', 0.0),
                    partial=ckpt.get('partial'))


class RunFolder:
    """``runs/<name>/``: only the main process writes (``is_main``); the others keep the path."""

    def __init__(self, path: Path, *, is_main: bool = True):
        self.path, self.is_main = Path(path), is_main
        self.metrics_path = self.path / 'metrics.jsonl'
        self.records: list[dict] = []

    def start(self, cfg, *, resumed_epochs: int | None) -> None:
        """Write the resolved config; keep the metrics of the ``resumed_epochs`` epochs a
        resumed run has completed (its later lines are redone), or start them afresh."""
        if not self.is_main:
            return
        atomic_write_text(self.path / 'config.yaml', to_yaml(cfg))  # makes the folder
        if resumed_epochs is None:
            self.metrics_path.unlink(missing_ok=True)  # a reused output.name starts over
        else:
            self.records = [r for r in read_jsonl(self.metrics_path) if r.get('epoch', 0) <= resumed_epochs]
            self._write_metrics()

    def add_record(self, record: dict) -> None:
        if self.is_main:
            self.records.append(record)
            self._write_metrics()

    def _write_metrics(self) -> None:
        atomic_write_text(self.metrics_path, ''.join(json.dumps(r) + '\n' for r in self.records))

    def save(self, ckpt: dict, *names: str) -> None:
        """Serialize once (~90 MB for ResNet-18 with momentum), then hard-link the other names:
        checkpointing sits on the time-to-accuracy path every epoch."""
        if not self.is_main:
            return
        first = self.path / names[0]
        atomic_save(ckpt, first)
        for n in names[1:]:
            tmp = self.path / f'.{n}.link-{os.getpid()}'
            try:
                tmp.unlink(missing_ok=True)
                os.link(first, tmp)
                os.replace(tmp, self.path / n)
            except OSError:  # no hard links on this filesystem: a copy
                tmp.unlink(missing_ok=True)
                with open(first, 'rb') as src:
                    atomic_write(self.path / n, lambda f: shutil.copyfileobj(src, f))

    def discard(self, name: str) -> None:
        if self.is_main:
            (self.path / name).unlink(missing_ok=True)
