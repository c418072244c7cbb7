"""LR schedules by name (``training.schedule``): one multiplier per optimizer step.

    scale = lr_scales(cfg.training, steps_per_epoch)   # numpy array, one value per step
    train_step(x, y, scale[step])                      # each parameter group: its peak LR x scale

A schedule is a *shape* from 0 to 1: every parameter group's LR is its own peak (``training.lr``,
``training.muon_lr``, ...) times it, so optimizers with several peak LRs (Muon's two groups) follow
one schedule. Precomputed per step, as FFCV's CIFAR example does with ``np.interp``: a resumed run
indexes the same array, and the step reads a Python float (no host-device sync).

A new schedule is one :func:`register` entry: ``fn(total_steps, warmup_steps, tcfg) -> array``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ['SCHEDULES', 'register', 'lr_scales', 'scales']

SCHEDULES: dict[str, Callable[[int, int, object], np.ndarray]] = {}


def register(name: str):
    def add(fn):
        SCHEDULES[name] = fn
        return fn
    return add


def _warmup_then(total: int, warm: int, decay: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Linear warm-up 0 -> 1 over ``warm`` steps (the first step already > 0), then ``decay``
    of the progress t (0 -> 1) through the remaining steps."""
    steps = np.arange(total, dtype=np.float64)
    out = np.empty(total)
    up = steps < warm
    out[up] = (steps[up] + 1) / warm
    out[~up] = decay((steps[~up] - warm) / max(total - warm, 1))
    return out


@register('linear')  # FFCV's CIFAR example; Li et al. 2020: best for short budgets
def linear(total: int, warm: int, tcfg=None) -> np.ndarray:
    return _warmup_then(total, warm, lambda t: 1 - t)


@register('cosine')  # Loshchilov & Hutter 2017
def cosine(total: int, warm: int, tcfg=None) -> np.ndarray:
    return _warmup_then(total, warm, lambda t: 0.5 * (1 + np.cos(np.pi * t)))


@register('onecycle')
def onecycle(total: int, warm: int, tcfg=None) -> np.ndarray:
    """``torch.optim.lr_scheduler.OneCycleLR``'s shape (Smith & Topin 2017) with its defaults:
    cosine from 1/25 up to 1 over the warm-up steps, then cosine down to 1/(25 * 10^4).
    tests/test_optim.py checks it against torch's scheduler step by step."""
    start, end = 1 / 25, 1 / 25 / 1e4
    up_end, last = float(warm) - 1, float(total - 1)  # OneCycleLR's phase ends (step indices)
    steps = np.arange(total, dtype=np.float64)
    up = steps <= up_end
    cos = lambda a, b, pct: b + (a - b) / 2 * (np.cos(np.pi * pct) + 1)
    out = np.empty(total)
    out[up] = cos(start, 1.0, steps[up] / max(up_end, 1e-12))
    out[~up] = cos(1.0, end, (steps[~up] - up_end) / (last - up_end))
    return out


@register('piecewise')  # airbench's triangle, any other shape: (fraction of training, scale) points
def piecewise(total: int, warm: int, tcfg) -> np.ndarray:
    xs, ys = zip(*tcfg.schedule_points)
    return np.interp(np.arange(total) / total, xs, ys)


def scales(kind: str, *, total: int, warmup: int, tcfg=None) -> np.ndarray:
    if kind not in SCHEDULES:
        raise ValueError(f'training.schedule: {kind!r} is not one of {sorted(SCHEDULES)}')
    return SCHEDULES[kind](total, warmup, tcfg)


def lr_scales(tcfg, steps_per_epoch: int) -> np.ndarray:
    """The multiplier of every optimizer step of the run ``tcfg`` (``training``) describes."""
    return scales(tcfg.schedule, total=tcfg.epochs * steps_per_epoch,
                  warmup=int(round(tcfg.warmup_epochs * steps_per_epoch)), tcfg=tcfg)
