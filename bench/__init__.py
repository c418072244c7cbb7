"""The laboratory: what measures the product, kept apart from it (timm keeps its benchmark
beside its library, not inside it).

    python scripts/benchmark.py     # bench/benchmark.py: loaders, the trainer's step, full epochs
    python scripts/speedrun.py      # bench/speedrun.py: time to 73% over seeds, fresh processes
    python scripts/gpu_sweep.py     # bench/sweep.py: issue 17's levers in one prepared GPU call

This package imports the product (``training``, ``ffcv_pipeline``, ``model``); the product never
imports it (tests/test_layout.py checks).
"""
from __future__ import annotations


def environment(device) -> dict:
    """What a measurement ran on, for every result file of the lab (one definition)."""
    import contextlib
    import platform
    import sys
    import time
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from ffcv_pipeline import ffcv_version
    from training.runtime import device_name, usable_cores

    def pinned(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:  # the offline GPU host's kit lacks some metadata
            return None
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    device = torch.device(device)
    return {'device': device_name(device), 'cpu': cpu, 'cores': usable_cores(),
            'gpu': torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
            'python': sys.version.split()[0], 'torch': str(torch.__version__),
            'torchvision': pinned('torchvision'), 'ffcv': ffcv_version(), 'numba': pinned('numba'),
            'numpy': pinned('numpy'), 'torch_threads': torch.get_num_threads(),
            'date': time.strftime('%Y-%m-%d %H:%M')}
