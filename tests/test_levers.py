"""Issue 17's levers, each shown to take effect on the CPU: float32 normalization before the
cast to the AMP dtype, multi-view TTA, weight averaging (EMA), the optimizer and LR paths of the
step (foreach/fused, tensor LR), CUDA-graph refusal on the CPU and torch.compile against eager.
Every docstring names the mutation it catches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ffcv_pipeline.constants import CIFAR100_MEAN, CIFAR100_STD


def u8_batch(n=8, seed=0) -> torch.Tensor:
    """Every pixel value 0..255 in every channel, channels-last like ToTorchImage's output."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    x[0].view(-1, 3)[:256] = torch.arange(256, dtype=torch.uint8)[:, None]
    return x.permute(0, 3, 1, 2)


# ---- 17.1: normalization in float32, then the cast --------------------------------------------
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_normalize_computes_in_float32_then_rounds_once(dtype):
    """A bf16/fp16 batch is exactly the float32 normalization rounded to that dtype, keeps the
    channels-last layout, and differs from the old arithmetic in the low dtype (mean and 1/std
    rounded to bf16, then subtract and multiply in bf16) on some pixel. Catches a return to the
    low-precision arithmetic."""
    from ffcv_pipeline.torch_loader import Normalize
    x = u8_batch()
    out = Normalize(CIFAR100_MEAN, CIFAR100_STD, dtype)(x)
    f32 = Normalize(CIFAR100_MEAN, CIFAR100_STD, torch.float32)(x)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, f32.to(dtype))
    mean = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)
    ref = (x.double() - mean.double()) / torch.tensor(CIFAR100_STD).double().view(1, 3, 1, 1)
    assert (f32.double() - ref).abs().max() < 1e-6
    old = x.to(dtype).sub_(mean.to(dtype)).mul_((1 / torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)).to(dtype))
    if dtype == torch.bfloat16:
        assert (old.double() - ref).abs().max() > 5e-3  # the error the issue measured (~0.012)
    assert not torch.equal(old, out)
    assert (out.double() - ref).abs().max() <= (old.double() - ref).abs().max()


def test_normalize_leaves_a_float_input_alone():
    """The arithmetic is in place on its own copy: a float32 caller's tensor is not modified."""
    from ffcv_pipeline.torch_loader import Normalize
    x = u8_batch().float()
    before = x.clone()
    Normalize(dtype=torch.bfloat16)(x)
    assert torch.equal(x, before)
