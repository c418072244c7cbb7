"""The training loop: FFCV loaders -> channels-last ResNet under AMP -> metrics, checkpoints.

    python scripts/train.py --config rn18.yaml                 # one GPU (or the CPU)
    torchrun --nproc_per_node 8 scripts/train.py --config rn18.yaml

Read top to bottom: :meth:`Trainer.setup` builds everything, :meth:`Trainer.run` loops over
epochs, :meth:`Trainer.train_epoch` runs one :class:`~training.step.TrainStep` per batch,
:meth:`Trainer.end_epoch` evaluates, logs and checkpoints. What stops a run early (Ctrl-C,
SIGTERM, a NaN loss) lives in ``guards.py``; the run folder and resuming in ``state.py``;
device and precision in ``runtime.py``; the data wiring in ``ffcv_pipeline/data.py``.

Data order and augmentation are functions of (seed, epoch), and checkpoints carry everything
else (weights, optimizer, scaler, step, RNG states), so a resumed run -- even one interrupted
mid-epoch -- continues with the same batches and, on the CPU (or with
``training.deterministic``), the same weights as an uninterrupted one.
"""
from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ffcv_pipeline import ffcv_version
from model import build_model, count_parameters, use_channels_last
from model.checkpoint import load_checkpoint
from model.fileio import DiskFullError

from . import distributed as D
from .budget import TimeBudget, format_budget
from .config import ROOT, ConfigError, load_config, resume_config
from .evaluate import evaluate
from .guards import CHECK_EVERY, StopRequest, TrainingDiverged, TrainingInterrupted, check_finite
from .metrics import EpochStats, plot_curves, summarize, write_json
from .runtime import (configure_backends, device_name, dtype_name, resolve_device,
                      resolve_precision, seed_everything, sync, workers_per_process)
from .state import Position, RunFolder, restore, training_checkpoint
from .step import TrainStep, lr_schedule, make_optimizer
from .ema import EMA

__all__ = ['Trainer', 'train', 'TrainingDiverged', 'TrainingInterrupted']


class _StopAtBatchBoundary(Exception):
    pass


FIRST_STEPS = 2  # steps timed apart as `first_steps` (cuDNN autotuning, allocator warm-up)


@dataclass
class Trainer:
    cfg: object
    config_name: str = 'config'
    resume: str | None = None
    log: callable = print
    info: D.DistInfo = field(default_factory=D.dist_from_env)
    budget: TimeBudget = field(default_factory=TimeBudget)  # the clock runs from process start
    _timed_first_steps: bool = field(default=False, init=False)

    # ---- set-up -----------------------------------------------------------------------------
    def setup(self) -> None:
        from ffcv_pipeline.data import build_data
        cfg, tc, b = self.cfg, self.cfg.training, self.budget
        with b.span('model_build'):  # first: an unwritable or busy run folder stops before anything is built
            name = cfg.output.name or f'{self.config_name}-{_dt.datetime.now():%Y%m%d-%H%M%S}'
            path = Path(self.resume).resolve().parent if self.resume else ROOT / cfg.output.dir / name
            self.run_dir = RunFolder.claim(path, is_main=self.info.is_main, resume=bool(self.resume),
                                           log=self.log)
        with b.span('device_init'):
            self.device = resolve_device(tc.device, self.info)
            D.init(self.info, self.device)
            self.dtype = resolve_precision(tc.precision, self.device)
            seed_everything(tc.seed)
            configure_backends(deterministic=tc.deterministic)
            self.workers = workers_per_process(cfg.data.num_workers)
            channels_last = use_channels_last(cfg.model, self.device)
        with b.span('data_open'):
            self.data = build_data(cfg, device=self.device, dtype=self.dtype, root=ROOT,
                                   workers=self.workers, channels_last=channels_last,
                                   rank=self.info.rank, world_size=self.info.world_size)
        if len(self.data.train) == 0:
            raise ConfigError(f'data.batch_size {cfg.data.batch_size} exceeds the '
                              f'{self.data.train.num_samples} training images per process')
        with b.span('model_build'):
            self._build_model(channels_last)

    def _build_model(self, channels_last: bool) -> None:
        """Model, optimizer, schedule, step, resumed state and the run folder."""
        cfg, tc, m = self.cfg, self.cfg.training, self.cfg.model
        self.model = build_model(m, device=self.device)
        self.layout = 'channels-last' if channels_last else 'NCHW'
        self.n_params = count_parameters(self.model)
        optimizer = make_optimizer(self.model, tc, self.device, eager=not (tc.compile or tc.cuda_graph))
        self.ema = EMA(self.model, tc.ema, every=tc.ema_every) if tc.ema else None  # evaluated, exported
        self.lrs = lr_schedule(lr=tc.lr, epochs=tc.epochs, iters_per_epoch=len(self.data.train),
                               warmup_epochs=tc.warmup_epochs, kind=tc.lr_schedule)
        # eval_net: the (compiled) model without DDP. DDP syncs buffers before every forward, so
        # evaluating through it would need the same number of batches on every rank.
        self.eval_net = torch.compile(self.model, mode=tc.compile_mode) if tc.compile else self.model
        self.ema_net = self.ema and (torch.compile(self.ema.module, mode=tc.compile_mode) if tc.compile else self.ema.module)
        net = self.eval_net
        if self.info.enabled:
            net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == 'cuda' else None)
        self.train_step = TrainStep(net, optimizer, device=self.device, dtype=self.dtype,
                                    label_smoothing=tc.label_smoothing, grad_clip=tc.grad_clip,
                                    cuda_graph=tc.cuda_graph)
        self.start = Position()
        if self.resume:
            self.start = restore(self.resume, model=self.model, optimizer=optimizer,
                                 scaler=self.train_step.scaler, ema=self.ema)
            # the saved step counter and mid-epoch position assume the old steps per epoch
            # (a changed data set, batch size or number of processes would break them)
            if self.start.step != self.start.epoch * len(self.data.train) + self.start.batch:
                raise ConfigError(
                    f'{self.resume}: saved at step {self.start.step} = epoch {self.start.epoch} x '
                    f'steps/epoch + batch {self.start.batch}, but this data, batch size and number of '
                    f'processes give {len(self.data.train)} steps per epoch; resume with the original '
                    f'data and batch size')
        self.step, self.best_top1 = self.start.step, self.start.best_top1
        self.stop = StopRequest()
        self.run_dir.start(cfg, resumed_epochs=self.start.epoch if self.resume else None)

    def warmup_jit(self) -> float:
        """Compile the FFCV pipelines (numba; the resident test split has none) before timing
        epochs; returns seconds."""
        t = time.perf_counter()
        for loader in (self.data.train, self.data.test):
            for _ in loader.epoch(0):
                break  # closing the iterator joins its thread before the next loader starts
        return time.perf_counter() - t

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            self.setup()
            return self._run()
        finally:  # a checkpoint in flight is complete on disk before the run ends, however
            if hasattr(self, 'run_dir'):  # it ends (Ctrl-C, SIGTERM, an error)
                self._wait_for_checkpoint()
                self.run_dir.close()  # the folder's lock
            if hasattr(self, 'data'):  # the torchvision loader's worker processes end now
                self.data.close()

    def _wait_for_checkpoint(self) -> None:
        """Join the background write; its error is raised unless another one is on its way out
        (that one says more: the last complete checkpoint is on disk either way)."""
        import sys
        pending = sys.exc_info()[1]
        try:
            self.run_dir.wait()
        except BaseException:
            if pending is None:
                raise

    def _run(self) -> dict:
        cfg, main = self.cfg, self.info.is_main
        if main:
            self._log_start()
        with self.budget.span('loader_warmup'):
            jit_s = self.warmup_jit()
        setup_s = self.budget.elapsed()
        if main:
            what = 'FFCV/numba JIT compilation' if self.data.loader == 'ffcv' else 'loader workers starting'
            self.log(f'set-up {setup_s:.1f} s, of which {what} {jit_s:.1f} s')
        for epoch in range(self.start.epoch, cfg.training.epochs):
            first = epoch == self.start.epoch
            stats = EpochStats.start(self.device, self.start.partial if first else None, is_main=main)
            with self.stop:
                self.train_epoch(epoch, stats)  # a stop request in here saves interrupted.pt
                self.end_epoch(epoch, stats)
            if self.stop.agreed(self.device):  # during evaluation or saving: last.pt is complete
                self.run_dir.wait()
                raise TrainingInterrupted(self.run_dir.path / 'last.pt')
        return self.finish(jit_s, setup_s)

    def train_epoch(self, epoch: int, stats: EpochStats) -> None:
        """One optimizer step per batch; the LR schedule is an array indexed by step."""
        self.train_step.net.train()
        bar = self._progress_bar(epoch)
        t0, wait0, first, n = time.perf_counter(), stats.wait_s, 0.0, 0
        try:
            for b, (x, y) in self.batches(epoch, stats):
                loss, logits = self.train_step(x, y, self.lrs[self.step])
                self.step += 1
                if self.ema:
                    self.ema.update(self.model, self.step)
                stats.add(loss, logits, y)
                bar.update(1)
                n += 1
                if n == FIRST_STEPS and not self._timed_first_steps:  # once per process: cuDNN
                    sync(self.device)  # autotunes, the allocator grows, in these steps
                    first = time.perf_counter() - t0 - (stats.wait_s - wait0)
                    self.budget.add('first_steps', first)
                    self._timed_first_steps = True
                if (b + 1) % CHECK_EVERY == 0 or b + 1 == len(self.data.train):
                    self._check_progress(stats, epoch, b, bar, time.perf_counter() - t0)
        except _StopAtBatchBoundary:
            self._save_interrupted(epoch, stats, time.perf_counter() - t0)
        finally:
            bar.close()
            sync(self.device)
            seconds, waited = time.perf_counter() - t0, stats.wait_s - wait0
            self.budget.add('data_wait', waited)
            self.budget.add('train_steps', seconds - waited - first)
        stats.seconds += seconds

    def batches(self, epoch: int, stats: EpochStats):
        """(index, (x, y)) of ``epoch``, less the batches a resumed run already trained on;
        raises ``_StopAtBatchBoundary`` at the first batch boundary after a stop request. The
        time spent waiting for each batch goes to ``stats.wait_s`` (is the loader keeping up?)."""
        skip = self.start.batch if epoch == self.start.epoch else 0
        it = enumerate(self.data.train.epoch(epoch))
        while True:
            t = time.perf_counter()
            b, batch = next(it, (None, None))
            stats.wait_s += time.perf_counter() - t
            if b is None:
                return
            if b < skip:
                continue
            if (self.stop.requested if not self.info.enabled else
                    b % CHECK_EVERY == 0 and self.stop.agreed(self.device)):
                raise _StopAtBatchBoundary
            yield b, batch

    def evaluate(self, raw: bool = False) -> tuple[float, float, float, int]:
        """(top-1, top-5, seconds, images) on the test set (all ranks), with the configured TTA
        views, of the EMA model when ``training.ema`` is on (``raw``: of the trained model)."""
        t0 = time.perf_counter()
        ema = self.ema is not None and not raw
        D.broadcast_buffers(self.ema.module if ema else self.model)  # BatchNorm statistics: rank 0's, as DDP trains with
        tc = self.cfg.training
        sums = evaluate(self.ema_net if ema else self.eval_net, self.data.test, device=self.device,
                        dtype=self.dtype, tta_flip=tc.tta, tta_translate=tc.tta_translate)
        top1, top5, n = D.all_reduce_sum(sums).tolist()
        return top1 / n, top5 / n, time.perf_counter() - t0, int(n)

    def end_epoch(self, epoch: int, stats: EpochStats) -> None:
        """Reduce metrics over ranks, evaluate, log, checkpoint."""
        cfg = self.cfg
        tot = stats.reduced()
        last = epoch + 1 == cfg.training.epochs
        top1 = top5 = None
        eval_s, n_test = 0.0, 0
        if (epoch + 1) % cfg.training.eval_every == 0 or last:
            top1, top5, eval_s, n_test = self.evaluate()
            self.budget.add('evaluation', eval_s)
        t_log = time.perf_counter()
        record = {
            'epoch': epoch + 1, 'lr': float(self.lrs[self.step - 1]),
            'train_loss': tot['loss_sum'] / tot['seen'], 'train_acc': tot['correct'] / tot['seen'],
            'test_top1': top1, 'test_top5': top5,
            'epoch_seconds': round(stats.seconds, 4), 'eval_seconds': round(eval_s, 4),
            'data_wait_fraction': round(stats.wait_s / stats.seconds, 5),
            'train_images_per_s': round(tot['seen'] / stats.seconds, 1),
            'train_images': tot['seen'], 'test_images': n_test,
            'wallclock_s': round(self._elapsed(), 3),
        }
        if self.ema and last:  # did the average pay? (after the clock reading: not on the time to target)
            record['test_top1_raw'] = self.evaluate(raw=True)[0]
        improved = top1 is not None and top1 > self.best_top1
        self.best_top1 = max(self.best_top1, top1 or 0.0)
        if not self.info.is_main:
            return
        self.run_dir.add_record(record)
        t1 = f'{top1:.4f}' if top1 is not None else '-'
        self.log(f'epoch {epoch + 1:3d}/{cfg.training.epochs}  lr {record["lr"]:.4f}  '
                 f'loss {record["train_loss"]:.4f}  train {record["train_acc"]:.4f}  '
                 f'test top-1 {t1}  {record["train_images_per_s"]:,.0f} img/s  '
                 f'{stats.seconds:.1f}+{eval_s:.1f} s  [{record["wallclock_s"]:.1f} s]')
        self.budget.add('logging', time.perf_counter() - t_log)
        names = ['last.pt'] + (['best.pt'] if improved else [])
        if cfg.output.save_every and (epoch + 1) % cfg.output.save_every == 0:
            names.append(f'epoch_{epoch + 1:03d}.pt')
        with self.budget.span('checkpointing'):  # a snapshot; the write runs in the background
            self.run_dir.save(self._checkpoint(epoch + 1, metrics={'test_top1': top1, 'test_top5': top5}),
                              *names)
            self.run_dir.discard('interrupted.pt')

    def finish(self, jit_s: float, setup_s: float) -> dict:
        if not self.info.is_main:
            return {}
        t_end = time.perf_counter()
        self.run_dir.wait()  # the last checkpoint is on disk (a full disk surfaces here)
        cfg, records = self.cfg, self.run_dir.records
        summary = summarize(
            records, target=cfg.training.target_top1, config=self.config_name,
            run_dir=str(self.run_dir.path), total_seconds=round(self._elapsed(), 3),
            setup_seconds=round(setup_s, 3), loader_warmup_seconds=round(jit_s, 3),
            numba_compile_seconds=round(jit_s, 3) if self.data.loader == 'ffcv' else None,
            epochs=cfg.training.epochs, world_size=self.info.world_size,
            device=device_name(self.device),
            gpu=device_name(self.device) if self.device.type == 'cuda' else None,
            precision=dtype_name(self.dtype), params=self.n_params, loader=self.data.loader,
            torch_version=str(torch.__version__), ffcv_version=ffcv_version() if self.data.loader == 'ffcv' else None)
        if cfg.output.plot and records:
            best = summary['best_top1']
            try:  # the budget so far (the plot's own time goes to `end` after it)
                plot_curves(records, self.run_dir.path / 'curves.png', target=cfg.training.target_top1,
                            title=self.config_name + (f': best top-1 {best:.4f}' if best is not None else ''),
                            budget=self.budget.report())
            except ImportError as e:  # a bare GPU host without matplotlib: the figures are in the JSON
                self.log(f'note: no curves.png ({e})')
        self.budget.add('end', time.perf_counter() - t_end)
        summary['time_budget'] = self.budget.report()
        write_json(self.run_dir.path / 'summary.json', summary)
        fmt = (lambda v: 'n/a' if v is None else f'{v:.4f}')
        tt, target = summary['time_to_target_s'], cfg.training.target_top1
        reached = (f'reached {target:.0%} at {tt:.1f} s (epoch {summary["epoch_reached_target"]})'
                   if tt is not None else f'did not reach {target:.0%}')
        self.log(f'done: best top-1 {fmt(summary["best_top1"])}, final {fmt(summary["final_top1"])}, '
                 f'{reached}; total {summary["total_seconds"]:.1f} s; {self.run_dir.path}/summary.json')
        self.log(f'time budget: {format_budget(summary["time_budget"])}')
        return summary

    # ---- helpers ------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        """Wall-clock seconds of this run since its (first) process started."""
        return self.start.elapsed_s + self.budget.elapsed()

    def _checkpoint(self, epoch: int, *, batch: int = 0, metrics: dict | None = None,
                    partial: dict | None = None) -> dict:
        pos = replace(self.start, epoch=epoch, batch=batch, step=self.step, best_top1=self.best_top1,
                      elapsed_s=self._elapsed(), partial=partial)
        return training_checkpoint(self.model, self.cfg, class_names=self.data.class_names,
                                   coarse_names=self.data.coarse_names, pos=pos, metrics=metrics,
                                   n_params=self.n_params, optimizer=self.train_step.optimizer,
                                   scaler=self.train_step.scaler, ema=self.ema)

    def _save_interrupted(self, epoch: int, stats: EpochStats, seconds: float):
        sync(self.device)
        stats.seconds += seconds
        batch = self.step - epoch * len(self.data.train)  # every epoch has len() steps (drop_last)
        self.run_dir.save(self._checkpoint(epoch, batch=batch, partial=stats.reduced()), 'interrupted.pt',
                          wait=True)
        raise TrainingInterrupted(self.run_dir.path / 'interrupted.pt')

    def _check_progress(self, stats: EpochStats, epoch: int, b: int, bar, seconds: float) -> None:
        """Every few steps: stop on a NaN/inf loss; update the progress bar."""
        check_finite(stats.loss_sum, where=f'epoch {epoch + 1}, batch {b + 1} (step {self.step})',
                     hint=lambda: self._diverged_hint(epoch))
        if not bar.disable:
            bar.set_postfix(img_s=f'{stats.seen / (seconds + stats.seconds):.0f}',
                            loss=f'{(stats.loss_sum / stats.seen).item():.3f}')

    def _diverged_hint(self, epoch: int) -> str:
        """What is really on disk: the last good checkpoint, or that there is none yet."""
        lower = f'--training.lr lower than {self.cfg.training.lr}'
        last = self.run_dir.path / 'last.pt'
        if not last.is_file():
            return (f'no checkpoint was written ({self.run_dir.path} has none: the loss diverged before '
                    f'the first epoch ended); start again with a {lower}')
        return (f'the last good checkpoint is {last} (after epoch {epoch}); resume from it with '
                f'a {lower}: python scripts/train.py --resume {last} --training.lr LR')

    def _progress_bar(self, epoch: int):
        import sys
        from tqdm import tqdm
        mode = self.cfg.output.progress
        show = self.info.is_main and (sys.stderr.isatty() if mode is None else mode)
        n = len(self.data.train)
        return tqdm(total=n, initial=self.start.batch if epoch == self.start.epoch else 0,
                    desc=f'epoch {epoch + 1}/{self.cfg.training.epochs}', unit='batch',
                    disable=not show, leave=False, dynamic_ncols=True)

    def _log_start(self) -> None:
        cfg, d = self.cfg, self.data
        if self.resume:
            self.log(f'resuming {self.resume} at {self.start.describe()}')
        for notice in d.notices:
            self.log(notice)
        self.log(f'{cfg.model.arch} ({self.n_params:,} parameters) on {self.device} '
                 f'[{dtype_name(self.dtype)}, {self.layout}, world size {self.info.world_size}], '
                 f'{len(d.train) * cfg.data.batch_size:,} training images/process, batch '
                 f'{cfg.data.batch_size}, {len(d.train)} steps/epoch, {d.loader} loader with '
                 f'{self.workers} workers; run folder {self.run_dir.path}')
        if self.device.type == 'cpu' and self.n_params > 5_000_000 and d.train.num_samples > 10_000:
            self.log('note: training a full-size model on the CPU (no GPU found): expect ~50 images/s '
                     'on 2 cores, ~15 min per CIFAR-100 epoch. For a quick check use '
                     '--config cpu_small.yaml')


def train(config: str | None, overrides: list[str] | None = None, resume: str | None = None,
          log=print) -> dict:
    """Load the config (or the resumed checkpoint's) and run; returns the summary (rank 0)."""
    if resume:
        cfg = resume_config(load_checkpoint(resume)['config'], overrides, log=log)
        name = Path(resume).resolve().parent.name
    else:
        cfg = load_config(config, overrides)
        name = Path(config).stem if config else 'default'
    trainer = Trainer(cfg, config_name=name, resume=resume, log=log)
    try:
        return trainer.run()
    except DiskFullError as e:  # the last complete checkpoint is intact: say how to go on
        last = trainer.run_dir.path / 'last.pt' if hasattr(trainer, 'run_dir') else None
        if last is None or not last.is_file():
            raise
        raise e.with_hint(f'free some space, then resume with: python scripts/train.py --resume {last}') from None
    finally:
        D.shutdown()
