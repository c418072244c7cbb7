"""Test-time augmentation: the logits of several views of a test batch, averaged.

    logits = tta_logits(net, x, flip=cfg.training.tta, translate=cfg.training.tta_translate)

Views and weights as airbench's ``infer(mode='mirror_translate')`` (KellerJordan/cifar10-airbench,
``airbench94.py``): half the weight on the image itself and half on two copies shifted by
``translate`` pixels, one up-left and one down-right (reflect padding, then a crop), each
averaged with its horizontal mirror when ``flip``::

    flip, translate=t:  0.5 * m(x) + 0.25 * m(shift(x, -t, -t)) + 0.25 * m(shift(x, +t, +t))
                        where m(v) = (net(v) + net(mirror(v))) / 2
    flip only:          m(x)                 (the old ``training.tta: true``)
    neither:            net(x)

airbench measured +0.4 points (flip) and +0.2 more (translate) for ResNet-18 at 26 epochs on
CIFAR-10 (cifar10-zoo ``airbench/ablations/README.md``); evaluation costs 1x / 2x / 3x / 6x the
forward passes. Works per batch on any device, on normalized NCHW (any memory format) input;
the caller owns autocast and no_grad; the result is float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ['tta_logits', 'tta_views']


def tta_views(flip: bool, translate: int) -> int:
    """How many forward passes :func:`tta_logits` runs per batch."""
    return (2 if flip else 1) * (3 if translate else 1)


def _mirrored(net, x: torch.Tensor, flip: bool) -> torch.Tensor:
    logits = net(x).float()
    if flip:
        logits = (logits + net(torch.flip(x, dims=[3])).float()) * 0.5
    return logits


def tta_logits(net, x: torch.Tensor, *, flip: bool, translate: int = 0) -> torch.Tensor:
    """float32 logits of ``x`` (N x C x H x W, normalized) averaged over the configured views."""
    logits = _mirrored(net, x, flip)
    if not translate:
        return logits
    t, (h, w) = int(translate), x.shape[-2:]
    if not 0 < t < min(h, w):  # reflect padding needs t < the image side
        raise ValueError(f'training.tta_translate: must lie in [0, {min(h, w) - 1}], got {translate}')
    padded = F.pad(x, (t, t, t, t), mode='reflect')
    up_left = padded[:, :, :h, :w]  # the image moved t pixels right and down (content from up-left)
    down_right = padded[:, :, 2 * t:, 2 * t:]
    return (0.5 * logits + 0.25 * _mirrored(net, up_left, flip)
            + 0.25 * _mirrored(net, down_right, flip))
