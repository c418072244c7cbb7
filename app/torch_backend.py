"""The PyTorch backend of ``app.predictor``: a training or exported checkpoint (``.pt``) or a model
repository's ``model.safetensors`` + ``config.json`` (``model.modelfile``), served
with every BatchNorm folded into the conv before it (``torch.fx`` ``fuse``; logits match the
plain model to ~1e-6) under ``torch.inference_mode``, channels-last; ``compile_model=True``
adds ``torch.compile`` with frozen weights. Measured on the 2-core Xeon (Sapphire Rapids, KVM),
idle, ResNet-18 width 64:

    python scripts/predict.py cifar32.png --checkpoint rn18.pt --benchmark 200 [--compile]
    -> p50 8.4-9.0 ms eager, 6.4-7.0 ms compiled (docs/BENCHMARKS.md "Serving")

Tried and not kept as the default: TorchScript trace+freeze (~0.5 ms faster, deprecated in
torch 2.14), ``optimize_for_inference`` and ``to_mkldnn`` (slower at batch 1), contiguous NCHW
(no faster), 1 thread (14 ms), bf16 on AMX (~25% faster but logits differ by ~5e-3).
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from model.checkpoint import CheckpointError, model_from_checkpoint
from model.modelfile import load_model_file
from model.resnet import count_parameters

try:
    from .modelmeta import ModelFileError, ModelMeta
except ImportError:  # a flat Space folder: this file's folder is on sys.path
    from modelmeta import ModelFileError, ModelMeta


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """The model with each BatchNorm folded into the conv before it (eval only): one op less per
    conv, same maths. Returns the model unchanged if ``torch.fx`` cannot trace it."""
    try:
        from torch.fx.experimental.optimization import fuse
        fused = fuse(model.eval(), inplace=False)
    except Exception as e:  # an untraceable model: serve it unfused, results are the same
        warnings.warn(f'BatchNorm folding skipped ({type(e).__name__}: {e})')
        return model
    return fused.to(memory_format=torch.channels_last).eval()


def compile_for_cpu(model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module | None:
    """``torch.compile`` (Inductor) with weight freezing, for inputs shaped like ``example``.

    Freezing constant-folds the weights, prepacks them for oneDNN and fuses conv+add+relu:
    ~1.4x faster at batch 1 here. Costs 5-30 s at start-up (cached in /tmp/torchinductor_*) and
    needs a C++ compiler (the app does it by default, the CLI on ``--compile``); returns
    ``None`` (serve the eager model) if it fails.
    """
    try:
        import torch._inductor.config as inductor_config
        compiled = torch.compile(model, dynamic=False)
        # freezing applies to inference-mode graphs, compiled at this first call
        with inductor_config.patch(freezing=True), torch.inference_mode():
            compiled(example)
        return compiled
    except Exception as e:  # no compiler, unsupported platform, ...: still correct, just slower
        warnings.warn(f'torch.compile failed, serving the eager model ({type(e).__name__}: '
                      f'{str(e).splitlines()[0] if str(e) else ""})')
        return None


class TorchBackend:
    """``checkpoint``: a path (a ``.pt`` checkpoint, or ``model.safetensors`` + ``config.json``:
    their folder or either file; validated by ``model.modelfile.load_model_file``) or a loaded
    checkpoint dict. ``optimize``: fold BatchNorm (default). ``compile_model``: also compile for
    single images; other batch sizes use the eager model, so nothing recompiles.
    ``num_threads``: ``torch.set_num_threads`` (process-wide); default: torch's (all cores)."""
    name = 'torch'

    def __init__(self, checkpoint: str | os.PathLike | dict, *, optimize: bool = True,
                 compile_model: bool = False, num_threads: int | None = None):
        what = 'checkpoint' if isinstance(checkpoint, dict) else str(checkpoint)
        try:
            ckpt = checkpoint if isinstance(checkpoint, dict) else load_model_file(checkpoint)
            plain = model_from_checkpoint(ckpt, channels_last=True, what=what)
        except CheckpointError as e:
            raise ModelFileError(str(e)) from None
        if num_threads:
            torch.set_num_threads(num_threads)
        self.meta = ModelMeta.from_checkpoint(ckpt, count_parameters(plain))
        self.meta.check(what)
        self.model = fold_batchnorm(plain) if optimize else plain
        example = torch.zeros(1, 3, self.meta.image_size, self.meta.image_size
                              ).contiguous(memory_format=torch.channels_last)
        self.compiled = compile_for_cpu(self.model, example) if compile_model else None
        self.description = (f'PyTorch {torch.__version__.split("+")[0]}'
                            + (', BatchNorm folded' if optimize else '')
                            + (', compiled' if self.compiled is not None else ''))
        self.logits(example.numpy())  # warm-up: oneDNN creates its kernels at the first call

    @torch.inference_mode()
    def logits(self, x: np.ndarray) -> np.ndarray:
        """Normalized N x 3 x H x W float32 -> N x classes float32 logits."""
        t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
        model = self.compiled if self.compiled is not None and t.shape[0] == 1 else self.model
        return model(t).float().numpy()

