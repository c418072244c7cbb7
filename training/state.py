"""A run's state on disk: its folder (resolved config, metrics, checkpoints) and what a
checkpoint holds so that a resumed run continues exactly (weights, optimizer, scaler, RNG
states, position in the schedule, the interrupted epoch's statistics).

    runs/<name>/config.yaml      the resolved config
    runs/<name>/metrics.jsonl    one JSON object per finished epoch (rewritten atomically)
    runs/<name>/last.pt          after every epoch; best.pt when test top-1 improved
    runs/<name>/interrupted.pt   after Ctrl-C / SIGTERM mid-epoch (removed at the next epoch end)
    runs/<name>/.lock            locked for the run's life: one writer per folder

A folder has one owner at a time: :meth:`RunFolder.claim` takes an exclusive POSIX lock
(``lockf``: held by this process only, not by the loader workers it forks, which may outlive a
``kill -9`` by seconds) on its
``.lock`` that the kernel drops when the process ends (also on ``kill -9``: a crashed run leaves
nothing stuck), and a second run under the same name stops with one line. A new run never
replaces an earlier run's results: where ``runs/<name>/`` holds them, it writes
``runs/<name>-1/`` (then ``-2``, ...), as timm does.

Every file goes through :func:`model.fileio.atomic_write`: a crash or a full disk never leaves
a half-written file, and the previous checkpoint stays loadable. Checkpoints are written off the
critical path: :func:`training_checkpoint` snapshots the state into host memory (copies, not
views of the live tensors), and :meth:`RunFolder.save` serializes and fsyncs it on a background
thread while training goes on; a save waits for the previous one, and :meth:`RunFolder.wait` (the
end of a run, Ctrl-C, SIGTERM) for the last. A write's error (a full disk) is raised by the next
``save`` or ``wait``: the last complete checkpoint is then still the one on disk.
"""
from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import random
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import RESUME_KEYS, load_checkpoint, make_checkpoint, model_state
from model.errors import UserError
from model.fileio import atomic_write, atomic_write_text, check_writable_dir

from .config import ConfigError, to_dict, to_yaml
from .metrics import read_jsonl
from .optim import hyperparameters

def get_rng_state() -> dict:
    st = {'python': random.getstate(), 'numpy': list(np.random.get_state()),
          'torch': torch.get_rng_state()}
    st['numpy'][1] = torch.from_numpy(st['numpy'][1].copy())  # weights_only-loadable
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st['cuda'] = torch.cuda.get_rng_state()  # this process's device only: resumable elsewhere
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in st['python']))
    kind, keys, *rest = st['numpy']
    np.random.set_state((kind, keys.numpy(), *rest))
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


def training_checkpoint(model, cfg, *, dataset, pos: Position, metrics: dict | None,
                        n_params: int, optimizer, scaler, ema=None) -> dict:
    """A resumable checkpoint: the inference part (``model.checkpoint``) plus optimizer,
    scaler and RNG states and the run's position. With an EMA (``training.ema``), 'model' is the
    averaged model -- the one evaluated, so the metrics describe it, and the one the app and
    export load -- and the raw training weights go to 'raw_model' for resuming."""
    meta = {**(metrics or {}), 'best_top1': pos.best_top1, 'epochs_planned': cfg.training.epochs,
            'params': n_params, 'train_seconds': pos.elapsed_s}
    extra = {} if ema is None else {'raw_model': model_state(model), 'ema': ema.state_dict()}
    return make_checkpoint(
        model if ema is None else ema.module, host=False, model_config=dict(cfg.model),
        dataset=dataset.to_dict(), config=to_dict(cfg),
        epoch=pos.epoch, step=pos.step, metrics=meta, batch=pos.batch, best_top1=pos.best_top1,
        elapsed_s=pos.elapsed_s, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
        rng=get_rng_state(), partial=pos.partial, **extra)


class Snapshot:
    """Copies of a checkpoint's tensors in host memory that stay allocated from one save to the
    next: the weights and momentum buffers in a checkpoint dict are views of the live state, which
    the next step changes while the background thread is still writing them. Reusing the buffers
    makes a snapshot a plain copy (no fresh 90 MB and its page faults each epoch); pinned when the
    source is on a GPU, so the device-to-host copies run asynchronously and are waited for once.
    The caller waits for the previous write before copying again (:meth:`RunFolder.save`)."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def __call__(self, obj):
        self._from_gpu = False
        out = self._copy(obj, ())
        if self._from_gpu:  # the asynchronous device-to-host copies are done before the write
            torch.cuda.synchronize()
        return out

    def _copy(self, obj, key: tuple):
        if isinstance(obj, torch.Tensor):
            obj = obj.detach()
            buf = self.buffers.get(key)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype or buf.stride() != obj.stride():
                # same strides (channels-last weights): the copy is one memcpy
                buf = torch.empty_like(obj, device='cpu', pin_memory=obj.is_cuda)
                self.buffers[key] = buf
            self._from_gpu |= obj.is_cuda
            return buf.copy_(obj, non_blocking=obj.is_cuda)
        if isinstance(obj, dict):
            return {k: self._copy(v, (*key, k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._copy(v, (*key, i)) for i, v in enumerate(obj))
        return obj


def restore(path: str | os.PathLike, *, model, optimizer, scaler, ema=None, dataset=None,
            data_file=None, steps_per_epoch: int | None = None) -> Position:
    """Load ``path`` into the model, optimizer, scaler (and EMA), restore the RNG states;
    returns where the run stopped. An inference-only checkpoint cannot be resumed. A checkpoint
    without an EMA resumed with one starts the average from its weights. ``dataset``: what the
    data files hold (``data_file`` names them): it must be the dataset the run trained on;
    ``steps_per_epoch``: what this data, batch size and world size give: the saved step
    counter and mid-epoch position assume the old ones."""
    ckpt = load_checkpoint(path, map_location='cpu')
    missing = [k for k in RESUME_KEYS if k not in ckpt and k != 'best_top1']  # older files lack it
    if missing:
        raise ConfigError(f'{path}: checkpoint has no {missing[0]} state; it cannot be resumed '
                          f'(inference-only export?)')
    if dataset is not None:
        from ffcv_pipeline.datasets import checkpoint_dataset
        trained = checkpoint_dataset(ckpt)
        if diff := trained.difference(dataset):
            raise ConfigError(f'{data_file}: holds {diff}, but {path} was trained on '
                              f'{trained.describe()}; resume on its files (--data.dataset '
                              f'{trained.name}, or the data.train_path/test_path it used)')
    model.load_state_dict(ckpt.get('raw_model', ckpt['model']))
    if ema is not None:
        ema.load_state_dict(ckpt.get('ema', {'updates': 0}), ckpt['model'])
    settings = hyperparameters(optimizer)  # this run's config (a resume may change LR, decay, ...)
    optimizer.load_state_dict(ckpt['optimizer'])  # momentum buffers, moments; and the old settings:
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
    if ckpt['scaler'] and scaler.is_enabled():  # empty when saved by a bf16/fp32 run
        scaler.load_state_dict(ckpt['scaler'])
    set_rng_state(ckpt['rng'])
    pos = Position(epoch=ckpt['epoch'], batch=ckpt.get('batch', 0), step=ckpt['step'],
                   best_top1=ckpt.get('best_top1', 0.0), elapsed_s=ckpt.get('elapsed_s', 0.0),
                   partial=ckpt.get('partial'))
    if steps_per_epoch is not None and pos.step != pos.epoch * steps_per_epoch + pos.batch:
        raise ConfigError(f'{path}: saved at step {pos.step} = epoch {pos.epoch} x steps/epoch + batch '
                          f'{pos.batch}, but this data, batch size and number of processes give '
                          f'{steps_per_epoch} steps per epoch; resume with the original data and batch size')
    return pos


LOCK_NAME = '.lock'
RESULT_FILES = ('summary.json', 'metrics.jsonl', 'last.pt', 'best.pt', 'interrupted.pt')


class RunFolderBusy(UserError):
    """Another live process is writing the run folder; one line."""


def _try_lock(path: Path) -> tuple[int | None, str]:
    """(fd holding an exclusive lock on ``path/.lock``, '') or (None, what the holder wrote)."""
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no locks here: unguarded
            return fd, ''
        owner = os.read(fd, 200).decode(errors='replace').strip()
        os.close(fd)
        return None, owner
    os.ftruncate(fd, 0)
    os.write(fd, f'pid {os.getpid()} on {os.uname().nodename}\n'.encode())
    return fd, ''


class RunFolder:
    """``runs/<name>/``: only the main process writes (``is_main``); the others keep the path."""

    def __init__(self, path: Path, *, is_main: bool = True, serialize=torch.save):
        self.path, self.is_main = Path(path), is_main
        self.serialize = serialize  # (checkpoint, open temporary file): torch.save
        self.metrics_path = self.path / 'metrics.jsonl'
        self.records: list[dict] = []
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self.snapshot = Snapshot()
        self._lock_fd: int | None = None

    @classmethod
    def claim(cls, path: Path, *, is_main: bool = True, resume: bool = False, log=print,
              serialize=torch.save) -> 'RunFolder':
        """The folder this run writes, locked for its life (see the module docstring): ``path``
        itself when resuming or when it holds no earlier results, else ``path-1``, ``path-2``,
        ... Raises :class:`RunFolderBusy` if a live run holds ``path``, and
        :class:`~model.fileio.NotWritableError` if it cannot be written."""
        path = Path(path)
        if not is_main:
            return cls(path, is_main=False, serialize=serialize)
        for i in itertools.count():
            cand = path if i == 0 else path.with_name(f'{path.name}-{i}')
            check_writable_dir(cand, 'run folder')
            fd, owner = _try_lock(cand)
            if fd is None:
                if i == 0 or resume:
                    raise RunFolderBusy(f'{cand}: another run is writing this folder ({owner or "pid unknown"}); '
                                        f'wait for it to end, or give this run another --output.name')
                continue
            if resume or not (any((cand / n).exists() for n in RESULT_FILES) or any(cand.glob('epoch_*.pt'))):
                break  # resuming, or no earlier run's metrics, summary or checkpoints here
            os.close(fd)  # an earlier run's results: never replaced without being asked
        if cand != path:
            ckpt = next((path / n for n in ('interrupted.pt', 'last.pt') if (path / n).is_file()), None)
            log(f'note: {path} holds an earlier run\'s results; this run writes {cand} (to reuse the '
                f'name, delete that folder' + (f'; to continue that run: --resume {ckpt})' if ckpt else ')'))
        folder = cls(cand, serialize=serialize)
        folder._lock_fd = fd
        return folder

    def close(self) -> None:
        """Release the lock (the kernel also does when the process ends)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def start(self, cfg, *, resumed_epochs: int | None) -> None:
        """Write the resolved config; keep the metrics of the ``resumed_epochs`` epochs a
        resumed run has completed (its later lines are redone), or start them afresh."""
        if not self.is_main:
            return
        atomic_write_text(self.path / 'config.yaml', to_yaml(cfg))  # makes the folder
        # a run killed mid-write (kill -9, the OOM killer) leaves its temporary checkpoint (up to
        # 90 MB); this process holds the folder's lock, so no live writer owns them
        for stale in [*self.path.glob('.*.tmp'), *self.path.glob('.*.link-*')]:
            stale.unlink(missing_ok=True)
        if resumed_epochs is None:
            self.records = []  # claim() gave a folder without earlier results
        else:
            self.records = [r for r in read_jsonl(self.metrics_path) if r.get('epoch', 0) <= resumed_epochs]
            self._write_metrics()

    def add_record(self, record: dict) -> None:
        if self.is_main:
            self.records.append(record)
            self._write_metrics()

    def _write_metrics(self) -> None:
        atomic_write_text(self.metrics_path, ''.join(json.dumps(r) + '\n' for r in self.records))

    def save(self, ckpt: dict, *names: str, wait: bool = False) -> None:
        """Write ``ckpt`` (:func:`training_checkpoint`: views of the live state) as ``names``: once
        the previous write has finished (its error is raised here), snapshot it into host memory,
        then write the snapshot on a background thread; ``wait``: and wait for this one too."""
        if not self.is_main:
            return
        self.wait()
        ckpt = self.snapshot(ckpt)
        self._writer = threading.Thread(target=self._write, args=(ckpt, names),
                                        name=f'checkpoint {names[0]}')  # not a daemon: exit waits
        self._writer.start()
        if wait:
            self.wait()

    def wait(self, *, unless_failing: bool = False) -> None:
        """Until the checkpoint being written is on disk; raises the error its write met --
        ``unless_failing``: not while another error is on its way out (that one says more, and
        the last complete checkpoint is on disk either way)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            if not (unless_failing and sys.exc_info()[1] is not None):
                raise error

    def _write(self, ckpt: dict, names: tuple[str, ...]) -> None:
        """Serialize once (~90 MB for ResNet-18 with momentum), then hard-link the other names
        (on the background thread: an error is raised in the main thread by the next save() or wait())."""
        try:
            first = self.path / names[0]
            atomic_write(first, lambda f: self.serialize(ckpt, f))
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
        except BaseException as e:
            self._error = e

    def discard(self, name: str) -> None:
        if self.is_main:
            (self.path / name).unlink(missing_ok=True)
