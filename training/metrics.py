"""Per-epoch metrics (``metrics.jsonl``), the run summary (``summary.json``) and the curves plot.

One JSON object per line and epoch::

    {"epoch": 1, "lr": 0.39, "train_loss": 3.9, "train_acc": 0.11, "test_top1": 0.17,
     "test_top5": 0.43, "epoch_seconds": 2.1, "eval_seconds": 0.3,
     "train_images_per_s": 23800.0, "wallclock_s": 21.4}

``epoch`` counts from 1; ``wallclock_s`` is the time since the run started (set-up and JIT
compilation included), so ``time_to_target_s`` in the summary is a true time-to-accuracy.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')
        f.flush()
        os.fsync(f.fileno())


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


def truncate_jsonl(path: Path, last_epoch: int) -> None:
    """Keep records of epochs <= last_epoch (a resumed run rewrites what follows)."""
    records = [r for r in read_jsonl(path) if r.get('epoch', 0) <= last_epoch]
    write_text_atomic(path, ''.join(json.dumps(r) + '\n' for r in records))


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + '\n')


def time_to_target(records: list[dict], target: float) -> tuple[float | None, int | None]:
    """(wall-clock seconds, epoch) at which test top-1 first reached ``target``."""
    for r in records:
        if r.get('test_top1') is not None and r['test_top1'] >= target:
            return r['wallclock_s'], r['epoch']
    return None, None


def plot_curves(records: list[dict], path: Path, title: str = '') -> None:
    """Loss, accuracy and learning rate per epoch; written atomically as a PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    ep = [r['epoch'] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(ep, [r['train_loss'] for r in records], 'o-', label='train loss')
    axes[0].set_xlabel('epoch'), axes[0].set_ylabel('loss'), axes[0].legend()
    ev = [r for r in records if r.get('test_top1') is not None]
    axes[1].plot(ep, [r['train_acc'] for r in records], 'o-', label='train top-1 (augmented)')
    axes[1].plot([r['epoch'] for r in ev], [r['test_top1'] for r in ev], 'o-', label='test top-1')
    axes[1].plot([r['epoch'] for r in ev], [r['test_top5'] for r in ev], 'o-', label='test top-5')
    axes[1].set_xlabel('epoch'), axes[1].set_ylabel('accuracy'), axes[1].legend()
    axes[1].set_ylim(0, 1), axes[1].grid(alpha=0.3)
    axes[2].plot(ep, [r['train_images_per_s'] for r in records], 'o-', color='C2')
    axes[2].set_xlabel('epoch'), axes[2].set_ylabel('training images/s')
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = Path(path).with_name(f'.{Path(path).name}.tmp-{os.getpid()}.png')
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
