"""TensorBoard (``output.tensorboard: true``): event files in the run folder, so that
``tensorboard --logdir runs/`` shows every run. Scalars against the optimizer step: per step the
LR of each parameter group (``step/lr/<group>``) and, every few steps, the epoch's running train
loss and images/s (``step/train_loss``, ``step/train_images_per_s``); per epoch every number of
its ``metrics.jsonl`` line (``epoch/<key>``: loss, accuracy, LR, images/s, seconds, ...); at the
end the summary's numbers (``summary/<key>``) and the time budget (``time_budget/<span>``).

torch's ``SummaryWriter`` queues events to a background thread (a scalar costs microseconds on
the critical path). A resumed run purges the events its checkpoint's step had not reached, so a
session that was interrupted leaves no curve beyond the point the run continues from.
"""
from __future__ import annotations

from numbers import Real

from . import Sink


def _numbers(prefix: str, d: dict) -> dict:
    return {f'{prefix}/{k}': float(v) for k, v in d.items()
            if isinstance(v, Real) and not isinstance(v, bool)}


class TensorBoardSink(Sink):
    def __init__(self, run_dir, *, resumed_at: int | None = None):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=resumed_at)

    def _scalars(self, scalars: dict, step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def step(self, step: int, scalars: dict) -> None:
        self._scalars(_numbers('step', scalars), step)

    def epoch(self, step: int, record: dict) -> None:
        self._scalars(_numbers('epoch', record), step)

    def summary(self, step: int, summary: dict) -> None:
        self._scalars({**_numbers('summary', summary),
                       **_numbers('time_budget', summary.get('time_budget') or {})}, step)

    def close(self) -> None:
        self.writer.close()  # flushes the queue: the file is complete when the run returns
