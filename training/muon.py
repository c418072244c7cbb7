"""Muon (Jordan et al. 2024) for the hidden weights, SGD for the rest, as one optimizer.

    opt = Muon([{'params': convs, 'muon': True, 'lr': 0.02, 'momentum': 0.95, 'nesterov': True},
                {'params': rest, 'lr': 0.4, 'momentum': 0.9, 'nesterov': True, 'weight_decay': 5e-4}])

The groups marked ``muon`` take Muon's step: Nesterov momentum, then the update orthogonalized
by five Newton-Schulz iterations in bf16, with torch's coefficients, LR adjustment
(``sqrt(max(1, rows/cols))``, "original") and decoupled weight decay -- ``torch.optim.Muon``'s
arithmetic, which tests/test_optim.py checks bit for bit on 2-D weights. A conv kernel
(out, in, k, k) is orthogonalized as the (out, in*k*k) matrix airbench94_muon uses, through a
view of its memory (channels-last kernels as (out, k*k*in): the same matrix up to a permutation
of its columns, which orthogonalization commutes with), so the update lands in the kernel itself.
The other groups (BatchNorm weights and biases, biases, the classifier head) take torch's own
functional SGD, foreach or fused, exactly as ``training.optimizer: sgd`` would.

Why not ``torch.optim.Muon`` itself (torch 2.14.1): it refuses parameters that are not 2-D
(``ValueError: Muon only supports 2D parameters``), so a conv kernel would need a 2-D leaf
tensor sharing its memory plus its gradient re-pointed before every step -- before the
GradScaler's unscale, which reads the gradients of the optimizer's own parameters -- and a
second optimizer object beside it for the rest (two state dicts, two scaler steps). One class
over both kinds of group is ~50 lines, keeps one optimizer in the step, the checkpoint and the
scaler, and its Muon arithmetic is tested against torch's.
"""
from __future__ import annotations

import math

import torch
from torch.optim.sgd import sgd as _sgd  # torch's public functional SGD

__all__ = ['Muon', 'orthogonalize']

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's (Keller Jordan's) quintic
NS_STEPS, EPS = 5, 1e-7


def orthogonalize(g: torch.Tensor) -> torch.Tensor:
    """~U V^T of the 2-D ``g`` = U S V^T: five Newton-Schulz iterations in bf16 (torch's
    ``_zeropower_via_newtonschulz``: the singular values land in ~[0.5, 1.5], which trains as
    well as exactly 1 at a fraction of the cost)."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=EPS))  # spectral norm <= Frobenius norm = 1
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def as_matrix(t: torch.Tensor, like: torch.Tensor, *, view: bool = False) -> torch.Tensor:
    """``t`` (a weight or its update) as ``like``'s (out, everything else) matrix, columns in
    ``like``'s memory order: for a channels-last kernel, whose memory is (out, kh, kw, in), the
    columns are (kh, kw, in). ``view``: a view, never a copy (the weight itself is updated)."""
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        t = t.permute(0, 2, 3, 1)
    return t.view(t.shape[0], -1) if view else t.reshape(t.shape[0], -1)


class Muon(torch.optim.Optimizer):
    def __init__(self, groups: list[dict], *, fused: bool = False):
        """``groups``: torch's parameter groups, each with ``muon`` (bool), ``lr``,
        ``momentum``, ``nesterov`` and ``weight_decay``; ``fused``: the SGD groups' fused kernel."""
        for g in groups:
            if g.get('muon') and any(p.dim() < 2 for p in g['params']):
                raise ValueError('Muon: a muon group holds only weights of 2 or more dimensions')
        super().__init__(groups, {'lr': 0.0, 'momentum': 0.0, 'nesterov': False, 'weight_decay': 0.0,
                                  'muon': False, 'fused': fused})

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            params = [p for p in g['params'] if p.grad is not None]
            if not params:
                continue
            state = [self.state[p] for p in params]
            if not g['muon']:  # torch's SGD, its momentum buffers kept where SGD keeps them
                bufs = [s.get('momentum_buffer') for s in state]
                _sgd(params, [p.grad for p in params], bufs, weight_decay=g['weight_decay'],
                     momentum=g['momentum'], lr=g['lr'], dampening=0.0, nesterov=g['nesterov'],
                     maximize=False, foreach=not g['fused'], fused=g['fused'])
                for s, buf in zip(state, bufs):
                    if buf is not None:  # none without momentum, as in torch's SGD
                        s['momentum_buffer'] = buf
                continue
            for p, s in zip(params, state):
                buf = s.get('momentum_buffer')
                if buf is None:
                    buf = s['momentum_buffer'] = torch.zeros_like(p.grad)
                buf.lerp_(p.grad, 1 - g['momentum'])
                update = p.grad.lerp(buf, g['momentum']) if g['nesterov'] else buf
                w = as_matrix(p, p, view=True)
                rows, cols = w.shape
                w.mul_(1 - g['lr'] * g['weight_decay'])
                w.add_(orthogonalize(as_matrix(update, p)), alpha=-g['lr'] * math.sqrt(max(1.0, rows / cols)))
        return None
