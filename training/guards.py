"""What stops a run early, kept out of the training loop: Ctrl-C / SIGTERM (a resumable
checkpoint at the next batch boundary) and a loss that became NaN or infinite."""
from __future__ import annotations

import math
import signal
import threading

import torch

from . import distributed as D

CHECK_EVERY = 20  # steps between checks of the loss and of stop requests (each one syncs the GPU)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM; ``args[0]`` is the checkpoint to resume from."""


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

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank saw a stop request (a collective under DDP: call
        it at the same points on every rank)."""
        return D.broadcast_flag(self.requested, device) if D.is_distributed() else self.requested


def check_finite(loss_sum: torch.Tensor, *, where: str, hint) -> float:
    """The loss summed over ranks, or :class:`TrainingDiverged` if it is not finite: every rank
    takes the same decision (a lone raise would deadlock DDP). ``hint``: a string, or a function
    giving it (called only on a failure: it may look at the disk)."""
    total = D.all_reduce_sum(loss_sum.detach().clone()) if D.is_distributed() else loss_sum
    value = total.item()
    if not math.isfinite(value):
        raise TrainingDiverged(f'training diverged: the loss is {value} at {where}; '
                               f'{hint() if callable(hint) else hint}')
    return value
