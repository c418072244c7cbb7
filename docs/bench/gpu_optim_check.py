"""GPU check of issue 26's optimizer changes, never run on a GPU yet: SGD, fused SGD, Muon (and
fused), AdamW train a full ResNet-18 under bf16 for 30 steps (loss falls), and the CUDA-graph step
(fused SGD, one LR tensor per distinct peak LR) equals the eager fused step.

    python docs/bench/gpu_optim_check.py      # from the repository root, on a CUDA host (~1 min)

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
dev = torch.device('cuda')
print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
g = torch.Generator(device='cpu').manual_seed(1)
batches = [(torch.randn(256, 3, 32, 32, generator=g).to(dev).contiguous(memory_format=torch.channels_last),
            torch.randint(0, 100, (256,), generator=g).to(dev)) for _ in range(4)]

def run(overrides, steps=30, graph=False):
    cfg = load_config('rn18.yaml', ['training.device=cuda', *overrides])
    torch.manual_seed(0)
    m = build_model(cfg.model, device=dev)
    step = TrainStep(m, make_optimizer(m, cfg.training, eager=not graph), device=dev, dtype=torch.bfloat16,
                     label_smoothing=0.1, cuda_graph=graph)
    losses = []
    torch.cuda.synchronize(); t = time.perf_counter()
    for i in range(steps):
        x, y = batches[i % 4]
        losses.append(step(x, y, 0.5)[0])
    torch.cuda.synchronize(); dt = time.perf_counter() - t
    losses = [float(l) for l in losses]
    return losses, m.state_dict(), dt

for name, ov in (('sgd', []), ('sgd fused', ['training.fused_sgd=true']), ('muon', ['training.optimizer=muon']),
                 ('muon fused', ['training.optimizer=muon', 'training.fused_sgd=true']),
                 ('adamw', ['training.optimizer=adamw', 'training.lr=0.002', 'training.weight_decay=0.05'])):
    l, _, dt = run(ov)
    print(f'{name}: loss {l[0]:.3f} -> {l[-1]:.3f} (min {min(l):.3f}), 30 steps {dt:.2f} s', flush=True)

# the CUDA graph (fused SGD, one LR tensor per distinct peak LR) against the eager fused step
le, we, _ = run(['training.fused_sgd=true'], steps=12)
lg, wg, dt = run(['training.cuda_graph=true'], steps=12, graph=True)
diff = max((we[k].float() - wg[k].float()).abs().max().item() for k in we if we[k].is_floating_point())
print(f'cuda graph: losses eager {[round(x, 4) for x in le[:4]]} graph {[round(x, 4) for x in lg[:4]]}; '
      f'last {le[-1]:.4f} vs {lg[-1]:.4f}; max weight diff {diff:.2e}', flush=True)
try:
    load_config('rn18.yaml', ['training.optimizer=muon', 'training.cuda_graph=true'])
except Exception as e:
    print('muon + cuda_graph:', e)
