"""Where and how the maths runs: device, precision, autocast, synchronization, cores, seeds.

Shared by the trainer and the benchmark, so both run the same precision and the same kernels.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from .config import ConfigError
from .distributed import DistInfo


def usable_cores() -> int:
    """CPUs this process may run on (a container's cgroup/affinity limit, not the host's count:
    ``numba.set_num_threads`` refuses more than that)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def workers_per_process(requested: int) -> int:
    """``requested`` if > 0, else all usable cores shared among the processes torchrun started
    on this node (``-1``, the convention of every script: all cores)."""
    return requested if requested > 0 else max(1, usable_cores() // int(os.environ.get('LOCAL_WORLD_SIZE', 1)))


def mps_available() -> bool:
    return torch.backends.mps.is_available()


def resolve_device(name: str, info: DistInfo = DistInfo()) -> torch.device:
    """``auto``: CUDA, else Apple's MPS, else the CPU. An unavailable choice is a ConfigError
    naming what there is."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'mps' if mps_available() else 'cpu'
    here = ', '.join(['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
                     + (['mps'] if mps_available() else []))
    if name.startswith('cuda'):
        if not torch.cuda.is_available():
            raise ConfigError(f'training.device: {name!r} requested but CUDA is not available here '
                              f'(available: {here})')
        if name == 'cuda':
            name = f'cuda:{info.local_rank}'
        elif info.enabled:
            raise ConfigError(f'training.device: {name!r} would put every torchrun process on one '
                              f'GPU; use cuda (each process takes its LOCAL_RANK)')
        dev = torch.device(name)
        torch.cuda.set_device(dev)
        return dev
    if name == 'mps':
        if not mps_available():
            raise ConfigError(f"training.device: 'mps' requested but MPS is not available here (it "
                              f"needs Apple silicon and macOS' torch build; available: {here})")
        if info.enabled:
            raise ConfigError("training.device: 'mps' does not support torchrun (DDP); run one process")
        return torch.device('mps')
    return torch.device('cpu')


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that have it natively, else fp16 (+ gradient scaling); fp16 on MPS
    (its bf16 needs macOS 14+); on the CPU bf16 where it has native bf16 instructions
    (AVX512-BF16, AMX: oneDNN's bf16 kernels; on our Zen 4 cores a ResNet-18 training step ran
    1.74x and evaluation 1.87x faster than fp32, docs/BENCHMARKS.md), else fp32."""
    if name == 'auto':
        if device.type == 'cuda':
            # native bf16 (Ampere and newer); V100/T4 would only emulate it: fp16 + scaler there
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        if device.type == 'cpu':
            return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        return torch.float16
    if name == 'fp16' and device.type == 'cpu':
        raise ConfigError("training.precision: 'fp16' is not supported on the CPU; use one of "
                          "['auto', 'bf16', 'fp32']")
    if name == 'bf16' and device.type == 'mps' and not _mps_bf16():
        raise ConfigError("training.precision: 'bf16' on MPS needs macOS 14 or newer; use one of "
                          "['auto', 'fp16', 'fp32']")
    return {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}[name]


def cpu_has_native_bf16() -> bool:
    """Does this CPU run oneDNN's bf16 kernels natively (AVX512-BF16 or AMX), not emulated?"""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _mps_bf16() -> bool:
    check = getattr(torch.backends.mps, 'is_macos_or_newer', None)
    return bool(check and check(14, 0))


def accum_dtype(device: torch.device) -> torch.dtype:
    """For on-device sums (loss, correct counts): float64, except on MPS, which has none."""
    return torch.float32 if device.type == 'mps' else torch.float64


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``'bfloat16'`` (logs, summaries, benchmark tables)."""
    return str(dtype).removeprefix('torch.')


def autocast(device: torch.device, dtype: torch.dtype, cache_enabled: bool = True):
    """The one AMP context: a no-op for fp32, so there is no separate fp32 code path.
    (``cache_enabled=False`` while a CUDA graph is captured: its cast weights must not outlive it.)"""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32,
                          cache_enabled=cache_enabled)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (before reading a clock); nothing to wait for on the CPU."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'mps':
        torch.mps.synchronize()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def configure_backends(*, deterministic: bool = False) -> None:
    """cuDNN autotuning and TF32 (fastest; the flags only matter on CUDA); ``deterministic``
    trades autotuning for bit-exact repeatability (cuDNN's deterministic algorithms): a resumed
    GPU run then continues exactly, as a CPU run always does."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' or 'cpu (2 cores)', for summaries and benchmark tables."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    if device.type == 'mps':
        return 'Apple MPS'
    return f'{device.type} ({usable_cores()} cores)'
