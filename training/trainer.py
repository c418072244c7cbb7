"""The training loop: FFCV loaders -> channels-last ResNet under AMP -> metrics, checkpoints.

    python scripts/train.py --config rn18.yaml                 # one GPU (or the CPU)
    torchrun --nproc_per_node 8 scripts/train.py --config rn18.yaml

Read top to bottom: :meth:`Trainer.setup` builds everything, :meth:`Trainer.run` loops over
epochs, :meth:`Trainer.train_epoch` runs one :class:`~training.step.TrainStep` per batch,
:meth:`Trainer.end_epoch` evaluates, logs and checkpoints. What stops a run early (Ctrl-C,
SIGTERM, a NaN loss) lives in ``guards.py``; the run folder and resuming in ``state.py``;
device and precision in ``runtime.py``; what the run logs in ``report.py``; the data wiring
in ``ffcv_pipeline/data.py``.

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
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from model import build_model, count_parameters, use_channels_last
from model.checkpoint import load_checkpoint
from model.fileio import DiskFullError

from . import distributed as D
from . import report
from .budget import TimeBudget
from .config import ROOT, for_data, load_config, resume_config
from .evaluate import evaluate
from .guards import CHECK_EVERY, StopRequest, TrainingDiverged, TrainingInterrupted
from .metrics import EpochStats, summarize
from .runtime import (configure_backends, resolve_device, resolve_precision, seed_everything, sync,
                      workers_per_process)
from .state import Position, RunFolder, restore, training_checkpoint
from .optim import make_optimizer
from .schedule import lr_scales
from .sinks import RunLog, open_runlog
from .step import TrainStep
from .ema import EMA

if TYPE_CHECKING:
    from ffcv_pipeline.data import TrainingData

__all__ = ['Trainer', 'train', 'TrainingDiverged', 'TrainingInterrupted']


class _StopAtBatchBoundary(Exception):
    pass


FIRST_STEPS = 2  # steps timed apart as `first_steps` (cuDNN autotuning, allocator warm-up)


@dataclass
class Trainer:
    cfg: object
    config_name: str = 'config'
    resume: str | None = None
    log: Callable[[str], None] = print  # the console sink's output
    info: D.DistInfo = field(default_factory=D.dist_from_env)
    budget: TimeBudget = field(default_factory=TimeBudget)  # the clock runs from process start
    sinks: list = field(default_factory=list)  # more run-log sinks (beside console, JSONL, output.*)
    save_checkpoint: Callable = torch.save  # (checkpoint, open temporary file): how it is written

    # What setup() builds, in this order; None (or zero) until then.
    run_dir: RunFolder | None = field(default=None, init=False)
    device: torch.device | None = field(default=None, init=False)
    dtype: torch.dtype | None = field(default=None, init=False)
    workers: int = field(default=0, init=False)  # loader workers per process
    data: TrainingData | None = field(default=None, init=False)
    model: torch.nn.Module | None = field(default=None, init=False)  # bare: no DDP, no compile
    layout: str = field(default='', init=False)
    n_params: int = field(default=0, init=False)
    ema: EMA | None = field(default=None, init=False)
    lr_scale: np.ndarray | None = field(default=None, init=False)  # x each group's peak LR, per step
    eval_net: torch.nn.Module | None = field(default=None, init=False)  # compiled, without DDP
    ema_net: torch.nn.Module | None = field(default=None, init=False)
    train_step: TrainStep | None = field(default=None, init=False)
    start: Position = field(default_factory=Position, init=False)  # where a resumed run begins
    step: int = field(default=0, init=False)  # optimizer steps taken
    best_top1: float = field(default=0.0, init=False)
    stop: StopRequest = field(default_factory=StopRequest, init=False)
    runlog: RunLog = field(default_factory=lambda: RunLog([]), init=False)
    _timed_first_steps: bool = field(default=False, init=False)

    # ---- set-up -----------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, tc, b = self.cfg, self.cfg.training, self.budget
        with b.span('model_build'):  # first: an unwritable or busy run folder stops before anything is built
            name = cfg.output.name or f'{self.config_name}-{_dt.datetime.now():%Y%m%d-%H%M%S}'
            path = Path(self.resume).resolve().parent if self.resume else ROOT / cfg.output.dir / name
            self.run_dir = RunFolder.claim(path, is_main=self.info.is_main, resume=bool(self.resume),
                                           log=self.log, serialize=self.save_checkpoint)
        with b.span('device_init'):
            self.device = resolve_device(tc.device, self.info)
            D.init(self.info, self.device)
            self.dtype = resolve_precision(tc.precision, self.device)
            seed_everything(tc.seed)
            configure_backends(deterministic=tc.deterministic)
            self.workers = workers_per_process(cfg.data.num_workers)
            channels_last = use_channels_last(cfg.model, self.device)
        with b.span('data_open'):
            from ffcv_pipeline.data import build_data  # numba with the augmentation ops: ~0.1 s
            self.data = build_data(cfg, device=self.device, dtype=self.dtype, root=ROOT,
                                   workers=self.workers, channels_last=channels_last,
                                   rank=self.info.rank, world_size=self.info.world_size)
            self.cfg = cfg = for_data(cfg, self.data)  # the values the data decided, checked
        with b.span('model_build'):
            self._build_model(channels_last)
        with b.span('logging'):  # an optional sink's import (tensorboard: seconds) counts here
            self.runlog = open_runlog(cfg, self.run_dir, console=self.log, extra=self.sinks, is_main=self.info.is_main,
                                      resumed_at=self.start.step if self.resume else None)

    def _build_model(self, channels_last: bool) -> None:
        """Model, optimizer, schedule, step, resumed state and the run folder."""
        cfg, tc, m = self.cfg, self.cfg.training, self.cfg.model
        self.model = build_model(m, device=self.device)
        self.layout = 'channels-last' if channels_last else 'NCHW'
        self.n_params = count_parameters(self.model)
        optimizer = make_optimizer(self.model, tc, eager=not (tc.compile or tc.cuda_graph))
        self.ema = EMA(self.model, tc.ema, every=tc.ema_every) if tc.ema else None  # evaluated, exported
        self.lr_scale = lr_scales(tc, len(self.data.train))  # x each group's peak LR, per step
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
                                 scaler=self.train_step.scaler, ema=self.ema, dataset=self.data.dataset,
                                 data_file=self.data.paths[0], steps_per_epoch=len(self.data.train))
        self.step, self.best_top1 = self.start.step, self.start.best_top1
        self.run_dir.start(cfg, resumed_epochs=self.start.epoch if self.resume else None)

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> dict:
        """Set up (unless :meth:`setup` ran already), train, finish; the summary (rank 0)."""
        try:
            if self.train_step is None:
                self.setup()
            return self._run()
        finally:  # a checkpoint in flight is complete on disk before the run ends, however
            if self.run_dir is not None:  # it ends (Ctrl-C, SIGTERM, an error)
                self.run_dir.wait(unless_failing=True)
                self.run_dir.close()  # the folder's lock
            if self.data is not None:  # the torchvision loader's worker processes end now
                self.data.close()
            self.runlog.close()

    def _run(self) -> dict:
        cfg, main = self.cfg, self.info.is_main
        for line in report.start_lines(self):
            self.runlog.line(line)
        with self.budget.span('loader_warmup'):
            jit_s = self.data.warm_up()
        setup_s = self.budget.elapsed()
        what = 'FFCV/numba JIT compilation' if self.data.loader == 'ffcv' else 'loader workers starting'
        self.runlog.line(f'set-up {setup_s:.1f} s, of which {what} {jit_s:.1f} s')
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
        """One optimizer step per batch; the LR schedule is an array of multipliers indexed by step."""
        self.train_step.net.train()
        bar = report.progress_bar(self, epoch)
        t0, wait0, first = time.perf_counter(), stats.wait_s, 0.0
        try:
            for n, (b, (x, y)) in enumerate(self.batches(epoch, stats), 1):
                loss, logits = self.train_step(x, y, self.lr_scale[self.step])
                self.step += 1
                if self.ema:
                    self.ema.update(self.model, self.step)
                if self.runlog.wants_steps:  # host floats only: no sync
                    self.runlog.step(self.step, self.train_step.lrs(self.lr_scale[self.step - 1]))
                stats.add(loss, logits, y)
                bar.update(1)
                if n == FIRST_STEPS and not self._timed_first_steps:  # once per process: cuDNN
                    sync(self.device)  # autotunes, the allocator grows, in these steps
                    first = time.perf_counter() - t0 - (stats.wait_s - wait0)
                    self.budget.add('first_steps', first)
                    self._timed_first_steps = True
                if (b + 1) % CHECK_EVERY == 0 or b + 1 == len(self.data.train):
                    report.check_progress(self, stats, epoch, b, bar, time.perf_counter() - t0)
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
        evaluated = (epoch + 1) % cfg.training.eval_every == 0 or last
        top1, top5, eval_s, n_test = self.evaluate() if evaluated else (None, None, 0.0, 0)
        self.budget.add('evaluation', eval_s)
        wallclock, raw_top1 = self._elapsed(), None  # the clock before the raw model's evaluation:
        if self.ema and last:  # did the average pay? (not on the time to target; an evaluation)
            raw_top1, _, raw_s, _ = self.evaluate(raw=True)
            self.budget.add('evaluation', raw_s)
        t_log = time.perf_counter()
        lr = cfg.training.lr * float(self.lr_scale[self.step - 1])  # training.lr's groups, last step
        record = report.epoch_record(epoch + 1, lr=lr, totals=tot, top1=top1, top5=top5,
                                     seconds=stats.seconds, wait_s=stats.wait_s, eval_s=eval_s,
                                     test_images=n_test, wallclock_s=wallclock)
        if raw_top1 is not None:
            record['test_top1_raw'] = raw_top1
        improved = top1 is not None and top1 > self.best_top1
        self.best_top1 = max(self.best_top1, top1 or 0.0)
        if not self.info.is_main:
            return
        self.runlog.epoch(self.step, record)  # metrics.jsonl, the console line, ...
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
        summary = summarize(records, target=cfg.training.target_top1, **report.run_facts(
            self, total_s=self._elapsed(), setup_s=setup_s, jit_s=jit_s))
        if cfg.output.plot and records:  # with the budget so far (the plot's own time goes to `end`)
            report.plot_run(records, summary, self.run_dir.path / 'curves.png', budget=self.budget.report(),
                            log=self.runlog.line)
        self.budget.add('end', time.perf_counter() - t_end)
        summary['time_budget'] = self.budget.report()
        self.runlog.summary(self.step, summary)  # summary.json, the last lines, ...
        return summary

    # ---- helpers ------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        """Wall-clock seconds of this run since its (first) process started."""
        return self.start.elapsed_s + self.budget.elapsed()

    def _checkpoint(self, epoch: int, *, batch: int = 0, metrics: dict | None = None,
                    partial: dict | None = None) -> dict:
        pos = replace(self.start, epoch=epoch, batch=batch, step=self.step, best_top1=self.best_top1,
                      elapsed_s=self._elapsed(), partial=partial)
        return training_checkpoint(self.model, self.cfg, dataset=self.data.dataset, pos=pos, metrics=metrics,
                                   n_params=self.n_params, optimizer=self.train_step.optimizer,
                                   scaler=self.train_step.scaler, ema=self.ema)

    def _save_interrupted(self, epoch: int, stats: EpochStats, seconds: float):
        sync(self.device)
        stats.seconds += seconds
        batch = self.step - epoch * len(self.data.train)  # every epoch has len() steps (drop_last)
        self.run_dir.save(self._checkpoint(epoch, batch=batch, partial=stats.reduced()), 'interrupted.pt',
                          wait=True)
        raise TrainingInterrupted(self.run_dir.path / 'interrupted.pt')


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
        last = trainer.run_dir.path / 'last.pt' if trainer.run_dir is not None else None
        if last is None or not last.is_file():
            raise
        raise e.with_hint(f'free some space, then resume with: python scripts/train.py --resume {last}') from None
    finally:
        D.shutdown()
