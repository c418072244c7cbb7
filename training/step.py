"""One optimization step, and what it needs: the optimizer and the per-step LR schedule.

The trainer and the benchmark both run :class:`TrainStep`, so the benchmark's "model step"
figure is the trainer's own step (parameter groups, label smoothing, clipping, scaler).
"""
from __future__ import annotations

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


def make_optimizer(model: torch.nn.Module, tcfg) -> torch.optim.Optimizer:
    """SGD (+ Nesterov) over :func:`param_groups`; the LR is set per step by :class:`TrainStep`."""
    return torch.optim.SGD(param_groups(model, tcfg.weight_decay), lr=0.0, momentum=tcfg.momentum,
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
