"""The fixed costs off the critical path: the time budget from process start, the resident test
split, checkpoints written in the background, and the start-up cuts (ffcv's typed-dict import,
torch._dynamo, numba's on-disk cache). Every docstring names the mutation it catches."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import PY, ROOT, as_cli, same_weights, tiny, tv


def test_budget_spans_sum_to_the_process_wall_clock(synthetic_betons, tmp_path):
    """``scripts/train.py`` as a user runs it, timed from outside: the summary's budget holds
    every span, they sum to its total, and the total is the process's own wall-clock within 2%
    (the clock starts when the kernel started the process, imports included, and the process
    ends right after the last line). ``time_to_target_s`` counts from process start,
    ``train_seconds_to_target`` the training loops only. Catches a clock started in the trainer
    (startup missing: the total falls short), a span left out of the sum, and a slow teardown
    after the budget was taken."""
    run = tmp_path / 'run'
    args = [PY, 'scripts/train.py', '--config', 'tiny_cpu',
            *as_cli(tiny(synthetic_betons, run, **{'data.loader': 'ffcv', 'training.target_top1': 0.0}))]
    t = time.perf_counter()
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run / 'summary.json').read_text())
    b = s['time_budget']
    from training.budget import SPANS
    assert list(b) == [*SPANS, 'total']
    assert sum(v for k, v in b.items() if k != 'total') == pytest.approx(b['total'], abs=1e-3)
    assert abs(b['total'] - wall) <= 0.02 * wall, (b, wall)
    assert b['startup'] > 0.3 and b['loader_warmup'] > 0 and b['train_steps'] > 0
    assert b['evaluation'] > 0 and b['first_steps'] > 0 and b['end'] > 0
    assert abs(b['other']) < 0.02 * b['total']  # the named spans hold the time
    records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert s['epoch_reached_target'] == 1
    assert s['time_to_target_s'] == records[0]['wallclock_s'] > b['startup'] + b['loader_warmup']
    assert s['train_seconds_to_target'] == pytest.approx(records[0]['epoch_seconds'], abs=1e-3)
    assert 'time budget: ' in r.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize('batch', [50, 60])  # 200 test images: 4 full batches; 3 + a padded one
def test_resident_evaluation_equals_the_loader_evaluation(synthetic_betons, tmp_path, batch):
    """The same weights evaluated through the FFCV test loader and through the resident split
    (one uint8 tensor, fixed-shape batches, the last one padded): the same top-1, top-5 and
    image count. Catches counting the padding (n = 240), a padded label that can match a class,
    and a normalization that differs from the loader's."""
    from training.config import load_config
    from training.trainer import Trainer
    results, models = [], None
    for resident in (False, True):
        cfg = load_config('tiny_cpu', tiny(synthetic_betons, tmp_path / f'r{resident}', **{
            'data.loader': 'ffcv', 'data.batch_size': batch, 'data.resident_test': resident,
            'model.width': 16}))
        tr = Trainer(cfg, log=lambda *_: None)
        tr.setup()
        try:
            if models is None:
                models = {k: v.clone() for k, v in tr.model.state_dict().items()}
                for m in tr.model.modules():  # non-trivial BatchNorm statistics
                    if isinstance(m, torch.nn.BatchNorm2d):
                        m.running_mean.uniform_(-0.3, 0.3)
                        m.running_var.uniform_(0.5, 2.0)
                models = {k: v.clone() for k, v in tr.model.state_dict().items()}
            tr.model.load_state_dict(models)
            assert type(tr.data.test).__name__ == ('ResidentSplit' if resident else 'CifarLoader')
            top1, top5, _, n = tr.evaluate()
            results.append((top1, top5, n))
        finally:
            tr.data.close()
    assert results[0] == results[1] and results[0][2] == 200
    assert 0 < results[0][1] < 1  # not a degenerate comparison


def test_resident_batches_have_one_shape_and_the_padding_never_counts(synthetic_betons):
    """Every batch of the resident split has the training batch shape; the padding labels are
    -1; the normalized pixels are (x - mean) / std (to float32 rounding; the bits are the
    loaders' own: test_every_normalization_path_gives_the_same_bits). Catches a short last
    batch (a second cuDNN shape) and padding labels that are real classes."""
    import numpy as np
    from conftest import CIFAR100_MEAN, CIFAR100_STD
    from ffcv_pipeline.resident import PAD_LABEL, ResidentSplit, read_split
    images, labels = read_split(synthetic_betons / 'cifar100_test.beton')
    arrays, alabels = read_split(synthetic_betons / 'cifar100_test.npy')
    assert np.array_equal(images, arrays) and np.array_equal(labels, alabels)
    split = ResidentSplit(images, labels, device=torch.device('cpu'), dtype=torch.float32, batch_size=64,
                          mean=CIFAR100_MEAN, std=CIFAR100_STD)
    batches = list(split.epoch(0))
    assert len(batches) == len(split) == 4 and {tuple(x.shape) for x, _ in batches} == {(64, 3, 32, 32)}
    y = torch.cat([y for _, y in batches])
    assert (y[:200] == torch.from_numpy(labels)).all() and (y[200:] == PAD_LABEL).all()
    x0 = batches[0][0][0]
    want = (torch.from_numpy(images[0]).permute(2, 0, 1).double() - torch.tensor(CIFAR100_MEAN, dtype=torch.float64).view(3, 1, 1)) \
        / torch.tensor(CIFAR100_STD, dtype=torch.float64).view(3, 1, 1)
    assert (x0.double() - want).abs().max() < 1e-6 and batches[0][0].is_contiguous(memory_format=torch.channels_last)


def slow_save(seconds: float):
    """A checkpoint serializer that sleeps with its temporary file open before it writes."""
    def save(obj, f):
        time.sleep(seconds)
        torch.save(obj, f)
    return save


def test_a_save_in_flight_when_the_run_ends_is_complete_on_disk(ref_run_tv, synthetic_betons, tmp_path):
    """Each checkpoint write sleeps 1 s before it writes (a slow serializer passed in) while
    training goes on: the run still ends with the last epoch's last.pt complete, epoch 1's
    checkpoint holds epoch 1's weights (those of an uninterrupted run without the delay), and no
    temporary file is left. Catches a run that returns without joining the writer thread, and a
    write of the live tensors instead of their snapshot."""
    from training.config import load_config
    from training.trainer import Trainer
    run = tmp_path / 'run'
    Trainer(load_config('tiny_cpu', tv(synthetic_betons, run, **{'data.batch_size': 20, 'output.save_every': 1})),
            log=lambda *_: None, save_checkpoint=slow_save(1.0)).run()
    assert torch.load(run / 'last.pt', weights_only=True)['epoch'] == 2
    assert same_weights(ref_run_tv / 'epoch_001.pt', run / 'epoch_001.pt')
    assert not [p.name for p in run.iterdir() if p.name.startswith('.') and p.name != '.lock']


def test_the_snapshot_is_a_copy_of_the_live_state(synthetic_betons, tmp_path):
    """A checkpoint is built from copies: training on after the snapshot changes none of its
    tensors. Catches saving views of the live weights or momentum buffers (a background write
    would then mix two steps)."""
    from training.config import load_config
    from training.trainer import Trainer
    tr = Trainer(load_config('tiny_cpu', tv(synthetic_betons, tmp_path / 'run')), log=lambda *_: None)
    tr.setup()
    try:
        for x, y in tr.data.train.epoch(0):
            tr.train_step(x, y, 0.1)
            break
        ck = tr.run_dir.snapshot(tr._checkpoint(1))  # what RunFolder.save hands its writer
        frozen = {k: v.clone() for k, v in ck['model'].items()}
        momentum = [s['momentum_buffer'].clone() for s in ck['optimizer']['state'].values()]
        for x, y in tr.data.train.epoch(0):
            tr.train_step(x, y, 0.1)
        assert all(torch.equal(frozen[k], ck['model'][k]) for k in frozen)
        assert all(torch.equal(a, s['momentum_buffer']) for a, s in zip(momentum, ck['optimizer']['state'].values()))
        assert not torch.equal(frozen['fc.weight'], tr.model.fc.weight.detach())
    finally:
        tr.data.close()


SLOW_WRITER_RUN = '''
import sys, time, torch
from training.config import load_config
from training.trainer import Trainer
def save(obj, f):  # sleeps with the temporary file open: a kill -9 now leaves it behind, empty
    time.sleep(float(sys.argv[1]))
    torch.save(obj, f)
Trainer(load_config('tiny_cpu', sys.argv[2:]), config_name='tiny_cpu', save_checkpoint=save).run()
'''


def test_kill_9_while_a_background_write_is_in_flight_resumes_exactly(ref_run_tv, synthetic_betons, tmp_path):
    """A real ``kill -9`` of a training process while epoch 2's checkpoint is being written in
    the background (its serializer sleeps 4 s before each write; the kill comes ~0.3 s into
    epoch 2's): last.pt is epoch 1's, complete, and resuming it in a new process ends on the
    uninterrupted (in-process) run's weights. Catches a write that replaces last.pt before it
    is complete. (The reference used to differ from the processes' weights whenever ffcv had
    been imported before it: ffcv set torch's thread count; ffcv_patches, patch 5.)"""
    ref = ref_run_tv
    run = tmp_path / 'killed'
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    p = subprocess.Popen([PY, '-c', SLOW_WRITER_RUN, '4', *tv(synthetic_betons, run, **{'data.batch_size': 20})],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in p.stdout:  # epoch 2 has been logged: its save waits for epoch 1's, then sleeps
            if line.startswith('epoch   2/2'):
                break
        deadline = time.monotonic() + 60
        while not (run / 'last.pt').exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # epoch 1's write has landed; epoch 2's is in flight
        time.sleep(0.3)
        assert p.poll() is None, 'the run ended before it could be killed'
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    assert same_weights(ref / "epoch_001.pt", run / "last.pt")  # epoch 1, complete
    assert [p for p in run.glob('.last.pt.*.tmp')]  # the killed write's temporary file (empty)
    r = subprocess.run([PY, 'scripts/train.py', '--resume', run / 'last.pt', '--output.progress', 'off'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert same_weights(ref / 'last.pt', run / 'last.pt')
    assert not [p.name for p in run.iterdir() if p.name.startswith('.') and p.name != '.lock']  # cleaned up


@pytest.fixture(scope='module')
def ref_run_tv(synthetic_betons, tmp_path_factory):
    """An uninterrupted 2-epoch run (torchvision loader, batch 20)."""
    from training.trainer import train
    out = tmp_path_factory.mktemp('ref') / 'ref'
    train('tiny_cpu', tv(synthetic_betons, out, **{'data.batch_size': 20, 'output.save_every': 1}),
          log=lambda *_: None)
    return out


def test_eager_training_steps_import_no_dynamo_and_match_plain_sgd():
    """Building the optimizer and taking steps in a fresh process imports no ``torch._dynamo``
    (0.9 s), and the weights equal those of torch's own ``SGD.step`` bit for bit. Catches torch
    changing the wrappers we rely on (the import comes back) and a step that differs."""
    code = '''
import sys, torch
from model import build_model
from training.config import load_config
from training.optim import make_optimizer
from training.step import TrainStep
cfg = load_config('tiny_cpu', ['model.width=8'])
runs = []
for eager in (True, False):
    torch.manual_seed(0)
    m = build_model({'arch': 'resnet18', 'num_classes': 100, 'width': 8, 'channels_last': False})
    step = TrainStep(m, make_optimizer(m, cfg.training, eager=eager), device=torch.device('cpu'), dtype=torch.float32)
    x, y = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(8)
    for _ in range(3):
        step(x, y, 0.1)
    step.optimizer.load_state_dict(step.optimizer.state_dict())
    runs.append(m.state_dict())
    if eager:
        print('dynamo imported:', 'torch._dynamo' in sys.modules)
print('same:', all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0]))
'''
    r = subprocess.run([PY, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'dynamo imported: False' in r.stdout and 'same: True' in r.stdout, r.stdout


def test_ffcv_imports_without_compiling_a_typed_dict():
    """``load_ffcv`` hands ffcv a plain dict for its image-mode table (2.5 s less import) and
    restores numba's ``Dict``. Catches ffcv 1.0.2 changing the table (a different type or
    entries: the patch would then be wrong) and a patch that leaks into numba."""
    code = '''
import numba.typed, sys
from ffcv_pipeline import load_ffcv
load_ffcv()
import ffcv.fields.rgb_image as r
print(type(r.IMAGE_MODES).__name__, sorted(r.IMAGE_MODES.items()), numba.typed.Dict is dict)
'''
    r = subprocess.run([PY, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ['dict', "[('jpg',", "0),", "('raw',", '1)]', 'False']


def test_our_kernels_come_from_numba_s_disk_cache(synthetic_betons, tmp_path):
    """The first process on a machine (here: an empty cache folder) compiles the augmentation
    kernels, every op's body, the random key and the normalization kernel; the next process
    loads every one of them from numba's disk cache (no compilation) while it builds the
    training pipeline. Catches a kernel or body that cannot be cached (a closure, a signature
    that specializes on the op) -- 2-5 s of JIT per training process."""
    code = f'''
from pathlib import Path
import torch
from training.config import load_config
from ffcv_pipeline.data import build_data
from ffcv_pipeline import kernels, ops
cfg = load_config('tiny_cpu', ['data.train_path={synthetic_betons / "cifar100_train.beton"}',
                               'data.test_path={synthetic_betons / "cifar100_test.beton"}', 'data.loader=ffcv',
                               'augment.brightness=0.2'])
d = build_data(cfg, device=torch.device('cpu'), dtype=torch.float32, root=Path('.'), workers=2)
for _ in d.train.epoch(0):
    break
fs = kernels.cached_functions() + [ops.normalize_kernel]
hits = lambda f: f.cache_hits if hasattr(f, 'cache_hits') else sum(f.stats.cache_hits.values())  # cfunc | jit
print(len(fs), 'loaded', sum(min(hits(f), 1) for f in fs))
'''
    from ffcv_pipeline.augment import OPS
    n = 3 + len(OPS) + 1  # two kernels, the key, every body, normalization
    # numba's default optimization, as a training run has it (at the tests' NUMBA_OPT=0, code that
    # inlines the hash's 64-bit constants is not cacheable: "uses dynamic globals")
    env = {**{k: v for k, v in os.environ.items() if k != 'NUMBA_OPT'},
           'NUMBA_CACHE_DIR': str(tmp_path / 'numba-cache')}
    r = subprocess.run([PY, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and r.stdout.split()[-3:] == [str(n), 'loaded', '0'], r.stdout + r.stderr[-2000:]
    r = subprocess.run([PY, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and r.stdout.split()[-3:] == [str(n), 'loaded', str(n)], r.stdout + r.stderr[-2000:]
