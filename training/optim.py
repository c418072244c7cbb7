"""Optimizers by name (``training.optimizer``), as timm's ``create_optimizer_v2`` does it.

    optimizer = make_optimizer(model, cfg.training)     # sgd | adamw | muon
    train_step(x, y, scale)                             # each group: lr = its peak_lr x scale

Every optimizer splits the model's parameters the same way: conv and linear weights (dim >= 2)
take weight decay, BatchNorm weights and biases and all biases do not (nanoGPT's rule). Each
parameter group carries its ``name`` and its ``peak_lr``; the LR schedule (``training/schedule.py``)
scales every group by the same multiplier, so one schedule drives optimizers with several LRs.

- ``sgd``: SGD with (Nesterov) momentum, ``training.lr``/``momentum``/``weight_decay``;
  ``training.fused_sgd``: torch's fused kernel, else foreach.
- ``adamw``: torch's AdamW, ``training.lr``/``weight_decay``/``adam_betas`` (set the LR: AdamW's
  is ~100x smaller than SGD's, e.g. ``--training.lr 0.002``).
- ``muon``: Muon (``training/muon.py``) for the hidden weights (every weight of dim >= 2 but the
  classifier head's), ``training.muon_lr``/``muon_momentum``/``muon_weight_decay``; SGD as above
  for the head, BatchNorm parameters and biases (airbench94_muon's split).

A new optimizer is one :func:`register` entry: a function (model, tcfg) -> (class, parameter
groups, keyword arguments), the ``training.*`` keys only it reads (they are refused with another
optimizer), and whether it fuses (``training.fused_sgd``) and runs in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ffcv_pipeline.ffcv_patches import eager_optimizer
from model.checkpoint import unwrap

from .muon import Muon

__all__ = ['OPTIMIZERS', 'register', 'make_optimizer', 'split_parameters']


@dataclass(frozen=True)
class OptimizerEntry:
    build: Callable  # (model, tcfg) -> (optimizer class, param groups, keyword arguments)
    reads: tuple[str, ...] = ()  # training.* keys it reads besides lr and weight_decay
    fused: bool = False  # honours training.fused_sgd
    cuda_graph: bool = False  # its step can be captured (training.cuda_graph)


OPTIMIZERS: dict[str, OptimizerEntry] = {}


def register(name: str, **entry):
    def add(build):
        OPTIMIZERS[name] = OptimizerEntry(build, **entry)
        return build
    return add


def split_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """'hidden': weights of dim >= 2 but the head's; 'head': the classifier's (the last
    ``nn.Linear``) weights of dim >= 2; 'others': BatchNorm weights, biases (dim < 2). Model
    order within each."""
    model = unwrap(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = {id(p) for p in linears[-1].parameters()} if linears else set()
    out = {'hidden': [], 'head': [], 'others': []}
    for p in model.parameters():
        if p.requires_grad:
            out['others' if p.dim() < 2 else 'head' if id(p) in head else 'hidden'].append(p)
    return out


def _group(name: str, params: list, lr: float, **hyper) -> dict:
    return {'name': name, 'params': params, 'peak_lr': float(lr), 'lr': 0.0, **hyper}


def _decay_groups(model, tc) -> list[dict]:
    """Weight decay on dim >= 2 weights only (order kept from earlier checkpoints: decayed first)."""
    s = split_parameters(model)
    weights = [p for p in unwrap(model).parameters() if p.requires_grad and p.dim() >= 2]
    return [_group('weights', weights, tc.lr, weight_decay=tc.weight_decay),
            _group('others', s['others'], tc.lr, weight_decay=0.0)]


def _sgd_kwargs(tc) -> dict:
    fused = bool(tc.fused_sgd or tc.cuda_graph)  # the CUDA graph reads the fused kernel's tensor LR
    return {'momentum': tc.momentum, 'nesterov': tc.nesterov and tc.momentum > 0,
            **({'fused': True} if fused else {'foreach': True})}


@register('sgd', reads=('momentum', 'nesterov'), fused=True, cuda_graph=True)
def sgd(model, tc):
    return torch.optim.SGD, _decay_groups(model, tc), _sgd_kwargs(tc)


@register('adamw', reads=('adam_betas',))
def adamw(model, tc):
    return torch.optim.AdamW, _decay_groups(model, tc), {'betas': tuple(tc.adam_betas), 'foreach': True}


@register('muon', reads=('momentum', 'nesterov', 'muon_lr', 'muon_momentum', 'muon_weight_decay'),
          fused=True)
def muon(model, tc):
    s, sgd_kw = split_parameters(model), _sgd_kwargs(tc)
    rest = {'momentum': sgd_kw['momentum'], 'nesterov': sgd_kw['nesterov']}
    groups = [_group('muon', s['hidden'], tc.muon_lr, muon=True, momentum=tc.muon_momentum,
                     nesterov=True, weight_decay=tc.muon_weight_decay),
              _group('head', s['head'], tc.lr, weight_decay=tc.weight_decay, **rest),
              _group('others', s['others'], tc.lr, weight_decay=0.0, **rest)]
    return Muon, [g for g in groups if g['params']], {'fused': bool(tc.fused_sgd)}


def make_optimizer(model: nn.Module, tcfg, *, eager: bool = True) -> torch.optim.Optimizer:
    """``training.optimizer``'s optimizer over ``model``'s parameters, every group at LR 0
    until the step sets it (:class:`~training.step.TrainStep`). ``eager``: the model is not
    compiled (``ffcv_patches.eager_optimizer``: no ``torch._dynamo`` import)."""
    cls, groups, kwargs = OPTIMIZERS[tcfg.optimizer].build(model, tcfg)
    return eager_optimizer(cls, groups, **kwargs) if eager else cls(groups, **kwargs)


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each group's settings (not its parameters): what a resumed run's config decides."""
    return [{k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups]
