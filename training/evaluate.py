"""Test-set evaluation: top-1 / top-5 counts over batches of a loader or of the resident split.

    sums = evaluate(net, data.test, device=dev, dtype=torch.bfloat16, tta_flip=True)
    top1, top5, n = D.all_reduce_sum(sums).tolist()     # counts: exact over torchrun shards

Labels below zero are padding (``ffcv_pipeline.resident.PAD_LABEL``: the resident split's last
batch is filled up to the training batch shape); no prediction matches them and they are not
counted. Counts stay on the device (no host sync per batch).
"""
from __future__ import annotations

import torch

from .runtime import accum_dtype, autocast
from .tta import tta_logits


# not inference_mode: the FFCV test loader allocates its buffers in here and writes them from its
# own thread, where an inference tensor may not be written in place
@torch.no_grad()
def evaluate(net: torch.nn.Module, batches, *, device: torch.device, dtype: torch.dtype,
             tta_flip: bool = True, tta_translate: int = 0) -> torch.Tensor:
    """``[top-1 correct, top-5 correct, images]`` over ``batches.epoch(0)``, on the device."""
    sums = torch.zeros(3, device=device, dtype=accum_dtype(device))
    net.eval()
    for x, y in batches.epoch(0):
        with autocast(device, dtype):
            logits = tta_logits(net, x, flip=tta_flip, translate=tta_translate)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # a 3-class dataset: its top-3
        sums[0] += (top5[:, 0] == y).sum()
        sums[1] += (top5 == y[:, None]).any(1).sum()
        sums[2] += (y >= 0).sum()
    return sums
