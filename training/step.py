"""One optimization step, and what it needs: the optimizer and the per-step LR schedule.

The trainer and the benchmark both run :class:`TrainStep`, so the benchmark's "model step"
figure is the trainer's own step (parameter groups, label smoothing, clipping, scaler).
"""
from __future__ import annotations

import functools
import numpy as np
import torch
import torch.nn.functional as F

from .runtime import autocast


def lr_schedule(*, lr: float, epochs: int, iters_per_epoch: int, warmup_epochs: float,
                kind: str) -> np.ndarray:
    """LR for every optimizer step: linear warm-up 0 -> lr, then decay to 0 (linear/cosine)."""
    total = epochs * iters_per_epoch
    warm = int(round(warmup_epochs * iters_per_epoch))
    steps = np.arange(total, dtype=np.float64)
    sched = np.empty(total)
    up = steps < warm
    sched[up] = lr * (steps[up] + 1) / warm  # first step already > 0
    t = (steps[~up] - warm) / max(total - warm, 1)  # 0 -> 1 over the decay
    sched[~up] = lr * (1 - t) if kind == 'linear' else lr * 0.5 * (1 + np.cos(np.pi * t))
    return sched


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights (dim >= 2) only, not on biases or BatchNorm."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]


def _prefill_dynamo_disable(cls: type) -> None:
    """Fill ``torch._compile._disable_dynamo``'s per-function cache with the function itself for
    ``cls``'s methods and its module's functions, so that calling them imports nothing."""
    import sys
    import torch._compile
    inner_code = torch._compile._disable_dynamo(lambda: None).__code__
    seen = set()

    def prefill(obj, depth=0):
        if id(obj) in seen or depth > 3 or getattr(obj, '__code__', None) is None:
            return
        seen.add(id(obj))
        cells = dict(zip(obj.__code__.co_freevars, obj.__closure__ or ()))
        if obj.__code__ is inner_code:
            fn = cells['fn'].cell_contents
            if getattr(fn, '__dynamo_disable', None) is None:
                setattr(fn, '__dynamo_disable', fn)
            return
        for cell in cells.values():  # e.g. the functional SGD's fallback wrapper
            try:
                prefill(cell.cell_contents, depth + 1)
            except ValueError:  # an empty cell
                pass
    for c in cls.__mro__:
        for obj in list(vars(c).values()):
            prefill(obj)
    for obj in list(vars(sys.modules[cls.__module__]).values()):
        prefill(obj)


def eager_optimizer(cls: type, *args, **kwargs) -> torch.optim.Optimizer:
    """``cls(*args, **kwargs)`` that never imports ``torch._dynamo`` (0.9 s on our 2-core machine).

    torch.optim imports ``torch._dynamo`` at the first call of its methods only to tell the
    compiler what not to trace: ``step`` runs through ``_use_grad_for_differentiable`` (imports
    it on every call, for two ``graph_break()``s, no-ops in eager mode), and ``zero_grad``,
    ``add_param_group`` (called by the constructor) and the functional SGD kernels through
    ``torch._compile._disable_dynamo``, which caches ``torch._dynamo.disable(fn)`` as
    ``fn.__dynamo_disable``. Nothing is traced in an eager run, so those caches hold the functions
    themselves, and this optimizer's ``step`` is the undecorated one under ``torch.no_grad()``
    (what the decorator does, less the graph breaks and the profiler-hook wrapper). Written
    against torch 2.11-2.14; tests/test_training.py checks that training steps import no
    ``torch._dynamo`` (it fails loudly if torch changes this). Not for ``training.compile``."""
    import sys
    if 'torch._dynamo' in sys.modules:  # imported anyway (compile, or the caller): no gain
        return cls(*args, **kwargs)
    _prefill_dynamo_disable(cls)
    optimizer = cls(*args, **kwargs)
    raw = cls.step
    while hasattr(raw, '__wrapped__'):  # profile-hook wrapper -> _use_grad -> SGD.step
        raw = raw.__wrapped__

    def step(closure=None):
        with torch.no_grad():
            return raw(optimizer, closure)
    optimizer.step = step  # an instance attribute: GradScaler.step calls it too
    return optimizer


def make_optimizer(model: torch.nn.Module, tcfg, *, eager: bool = True) -> torch.optim.Optimizer:
    """SGD (+ Nesterov) over :func:`param_groups`; the LR is set per step by :class:`TrainStep`.
    ``eager``: the model is not compiled (:func:`eager_optimizer`)."""
    make = functools.partial(eager_optimizer, torch.optim.SGD) if eager else torch.optim.SGD
    return make(param_groups(model, tcfg.weight_decay), lr=0.0, momentum=tcfg.momentum,
                nesterov=tcfg.nesterov and tcfg.momentum > 0)


class TrainStep:
    """forward -> loss -> backward -> (clip) -> optimizer step, under the one AMP code path.

    ``GradScaler(enabled=dtype == float16)``: loss scaling only where fp16 needs it, so bf16
    and fp32 run the same lines with the scaler a no-op.
    """

    def __init__(self, net: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 device: torch.device, dtype: torch.dtype, label_smoothing: float = 0.0,
                 grad_clip: float = 0.0):
        self.net, self.optimizer = net, optimizer
        self.device, self.dtype = device, dtype
        self.label_smoothing, self.grad_clip = label_smoothing, grad_clip
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One step at learning rate ``lr``; returns (loss, logits), detached, not synchronized."""
        for g in self.optimizer.param_groups:
            g['lr'] = float(lr)  # a numpy scalar would not load with weights_only
        with autocast(self.device, self.dtype):
            logits = self.net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), logits.detach()
