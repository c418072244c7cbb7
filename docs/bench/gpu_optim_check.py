"""GPU check of issue 26's optimizer changes, never run on a GPU yet: SGD, fused SGD, Muon (and
fused), AdamW train a full ResNet-18 under bf16 for 30 steps on a learnable synthetic task (labels
linear in the pixels; the loss should fall from ~4.9), and the CUDA-graph step
(fused SGD, one LR tensor per distinct peak LR) equals the eager fused step.

    python docs/bench/gpu_optim_check.py      # from the repository root, on a CUDA host (~1 min)
    python docs/bench/gpu_optim_check.py --rehearse   # the same lines on the CPU, small (~25 s)

Rehearsed on the CPU (2 cores, 2026-12-04, 8 steps of 32): every optimizer's loss fell from
4.92 (SGD/fused 2.55, Muon/fused 2.86, AdamW 4.61); at a tenth of the peak LR without warm-up
SGD and Muon diverged there, hence 2% of it.

For the device runbook (../shared/gpu/README.md): an EXTRA command after the sweep, with the
kit's PYTHONPATH (it needs torch, omegaconf and this checkout, not ffcv). Prints one line per
optimizer and one for the graph; record them in docs/BENCHMARKS.md.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch
from model import build_model
from training.config import load_config
from training.optim import make_optimizer
from training.step import TrainStep
REHEARSE = '--rehearse' in sys.argv  # CPU, 32 images a batch, 8 steps, no CUDA graph
dev = torch.device('cpu' if REHEARSE else 'cuda')
STEPS, BATCH = (8, 32) if REHEARSE else (30, 256)
print(torch.__version__, 'cpu (rehearsal)' if REHEARSE else torch.cuda.get_device_name(0), flush=True)
g = torch.Generator(device='cpu').manual_seed(1)
W = torch.randn(3 * 32 * 32, 10, generator=g)  # a learnable task: 10 of the 100 classes, linear in the pixels
xs = [torch.randn(BATCH, 3, 32, 32, generator=g) for _ in range(4)]
batches = [(x.to(dev).contiguous(memory_format=torch.channels_last), (x.flatten(1) @ W).argmax(1).to(dev)) for x in xs]

def sync():
    if not REHEARSE:
        torch.cuda.synchronize()


def run(overrides, steps=STEPS, graph=False):
    cfg = load_config('rn18.yaml', [f'training.device={dev.type}', 'model.num_classes=100', *overrides])
    torch.manual_seed(0)
    m = build_model(cfg.model, device=dev)
    step = TrainStep(m, make_optimizer(m, cfg.training, eager=not graph), device=dev, dtype=torch.bfloat16,
                     label_smoothing=0.1, cuda_graph=graph)
    losses = []
    sync(); t = time.perf_counter()
    for i in range(steps):
        x, y = batches[i % 4]
        losses.append(step(x, y, 0.02 * min(1.0, (i + 1) / 5))[0])  # 5 steps of warm-up to 2% of the peak LR (no real warm-up here)
    sync(); dt = time.perf_counter() - t
    losses = [float(l) for l in losses]
    return losses, m.state_dict(), dt

for name, ov in (('sgd', []), ('sgd fused', ['training.fused_sgd=true']), ('muon', ['training.optimizer=muon']),
                 ('muon fused', ['training.optimizer=muon', 'training.fused_sgd=true']),
                 ('adamw', ['training.optimizer=adamw', 'training.lr=0.002', 'training.weight_decay=0.05'])):
    l, _, dt = run(ov)
    print(f'{name}: loss {l[0]:.3f} -> {l[-1]:.3f} (min {min(l):.3f}), {STEPS} steps {dt:.2f} s', flush=True)

# the CUDA graph (fused SGD, one LR tensor per distinct peak LR) against the eager fused step
if REHEARSE:
    sys.exit(print('cuda graph: skipped in the CPU rehearsal'))
le, we, _ = run(['training.fused_sgd=true'], steps=12)
lg, wg, dt = run(['training.cuda_graph=true'], steps=12, graph=True)
diff = max((we[k].float() - wg[k].float()).abs().max().item() for k in we if we[k].is_floating_point())
print(f'cuda graph: losses eager {[round(x, 4) for x in le[:4]]} graph {[round(x, 4) for x in lg[:4]]}; '
      f'last {le[-1]:.4f} vs {lg[-1]:.4f}; max weight diff {diff:.2e}', flush=True)
try:
    load_config('rn18.yaml', ['training.optimizer=muon', 'training.cuda_graph=true'])
except Exception as e:
    print('muon + cuda_graph:', e)
