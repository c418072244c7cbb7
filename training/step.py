"""One optimization step: forward, loss, backward, (clip), the optimizer's step at the LR the
schedule gives. The optimizer comes from ``training/optim.py`` (by name), the per-step LR
multiplier from ``training/schedule.py``.

The trainer and the benchmark both run :class:`TrainStep`, so the benchmark's "model step"
figure is the trainer's own step (parameter groups, label smoothing, clipping, scaler).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .runtime import autocast


class TrainStep:
    """forward -> loss -> backward -> (clip) -> optimizer step, under the one AMP code path.

    ``GradScaler(enabled=dtype == float16)``: loss scaling only where fp16 needs it, so bf16
    and fp32 run the same lines with the scaler a no-op.

    ``scale`` is the schedule's multiplier for this step, a Python float: every parameter
    group's LR is its ``peak_lr`` times it (the kernels take the LR as an argument, so setting it
    costs no host-device synchronization and no copy). ``cuda_graph``: the whole step is captured
    once in a CUDA graph and replayed for every batch of the captured shape (the trainer's
    training batches all have it: ``drop_last``); each group's LR then lives in a device tensor
    that the fused SGD kernel reads (``fill_`` per step and distinct peak LR: a launch, no sync).
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

    def __call__(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One step with every group at ``peak_lr * scale``; returns (loss, logits), detached,
        not synchronized."""
        if not self.cuda_graph:
            for g in self.optimizer.param_groups:
                g['lr'] = g['peak_lr'] * float(scale)  # a numpy scalar would not load with weights_only
        else:  # training.cuda_graph: capture once, then replay
            if self.graph is None:
                self._capture(x, y)
            for peak, lr_t in self.lr_t.items():
                lr_t.fill_(peak * float(scale))
            if x.shape == self.static_x.shape:  # always with drop_last; else the eager step below
                self.static_x.copy_(x, non_blocking=True)
                self.static_y.copy_(y, non_blocking=True)
                self.graph.replay()
                return self.static_loss.clone(), self.static_logits.clone()  # the next replay overwrites them
        loss, logits = self._step(x, y)
        return loss.detach(), logits.detach()

    def lrs(self, scale: float) -> dict[str, float]:
        """Each parameter group's LR as the last step ran it, read from the optimizer (a CUDA
        graph's are device tensors: their host values instead, no sync)."""
        return {f'lr/{g["name"]}': g['lr'] if isinstance(g['lr'], float) else g['peak_lr'] * float(scale)
                for g in self.optimizer.param_groups}

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
    def _capture(self, x, y):
        """Warm up on a side stream (cuDNN autotuning, momentum buffers), put every weight,
        buffer and momentum back as it was -- the warm-up steps must not count as training --
        then capture forward, backward and the optimizer step into one graph."""
        self.lr_t = {}  # peak LR -> its device tensor (fused SGD reads a tensor LR on the device)
        for g in self.optimizer.param_groups:
            g['lr'] = self.lr_t.setdefault(g['peak_lr'], torch.zeros((), device=self.device))
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
           'needs the fused SGD (training.optimizer=sgd)' if not (
               isinstance(optimizer, torch.optim.SGD) and optimizer.defaults.get('fused')) else None)
    if why:
        raise ConfigError(f'training.cuda_graph: {why}; set training.cuda_graph=false')
