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
    ``training.fused_sgd``: torch's fused kernel (one launch updates every parameter; CUDA and
    the CPU have it), else the foreach implementation (a few launches per parameter group).
    ``eager``: the model is not compiled (:func:`eager_optimizer`)."""
    fused = bool(getattr(tcfg, 'fused_sgd', False) or getattr(tcfg, 'cuda_graph', False))
    make = functools.partial(eager_optimizer, torch.optim.SGD) if eager else torch.optim.SGD
    return make(param_groups(model, tcfg.weight_decay), lr=0.0, momentum=tcfg.momentum,
                nesterov=tcfg.nesterov and tcfg.momentum > 0,
                **({'fused': True} if fused else {'foreach': True}))


class TrainStep:
    """forward -> loss -> backward -> (clip) -> optimizer step, under the one AMP code path.

    ``GradScaler(enabled=dtype == float16)``: loss scaling only where fp16 needs it, so bf16
    and fp32 run the same lines with the scaler a no-op.

    The LR is a Python float from the precomputed schedule: the kernels take it as an argument,
    so setting it costs no host-device synchronization and no copy. ``cuda_graph``: the whole
    step is captured once in a CUDA graph and replayed for every batch of the captured shape
    (the trainer's training batches all have it: ``drop_last``); the LR then lives in a device
    tensor that the fused SGD kernel reads (``lr_t.fill_(lr)`` per step: a launch, no sync).
    """

    def __init__(self, net: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 device: torch.device, dtype: torch.dtype, label_smoothing: float = 0.0,
                 grad_clip: float = 0.0, cuda_graph: bool = False):
        self.net, self.optimizer = net, optimizer
        self.device, self.dtype = device, dtype
        self.label_smoothing, self.grad_clip = label_smoothing, grad_clip
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        if cuda_graph:
            check_cuda_graph(device, dtype, optimizer, net)
        self.cuda_graph, self.graph = cuda_graph, None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One step at learning rate ``lr``; returns (loss, logits), detached, not synchronized."""
        if self.cuda_graph:
            return self._graphed(x, y, float(lr))
        for g in self.optimizer.param_groups:
            g['lr'] = float(lr)  # a numpy scalar would not load with weights_only
        loss, logits = self._step(x, y)
        return loss.detach(), logits.detach()

    def _step(self, x, y, cache_enabled: bool = True):
        with autocast(self.device, self.dtype, cache_enabled=cache_enabled):
            logits = self.net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=not self.cuda_graph)  # graphs: grads stay static
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss, logits

    # ---- CUDA graph (training.cuda_graph) --------------------------------------------------------
    def _graphed(self, x, y, lr: float):
        if self.graph is None:
            self._capture(x, y)
        if x.shape != self.static_x.shape:  # cannot happen with drop_last; stay correct anyway
            self.lr_t.fill_(lr)
            loss, logits = self._step(x, y)
            return loss.detach(), logits.detach()
        self.static_x.copy_(x, non_blocking=True)
        self.static_y.copy_(y, non_blocking=True)
        self.lr_t.fill_(lr)
        self.graph.replay()
        return self.static_loss.clone(), self.static_logits.clone()  # the next replay overwrites them

    def _capture(self, x, y):
        """Warm up on a side stream (cuDNN autotuning, momentum buffers), put every weight,
        buffer and momentum back as it was -- the warm-up steps must not count as training --
        then capture forward, backward and the optimizer step into one graph."""
        self.lr_t = torch.zeros((), device=self.device)
        for g in self.optimizer.param_groups:
            g['lr'] = self.lr_t  # fused SGD reads a tensor LR on the device
        saved = self._snapshot()
        self.static_x, self.static_y = x.clone(), y.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # lr 0: the weights stay put; BatchNorm and momentum do not
                self._step(self.static_x, self.static_y, cache_enabled=False)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._restore(saved)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss, self.static_logits = self._step(self.static_x, self.static_y,
                                                              cache_enabled=False)

    def _snapshot(self) -> tuple[dict, dict]:
        """Copies of the weights, buffers and existing momentum buffers (before warm-up steps)."""
        model = {k: v.clone() for k, v in self.net.state_dict().items()}
        momentum = {p: st['momentum_buffer'].clone() for p, st in self.optimizer.state.items()
                    if st.get('momentum_buffer') is not None}
        return model, momentum

    @torch.no_grad()
    def _restore(self, saved: tuple[dict, dict]) -> None:
        """Undo warm-up steps in place (the captured graph keeps these very tensors): weights and
        BatchNorm statistics back; momentum buffers back, or zero where there were none -- with
        zero momentum the next step is v = grad, exactly SGD's first step."""
        model, momentum = saved
        for k, v in self.net.state_dict().items():
            v.copy_(model[k])
        for p, st in self.optimizer.state.items():
            buf = st.get('momentum_buffer')
            if buf is not None:
                buf.copy_(momentum[p]) if p in momentum else buf.zero_()


def check_cuda_graph(device: torch.device, dtype: torch.dtype, optimizer, net) -> None:
    """One line saying why ``training.cuda_graph`` cannot run here, or nothing."""
    from .config import ConfigError
    why = (f'needs a CUDA device (this run is on {device.type})' if device.type != 'cuda' else
           'needs bf16 or fp32 (fp16 loss scaling syncs with the host)' if dtype == torch.float16 else
           'runs on one process (DDP is not captured)' if isinstance(net, torch.nn.parallel.DistributedDataParallel) else
           'needs the fused SGD' if not optimizer.defaults.get('fused') else None)
    if why:
        raise ConfigError(f'training.cuda_graph: {why}; set training.cuda_graph=false')
