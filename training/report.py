"""What a training run tells its user: the start line, the progress bar, the per-epoch line,
the end lines, and the hint when the loss diverges. Pure functions of the run's state, so the
trainer's loop stays readable and a change of wording is one place.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .budget import format_budget
from .runtime import dtype_name


def start_lines(t) -> list[str]:
    """The lines a run opens with (``t``: the trainer after set-up): resuming from where, the
    data notices, what trains on what."""
    cfg, data, device = t.cfg, t.data, t.device
    lines = ([f'resuming {t.resume} at {t.start.describe()}'] if t.resume else []) + list(data.notices)
    steps = len(data.train)
    lines.append(f'{data.dataset.describe()}: {cfg.model.arch} ({t.n_params:,} parameters) on {device} '
                 f'[{dtype_name(t.dtype)}, {t.layout}, world size {t.info.world_size}], '
                 f'{steps * cfg.data.batch_size:,} training images/process, batch '
                 f'{cfg.data.batch_size}, {steps} steps/epoch, {data.loader} loader with '
                 f'{t.workers} workers; run folder {t.run_dir.path}')
    if device.type == 'cpu' and t.n_params > 5_000_000 and data.train.num_samples > 10_000:
        lines.append('note: training a full-size model on the CPU (no GPU found): expect ~50 images/s '
                     'on 2 cores, ~15 min per 50,000 images. For a quick check use '
                     '--config cpu_small.yaml')
    return lines


def progress_bar(t, epoch: int):
    """A tqdm bar over the epoch's batches of trainer ``t``, on rank 0; ``output.progress`` null:
    only on a terminal."""
    from tqdm import tqdm
    mode = t.cfg.output.progress
    show = t.info.is_main and (sys.stderr.isatty() if mode is None else mode)
    return tqdm(total=len(t.data.train), initial=t.start.batch if epoch == t.start.epoch else 0,
                desc=f'epoch {epoch + 1}/{t.cfg.training.epochs}', unit='batch', disable=not show,
                leave=False, dynamic_ncols=True)


def check_progress(t, stats, epoch: int, b: int, bar, seconds: float) -> None:
    """Every few steps of trainer ``t``: stop on a NaN/inf loss (``guards.check_finite``, with
    the divergence hint); the running loss to the progress bar and the step sinks (the check
    has synchronized already)."""
    from .guards import check_finite
    total = check_finite(stats.loss_sum, where=f'epoch {epoch + 1}, batch {b + 1} (step {t.step})',
                         hint=lambda: diverged_hint(t.run_dir.path, lr=t.cfg.training.lr, epoch=epoch))
    loss, img_s = total / (stats.seen * t.info.world_size), stats.seen / (seconds + stats.seconds)
    if not bar.disable:
        bar.set_postfix(img_s=f'{img_s:.0f}', loss=f'{loss:.3f}')
    if t.runlog.wants_steps:
        t.runlog.step(t.step, {'train_loss': loss, 'train_images_per_s': img_s})


def epoch_record(epoch: int, *, lr: float, totals: dict, top1, top5, seconds: float, wait_s: float,
                 eval_s: float, test_images: int, wallclock_s: float) -> dict:
    """One line of ``metrics.jsonl``: ``epoch`` counts from 1; ``top1``/``top5`` None when the
    epoch was not evaluated; ``seconds`` the epoch's training loop, of which ``wait_s`` waiting
    for data."""
    seen = totals['seen']
    return {
        'epoch': epoch, 'lr': lr,
        'train_loss': totals['loss_sum'] / seen, 'train_acc': totals['correct'] / seen,
        'test_top1': top1, 'test_top5': top5,
        'epoch_seconds': round(seconds, 4), 'eval_seconds': round(eval_s, 4),
        'data_wait_fraction': round(wait_s / seconds, 5),
        'train_images_per_s': round(seen / seconds, 1),
        'train_images': seen, 'test_images': test_images,
        'wallclock_s': round(wallclock_s, 3),
    }


def epoch_line(record: dict, *, epochs: int) -> str:
    """The log line of one :func:`epoch_record`."""
    t1 = '-' if record['test_top1'] is None else f'{record["test_top1"]:.4f}'
    return (f'epoch {record["epoch"]:3d}/{epochs}  lr {record["lr"]:.4f}  '
            f'loss {record["train_loss"]:.4f}  train {record["train_acc"]:.4f}  '
            f'test top-1 {t1}  {record["train_images_per_s"]:,.0f} img/s  '
            f'{record["epoch_seconds"]:.1f}+{record["eval_seconds"]:.1f} s  [{record["wallclock_s"]:.1f} s]')


def run_facts(trainer, *, total_s: float, setup_s: float, jit_s: float) -> dict:
    """What the summary says about the run besides its records: where, on what, how long."""
    import torch
    from ffcv_pipeline import ffcv_version
    from .runtime import device_name
    ffcv, dev = trainer.data.loader == 'ffcv', trainer.device
    return dict(config=trainer.config_name, run_dir=str(trainer.run_dir.path), total_seconds=round(total_s, 3),
                setup_seconds=round(setup_s, 3), loader_warmup_seconds=round(jit_s, 3),
                numba_compile_seconds=round(jit_s, 3) if ffcv else None, epochs=trainer.cfg.training.epochs,
                world_size=trainer.info.world_size, device=device_name(dev),
                gpu=device_name(dev) if dev.type == 'cuda' else None, precision=dtype_name(trainer.dtype),
                params=trainer.n_params, loader=trainer.data.loader, torch_version=str(torch.__version__),
                ffcv_version=ffcv_version() if ffcv else None)


def done_lines(summary: dict) -> list[str]:
    """The run's last two lines: the result against the target, and where the time went."""
    fmt = (lambda v: 'n/a' if v is None else f'{v:.4f}')
    tt, target = summary['time_to_target_s'], summary['target_top1']
    reached = (f'reached {target:.0%} at {tt:.1f} s (epoch {summary["epoch_reached_target"]})'
               if tt is not None else f'did not reach {target:.0%}')
    return [f'done: best top-1 {fmt(summary["best_top1"])}, final {fmt(summary["final_top1"])}, '
            f'{reached}; total {summary["total_seconds"]:.1f} s; {summary["run_dir"]}/summary.json',
            f'time budget: {format_budget(summary["time_budget"])}']


def plot_run(records: list[dict], summary: dict, path: Path, *, budget: dict, log) -> None:
    """``curves.png``; on a bare GPU host without matplotlib, one note (the figures are in the JSON)."""
    from .metrics import plot_curves
    best = summary['best_top1']
    try:
        plot_curves(records, path, target=summary['target_top1'], budget=budget,
                    title=summary['config'] + (f': best top-1 {best:.4f}' if best is not None else ''))
    except ImportError as e:
        log(f'note: no curves.png ({e})')


def diverged_hint(run_dir: Path, *, lr: float, epoch: int) -> str:
    """What is really on disk when the loss diverges: the last good checkpoint, or none yet."""
    lower = f'--training.lr lower than {lr}'
    last = run_dir / 'last.pt'
    if not last.is_file():
        return (f'no checkpoint was written ({run_dir} has none: the loss diverged before '
                f'the first epoch ended); start again with a {lower}')
    return (f'the last good checkpoint is {last} (after epoch {epoch}); resume from it with '
            f'a {lower}: python scripts/train.py --resume {last} --training.lr LR')
