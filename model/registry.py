"""The model from the config, in one place: a registry of architectures and their memory format.

    model = build_model(cfg.model, device=device)   # {'arch', 'num_classes', 'width', 'channels_last'}

The trainer, the benchmark, the checkpoint loader (and through it the app and ``predict.py``)
all build their model here. A new family is a module beside ``resnet.py`` and one
:data:`ARCHS` entry: its constructor takes the config's ``model`` keys other than ``arch`` and
``channels_last``, and its entry says whether channels-last is safe for it on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Mapping

import torch
from torch import nn

from .resnet import ResNet

MODEL_KEYS = ('arch', 'channels_last')  # what build_model reads itself; the rest goes to the constructor


def _resnet_channels_last_on_cpu(mcfg: Mapping) -> bool:
    # oneDNN's stride-2 1x1 convolution backward writes out of bounds for channels-last inputs
    # with fewer input channels than its 16-channel AVX-512 block (oneDNN#6035; seen here as
    # segfaults with torch 2.14.1): the ResNet's shortcut convs see `width` channels.
    return mcfg.get('width', 64) >= 16


@dataclass(frozen=True)
class Arch:
    build: Callable[..., nn.Module]  # (**model keys) -> the model, weights initialized
    channels_last_on_cpu: Callable[[Mapping], bool] = lambda mcfg: True


ARCHS: dict[str, Arch] = {
    'resnet18': Arch(partial(ResNet, blocks=(2, 2, 2, 2)), _resnet_channels_last_on_cpu),
    'resnet34': Arch(partial(ResNet, blocks=(3, 4, 6, 3)), _resnet_channels_last_on_cpu),
}


def _arch(mcfg: Mapping) -> Arch:
    name = mcfg.get('arch')
    if name not in ARCHS:
        raise ValueError(f'model.arch {name!r} is not one of {sorted(ARCHS)}')
    return ARCHS[name]


def use_channels_last(mcfg: Mapping, device: torch.device | str) -> bool:
    """The memory format of ``mcfg``'s model on ``device``: ``mcfg['channels_last']`` when set;
    unset (auto): on, except
    - on MPS, where convolution backward ran ~30x slower on channels-last tensors in the torch
      releases we pin (pytorch#193349);
    - on the CPU where the architecture's entry says it is unsafe (the ResNet narrower than 16
      channels: a oneDNN bug, see ``_resnet_channels_last_on_cpu``)."""
    requested = mcfg.get('channels_last')
    if requested is not None:
        return bool(requested)
    kind = torch.device(device).type
    return not (kind == 'mps' or (kind == 'cpu' and not _arch(mcfg).channels_last_on_cpu(mcfg)))


def build_model(mcfg: Mapping, *, device: torch.device | str = 'cpu') -> nn.Module:
    """The model the config's ``model`` section (or a checkpoint's ``model_config``) describes,
    freshly initialized, on ``device``, in the memory format :func:`use_channels_last` picks."""
    arch = _arch(mcfg)
    model = arch.build(**{k: v for k, v in mcfg.items() if k not in MODEL_KEYS})
    fmt = torch.channels_last if use_channels_last(mcfg, device) else torch.contiguous_format
    return model.to(device=device, memory_format=fmt)
