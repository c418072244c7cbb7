"""ResNet-18 for small images (He et al. 2016, CIFAR variant).

Differences from the ImageNet model, as usual for CIFAR: a 3x3 stride-1 stem and no max-pool,
so the four stages run at 32, 16, 8 and 4 pixels. With 100 classes it has 11,220,132
parameters. Build it with ``model.registry.build_model``, which also picks its memory format
(channels-last where it is fast and safe: cuDNN's fast conv kernels under AMP are NHWC).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNet(nn.Module):
    """For small images (32 px: CIFAR; 64 px trains too, at 4x the compute): the 3x3 stem keeps
    the full resolution, the global average pool takes any size."""

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), *, num_classes: int, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),  # 3x3, stride 1
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))  # no max-pool
        layers, in_planes = [], width
        for i, n in enumerate(blocks):
            planes, stride = width * 2 ** i, (1 if i == 0 else 2)
            for j in range(n):
                layers.append(BasicBlock(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
