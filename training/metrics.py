"""Per-epoch metrics: the sums kept on the device during an epoch (:class:`EpochStats`), one
line per epoch in ``metrics.jsonl``, the run summary (``summary.json``) and the curves plot.

One JSON object per line and epoch::

    {"epoch": 1, "lr": 0.39, "train_loss": 3.9, "train_acc": 0.11, "test_top1": 0.17,
     "test_top5": 0.43, "epoch_seconds": 2.1, "eval_seconds": 0.3,
     "train_images_per_s": 23800.0, "wallclock_s": 21.4}

``epoch`` counts from 1; ``wallclock_s`` is the time since the run's process started (imports,
set-up and JIT compilation included), so ``time_to_target_s`` in the summary is a true
time-to-accuracy; ``train_seconds_to_target`` beside it counts the training loops only (the sum
of ``epoch_seconds`` through that epoch: steps and waiting for batches, no set-up, evaluation or
checkpoints), the convention of the speed records.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from model.fileio import atomic_write, atomic_write_text

from . import distributed as D
from .runtime import accum_dtype


@dataclass
class EpochStats:
    """Sums over one epoch, kept on the device (no sync per step)."""
    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int = 0
    seconds: float = 0.0
    wait_s: float = 0.0  # of those seconds, waiting for the next batch

    @classmethod
    def start(cls, device, partial: dict | None = None, *, is_main: bool = True) -> 'EpochStats':
        """Zero, or the statistics of the interrupted epoch a resumed run continues (totals over
        all ranks: added once, on the main process)."""
        s = cls(torch.zeros((), device=device, dtype=accum_dtype(device)),
                torch.zeros((), device=device, dtype=accum_dtype(device)))
        if partial:
            s.seconds, s.wait_s = partial['seconds'], partial.get('wait_s', 0.0)
            if is_main:
                s.loss_sum += partial['loss_sum']
                s.correct += partial['correct']
                s.seen = partial['seen']
        return s

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss_sum += loss.to(self.loss_sum.dtype) * y.shape[0]
        self.correct += (logits.argmax(1) == y).sum()
        self.seen += y.shape[0]

    def reduced(self) -> dict:
        """The sums over all ranks (a collective: call it on every rank)."""
        t = D.all_reduce_sum(torch.stack([self.loss_sum, self.correct, torch.tensor(
            float(self.seen), device=self.loss_sum.device, dtype=self.loss_sum.dtype)]))
        loss_sum, correct, seen = t.tolist()
        return {'loss_sum': loss_sum, 'correct': correct, 'seen': int(seen), 'seconds': self.seconds,
                'wait_s': self.wait_s}


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut short by a crash: the epoch is redone on resume
            continue
    return records


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + '\n')


def median_after_first(records: list[dict], key: str) -> float | None:
    """Median of ``key`` over the epochs after the first (the first one carries cuDNN
    autotuning and allocator warm-up); the first epoch's when it is the only one."""
    values = [r[key] for r in (records[1:] or records) if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(records: list[dict], *, target: float, **extra) -> dict:
    """The run summary from its per-epoch records; ``extra`` adds run facts (device, ...)."""
    evals = [r for r in records if r.get('test_top1') is not None]
    best = max(evals, key=lambda r: r['test_top1'], default=None)
    hit = next((r for r in evals if r['test_top1'] >= target), None)  # test top-1 first reached target
    return {
        'best_top1': best and best['test_top1'], 'best_epoch': best and best['epoch'],
        'final_top1': evals[-1]['test_top1'] if evals else None,
        'final_top5': evals[-1]['test_top5'] if evals else None,
        'target_top1': target, 'time_to_target_s': hit and hit['wallclock_s'],
        'epoch_reached_target': hit and hit['epoch'],  # training loops only through it: epoch_seconds
        'train_seconds_to_target': hit and round(sum(r['epoch_seconds'] for r in records
                                                     if r['epoch'] <= hit['epoch']), 3),
        'train_seconds': round(sum(r['epoch_seconds'] for r in records), 3),
        'eval_seconds': round(sum(r['eval_seconds'] for r in records), 3),
        'median_train_images_per_s': median_after_first(records, 'train_images_per_s'),
        'median_data_wait_fraction': median_after_first(records, 'data_wait_fraction'),
        **extra,
    }


def plot_curves(records: list[dict], path: Path, *, title: str = '', target: float | None = None,
                budget: dict | None = None) -> None:
    """Loss; accuracy per epoch; test top-1 against wall-clock seconds (the mission is
    wall-clock, not epochs) with the target line; images/s; the time budget as a stacked bar.
    Written atomically as a PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    ep = [r['epoch'] for r in records]
    ev = [r for r in records if r.get('test_top1') is not None]
    fig, axes = plt.subplots(1, 5, figsize=(25, 4))
    axes[0].plot(ep, [r['train_loss'] for r in records], 'o-', label='train loss')
    axes[0].set_xlabel('epoch'), axes[0].set_ylabel('loss'), axes[0].legend()
    axes[1].plot(ep, [r['train_acc'] for r in records], 'o-', label='train top-1 (augmented)')
    axes[1].plot([r['epoch'] for r in ev], [r['test_top1'] for r in ev], 'o-', label='test top-1')
    axes[1].plot([r['epoch'] for r in ev], [r['test_top5'] for r in ev], 'o-', label='test top-5')
    axes[1].set_xlabel('epoch'), axes[1].set_ylabel('accuracy')
    axes[2].plot([r['wallclock_s'] for r in ev], [r['test_top1'] for r in ev], 'o-', color='C1',
                 label='test top-1')
    axes[2].set_xlabel('wall-clock seconds from process start'), axes[2].set_ylabel('test top-1')
    for ax in axes[1:3]:
        if target is not None:
            ax.axhline(target, color='k', ls='--', lw=1, label=f'target {target:.0%}')
        ax.set_ylim(0, 1), ax.grid(alpha=0.3), ax.legend()
    axes[3].plot(ep, [r['train_images_per_s'] for r in records], 'o-', color='C2')
    axes[3].set_xlabel('epoch'), axes[3].set_ylabel('training images/s')
    plot_budgets(axes[4], ['this run'], [budget] if budget else [])  # none: the axes off
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def plot_budgets(ax, labels: list[str], budgets: list[dict]) -> None:
    """One horizontal stacked bar per run: where its wall-clock went (``training.budget``)."""
    from .budget import SPANS
    if not budgets:
        ax.set_axis_off()
        return
    left = [0.0] * len(budgets)
    for i, span in enumerate(SPANS):
        widths = [max(b.get(span, 0.0), 0.0) for b in budgets]
        if any(widths):
            ax.barh(range(len(budgets)), widths, left=left, height=0.5, color=f'C{i % 10}' if i < 10 else 'grey',
                    hatch='//' if i >= 10 else None, label=span)
            left = [a + w for a, w in zip(left, widths)]
    ax.set_yticks(range(len(budgets)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel='seconds from process start', title='time budget')
    ax.legend(fontsize=6, loc='upper center', bbox_to_anchor=(0.5, -0.18), ncol=5, frameon=False)


def save_figure(fig, path: Path) -> None:
    """Lay out, write atomically as a PNG (a full disk: DiskFullError), and free the figure."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=100))
    finally:
        plt.close(fig)
