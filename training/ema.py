"""Weight averaging: an exponential moving average (EMA) of the model's weights.

    ema = EMA(model, decay=0.998, every=1)      # training.ema, training.ema_every
    ema.update(model, step)                     # after each optimizer step (no host sync)
    logits = ema.module(x)                      # what is evaluated, checkpointed as 'model', exported

``decay`` is per optimizer step whatever ``every`` is: an update every N steps uses decay**N,
so the averaging window stays ~1 / (1 - decay) steps (torchvision's references adjust their
decay the same way for ``--model-ema-steps``). Early on the decay is capped at
(1 + n) / (10 + n) after n updates (TensorFlow's ``ExponentialMovingAverage(num_updates=...)``),
so the average does not drag the random initialization along for the first ~1/(1 - decay) steps.

BatchNorm: the running mean and variance are averaged with the same decay as the weights
(timm's ``ModelEmaV2`` and torchvision's ``ExponentialMovingAverage(use_buffers=True)`` do
the same). Copying the raw model's statistics instead would pair the averaged weights with the
statistics of the current raw weights -- a mismatch that grows with the window. Re-estimating
them (a pass over training data with the EMA weights) would be exact but costs most of an epoch
of forward passes per evaluation. ``num_batches_tracked`` (an integer) is copied.

The number of updates is a function of the step (``step // every``), so a resumed run's EMA
continues exactly: the checkpoint holds the averaged weights and the step.

Sizing for rn18.yaml (~97 steps per epoch at batch 512, 20 epochs): decay 0.998 averages over
~500 steps (~5 epochs), 0.99 over ~1 epoch. Under a linear decay of the LR to zero the last
epochs' raw weights are already an average of sorts, so the gain has to be measured
(``scripts/gpu_sweep.py``); airbench found weight averaging "only helps combined with fast
BatchNorm momentum".
"""
from __future__ import annotations

import copy

import torch

from model.checkpoint import unwrap

__all__ = ['EMA']


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float, *, every: int = 1):
        if not 0 < decay < 1 or every < 1:
            raise ValueError(f'EMA: decay must lie in (0, 1) and every >= 1, got {decay}, {every}')
        self.decay, self.every = float(decay), int(every)
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.updates = 0
        self._lists = None  # (averaged, source, copied, source) tensors, built at the first update

    def _targets(self, model: torch.nn.Module):
        """The tensors to average / copy and their sources in ``model``, found once: the
        optimizer updates parameters in place and BatchNorm its buffers, so they stay valid."""
        if self._lists is None or self._lists[-1] is not model:
            dst, src = self.module.state_dict(keep_vars=True), unwrap(model).state_dict(keep_vars=True)
            avg = [k for k, v in dst.items() if v.is_floating_point()]
            rest = [k for k in dst if k not in avg]
            self._lists = ([dst[k].data for k in avg], [src[k].data for k in avg],
                           [dst[k].data for k in rest], [src[k].data for k in rest], model)
        return self._lists

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Average in ``model``'s weights if ``step`` (optimizer steps taken) is a multiple of
        ``every``. One foreach lerp over all floating-point tensors; the decay is a Python float
        computed on the host from a counter: nothing waits for the device."""
        if step % self.every:
            return
        avg, avg_src, copied, copied_src, _ = self._targets(model)
        # this update's decay: the per-step decay ** every, warmed up over the first updates
        decay = min(self.decay ** self.every, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(avg, avg_src, 1.0 - decay)
        if copied:  # BatchNorm's num_batches_tracked: one launch, not one per layer
            torch._foreach_copy_(copied, copied_src)
        self.updates += 1

    def state_dict(self) -> dict:
        """What resuming needs besides the averaged weights (saved as the checkpoint's 'model')."""
        return {'decay': self.decay, 'every': self.every, 'updates': self.updates}

    def load_state_dict(self, meta: dict, weights: dict) -> None:
        self.module.load_state_dict(weights)
        self.updates = int(meta['updates'])
