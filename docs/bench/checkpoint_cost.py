"""Run with the checkout under test first on PYTHONPATH (docs/BENCHMARKS.md): PYTHONPATH=. python docs/bench/checkpoint_cost.py LABEL

Critical-path cost of one epoch-end checkpoint (full-width ResNet-18 + momentum, ~90 MB)."""
import sys, time, statistics, tempfile, torch
from pathlib import Path
from training.config import load_config
from training.trainer import Trainer
d = tempfile.mkdtemp(dir='/tmp')
cfg = load_config('tiny_cpu', ['training.device=cpu', f'output.dir={d}', 'output.name=s', 'data.loader=torchvision',
                               'data.train_per_class=1', 'data.test_per_class=1', 'data.batch_size=50', 'training.precision=fp32'])
tr = Trainer(cfg, log=lambda *a: None)
tr.setup()
for x, y in tr.data.train.epoch(0):
    tr.train_step(x, y, 0.01)  # momentum buffers exist
times = []
for i in range(5):
    t = time.perf_counter()
    tr.run_dir.save(tr._checkpoint(1), 'last.pt', 'best.pt')
    times.append(time.perf_counter() - t)
    time.sleep(3)  # a training epoch meanwhile
    if hasattr(tr.run_dir, 'wait'):
        tr.run_dir.wait()
print(sys.argv[1], 'critical-path seconds per save: median %.3f (all: %s); file %.1f MB' % (
    statistics.median(times), ' '.join(f'{t:.3f}' for t in times), (Path(d) / 's' / 'last.pt').stat().st_size / 2**20))
tr.data.close()
