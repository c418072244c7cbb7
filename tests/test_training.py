"""Training on the CPU with a narrow ResNet-18 (width 8) on the synthetic data: learning,
metrics/summary/plot, checkpoints, config errors, the class-balanced subset, DDP, the
threading layer and CPU affinity. Resuming and interruptions: test_resume.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import PY, ROOT, as_cli, run_main, same_weights, tiny, weights
from conftest import BETON_NAMES, FINE_LABEL_NAMES
from model import build_model, count_parameters


def test_resnet18_parameter_count_and_layout():
    m = build_model({'arch': 'resnet18', 'num_classes': 100})
    assert count_parameters(m) == 11_220_132
    assert m.stem[0].kernel_size == (3, 3) and m.stem[0].stride == (1, 1)
    assert not any(isinstance(x, torch.nn.MaxPool2d) for x in m.modules())
    assert m.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    assert m(x).shape == (2, 100)


def test_two_epochs_lower_the_loss_and_write_everything(baseline_run):
    out, summary, logs = baseline_run
    records = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [1, 2]
    assert records[1]['train_loss'] < records[0]['train_loss']
    for r in records:
        for key in ('lr', 'train_loss', 'train_acc', 'test_top1', 'test_top5', 'epoch_seconds',
                    'train_images_per_s', 'wallclock_s'):
            assert isinstance(r[key], float) and r[key] >= 0, key
        assert r['train_images'] == 400 and r['test_images'] == 200
        assert 0 < r['data_wait_fraction'] < 1  # the time spent waiting for batches, measured
    assert records[1]['wallclock_s'] > records[0]['wallclock_s']
    s = json.loads((out / 'summary.json').read_text())
    assert s == summary
    assert s['best_top1'] == max(r['test_top1'] for r in records)
    assert s['numba_compile_seconds'] > 0 and s['total_seconds'] >= records[-1]['wallclock_s']
    assert s['target_top1'] == 0.05 and (s['time_to_target_s'] is None) == (s['best_top1'] < 0.05)
    # images/s: the median over the epochs after the first (here: the second one's)
    assert s['median_train_images_per_s'] == records[1]['train_images_per_s']
    assert s['median_data_wait_fraction'] == records[1]['data_wait_fraction']
    assert s['loader'] == 'ffcv' and s['gpu'] is None and s['device'].startswith('cpu (')
    assert any('ffcv loader with 2 workers' in line for line in logs)
    assert (out / 'curves.png').read_bytes()[:4] == b'\x89PNG'
    assert {'last.pt', 'best.pt', 'epoch_001.pt', 'epoch_002.pt', 'config.yaml'} <= {p.name for p in out.iterdir()}
    assert not [p.name for p in out.iterdir() if p.name.startswith('.') and p.name != '.lock']  # no temporary files
    ck = torch.load(out / 'last.pt', map_location='cpu', weights_only=True)
    assert ck['format'] == 'cifar100-ffcv-checkpoint' and ck['epoch'] == 2 and ck['step'] == 16
    assert ck['class_names'] == list(FINE_LABEL_NAMES) and len(ck['fine_to_coarse']) == 100
    assert ck['normalization']['scale'] == 255 and len(ck['normalization']['mean']) == 3
    assert ck['config']['model']['width'] == 8 and ck['model_config']['arch'] == 'resnet18'
    assert {'optimizer', 'scaler', 'rng'} <= set(ck)
    best = torch.load(out / 'best.pt', map_location='cpu', weights_only=True)
    assert best['metrics']['test_top1'] == s['best_top1'] and best['epoch'] == s['best_epoch']
    e1 = torch.load(out / 'epoch_001.pt', map_location='cpu', weights_only=True)
    assert e1['epoch'] == 1 and e1['step'] == 8  # a separate file, not a link to the last one


def test_time_to_target_and_the_wall_clock_plot(tmp_path):
    """The summary's time-to-accuracy and images/s come from the records, and curves.png has
    the wall-clock panel with the target line (4 panels)."""
    from training.metrics import plot_curves, summarize
    rec = [{'epoch': e, 'lr': 0.1, 'train_loss': 4 - e, 'train_acc': 0.1 * e, 'test_top1': t,
            'test_top5': min(1, 2 * t), 'epoch_seconds': 2.0, 'eval_seconds': 0.5,
            'train_images_per_s': ips, 'wallclock_s': 10.0 + 3 * e}
           for e, t, ips in ((1, 0.5, 100.0), (2, 0.74, 300.0), (3, 0.72, 200.0), (4, 0.76, 250.0))]
    s = summarize(rec, target=0.73)
    assert (s['time_to_target_s'], s['epoch_reached_target']) == (16.0, 2)
    assert (s['best_top1'], s['best_epoch'], s['final_top1']) == (0.76, 4, 0.76)
    assert s['median_train_images_per_s'] == 250.0  # epochs 2-4; the first carries warm-up
    assert summarize(rec, target=0.9)['time_to_target_s'] is None
    import matplotlib.image
    plot_curves(rec, tmp_path / 'c.png', title='t', target=0.73)
    img = matplotlib.image.imread(tmp_path / 'c.png')
    assert img.shape[1] == 2500 and img.shape[0] == 400  # 5 panels (the last: the time budget) of 5 x 4 inches at 100 dpi


@pytest.mark.parametrize('args, expected', [
    (['--training.epoch', '3'], "unknown key 'training.epoch'"),
    (['--training.epochs', 'two'], "'training.epochs'"),
    (['--training.precision', 'fp8'], "training.precision: 'fp8' is not one of"),
    (['--data.batch_size', '0'], 'data.batch_size: must be > 0'),
    (['--data.loader', 'foo'], "data.loader: 'foo' is not one of ['auto', 'ffcv', 'torchvision']"),
    (['--training.device', 'tpu'], "training.device: 'tpu' is not one of ['auto', 'cpu', 'cuda', 'cuda:N', 'mps']"),
    (['--training.device', 'mps'], "training.device: 'mps' requested but MPS is not available here"),
    (['--training.device', 'cuda'], "training.device: 'cuda' requested but CUDA is not available here"),
    (['--data.train_path', '/nonexistent.beton'], '/nonexistent.npy: no such file (the torchvision loader reads'),
    (['--data.train_path', '/nonexistent.beton', '--data.loader', 'ffcv'], '/nonexistent.beton: no such .beton file'),
    (['--config', 'no_such_config'], "config 'no_such_config' not found"),
    (['--resume', '/nonexistent/last.pt'], 'no such checkpoint file'),
])
def test_config_errors_are_one_clear_line(args, expected):
    """In-process (the subprocess adds nothing here): exit code 2, one ``error:`` line."""
    if torch.cuda.is_available() and 'cuda' in args:
        pytest.skip('this machine has CUDA')
    argv = args if args[0] in ('--config', '--resume') else ['--config', 'tiny_cpu', '--data.loader',
                                                             'torchvision', *args]
    code, out, err = run_main('train', *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error: ') and expected in lines[0], err


def test_bad_yaml_is_rejected(tmp_path):
    from training.config import ConfigError, load_config
    bad = tmp_path / 'dup.yaml'
    bad.write_text('training:\n  epochs: 3\n  epochs: 4\n')
    with pytest.raises(ConfigError, match='duplicate key'):
        load_config(bad)
    bad.write_text('training:\n  lrr: 0.1\n')
    with pytest.raises(ConfigError, match="unknown key 'training.lrr'"):
        load_config(bad)


def test_shipped_configs_load():
    from training.config import load_config
    for p in sorted((ROOT / 'configs').glob('*.yaml')):
        load_config(p)  # validates every key (a ConfigError names the file and the key)
    rn18, default = load_config('rn18.yaml'), load_config(None)
    assert rn18.model.arch == 'resnet18' and rn18.training.target_top1 == 0.73
    # one source for each default: rn18.yaml's recipe is the schema's
    for key in ('training.warmup_epochs', 'augment.cutout', 'augment.translate', 'training.lr',
                'data.batch_size', 'training.label_smoothing'):
        section, name = key.split('.')
        assert rn18[section][name] == default[section][name], key
    ref = load_config('rn18_reference.yaml')
    assert (ref.data.batch_size, ref.training.lr, ref.training.warmup_epochs, ref.training.epochs,
            ref.training.schedule, ref.training.label_smoothing, ref.augment.cutout) == \
        (128, 0.1, 5.0, 100, 'cosine', 0.1, 16)


def test_class_balanced_subset_takes_effect(synthetic_betons, tmp_path):
    """``data.train_per_class=3`` on 4 images per class: 300 images, exactly 3 of each class,
    really trained on (the epoch's image count). Catches a subset that is computed but not
    applied, or that takes the first 300 images whatever their class."""
    from training.config import load_config
    from training.trainer import Trainer
    cfg = load_config('tiny_cpu', tiny(synthetic_betons, tmp_path / 'sub', **{
        'data.train_per_class': 3, 'data.loader': 'torchvision', 'training.epochs': 1}))
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.run()
    labels = np.load(synthetic_betons / 'cifar100_train.npy')['label']
    counts = np.bincount(labels[trainer.data.train.indices], minlength=100)
    assert counts.tolist() == [3] * 100
    record = json.loads((tmp_path / 'sub' / 'metrics.jsonl').read_text())
    assert record['train_images'] == 300  # 6 batches of 50


def test_training_the_test_split_warns(synthetic_betons, tmp_path):
    """The manifest knows which file is the test split: training on it is allowed, with a warning."""
    test_file = synthetic_betons / BETON_NAMES['test']
    code, out, err = run_main('train', '--config', 'tiny_cpu', *as_cli(tiny(synthetic_betons, tmp_path / 'tt', **{
        'data.train_path': test_file, 'data.loader': 'torchvision', 'training.epochs': 1})))
    assert code == 0, err
    warnings = [l for l in out.splitlines() if l.startswith('warning:')]
    assert len(warnings) == 1 and 'is the TEST split' in warnings[0] and str(test_file.with_suffix('.npy')) in warnings[0]


DDP_PROBE = '''
import sys, torch, torch.distributed as dist
from training.config import load_config
from training.trainer import Trainer
out, index_beton, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
t = Trainer(load_config('tiny_cpu', overrides), log=lambda *a: None)
t.run()
t.data.train.sampler.epoch = 0  # the samples this rank trained on in epoch 0
seen = torch.tensor([int(i) for _, idx in t.data.train.sampler for i in idx])
# FFCV's own distributed order, through make_loader: labels hold the sample index here
from ffcv.fields.basics import IntDecoder
from ffcv.transforms import ToTensor
from ffcv_pipeline.loaders import make_loader
ld = make_loader(index_beton, batch_size=10, num_workers=1, order='quasi_random', os_cache=True,
                 drop_last=True, distributed=True, seed=0,
                 pipelines={'image': None, 'label': [IntDecoder(), ToTensor()]})
ffcv_seen = {e: torch.cat([y.ravel().clone() for (y,) in ld.epoch(e)]) for e in (0, 1)}
torch.save({'weights': t.model.state_dict(), 'seen': seen, 'ffcv': ffcv_seen}, f'{out}/rank{t.info.rank}.pt')
'''


def index_beton(path):
    """A .beton whose labels are the sample indices (200 samples)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class DS:
        def __len__(self): return 200
        def __getitem__(self, i): return np.zeros((32, 32, 3), np.uint8), i
    DatasetWriter(str(path), {'image': RGBImageField(write_mode='raw'), 'label': IntField()},
                  num_workers=1).from_indexed_dataset(DS())
    return path


def test_ddp_ranks_stay_in_sync_on_their_shards(synthetic_betons, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): each rank trains on its own half of the data
    (disjoint shards: a loader that shards nothing is caught), both ranks end on identical
    weights (the gradient all-reduce works: removing the DDP wrapper makes them differ), which
    differ from one process training alone with the same per-process batch. Rank 0 alone writes.
    The same two processes check FFCV's distributed loading through make_loader: each sample
    goes to exactly one rank, and the split changes between epochs."""
    from training.trainer import train
    run = tmp_path / 'ddp'
    probe = tmp_path / 'probe.py'
    probe.write_text(DDP_PROBE)
    overrides = tiny(synthetic_betons, run, **{'data.num_workers': 1, 'data.batch_size': 25,
                                               'data.loader': 'torchvision'})
    r = subprocess.run([PY, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        str(probe), str(tmp_path), index_beton(tmp_path / 'index.beton'), *overrides],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f'rank{i}.pt', weights_only=True) for i in (0, 1)]
    (r0, s0), (r1, s1) = ((d['weights'], d['seen']) for d in ranks)
    assert len(s0) == len(s1) == 200 and not set(s0.tolist()) & set(s1.tolist())  # disjoint shards
    for e in (0, 1):  # FFCV's distributed order
        a, b = (set(d['ffcv'][e].tolist()) for d in ranks)
        assert len(ranks[0]['ffcv'][e]) == len(a) == 100 and len(b) == 100
        assert not a & b and a | b == set(range(200))
    assert not torch.equal(ranks[0]['ffcv'][0], ranks[0]['ffcv'][1])
    assert same_weights(r0, r1)
    assert same_weights(r0, weights(run / 'last.pt'))
    alone = tmp_path / 'alone'
    train('tiny_cpu', tiny(synthetic_betons, alone, **{'data.num_workers': 1, 'data.batch_size': 25,
                                                        'data.loader': 'torchvision'}), log=lambda *_: None)
    assert not same_weights(r0, weights(alone / 'last.pt'))
    records = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines()]
    assert [x['epoch'] for x in records] == [1, 2]  # one writer, not two
    assert all(x['train_images'] == 400 and x['test_images'] == 200 for x in records)
    assert sorted(p.name for p in run.glob('*.pt')) == ['best.pt', 'last.pt']


def test_one_core_and_the_workqueue_threading_layer(synthetic_betons, tmp_path):
    """The FFCV path under numba's workqueue threading layer (what a host without TBB falls back
    to; it aborts when two threads run parallel code at once: the JIT warm-up's loader threads
    must be joined before the next loader starts) and pinned to one CPU (``taskset``: the host
    reports 2 CPUs, the process may use 1; "all cores" must mean 1, or numba refuses the count)."""
    if not shutil.which('taskset') or len(os.sched_getaffinity(0)) < 2:
        pytest.skip('needs taskset and 2 CPUs')
    r = subprocess.run(['taskset', '-c', '0', PY, 'scripts/train.py', '--config', 'tiny_cpu',
                        *as_cli(tiny(synthetic_betons, tmp_path / 'wq', **{
                            'data.loader': 'ffcv', 'data.num_workers': -1, 'training.epochs': 1}))],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'NUMBA_THREADING_LAYER': 'workqueue'})
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'ffcv loader with 1 workers' in r.stdout
    assert json.loads((tmp_path / 'wq' / 'metrics.jsonl').read_text())['train_images'] == 400


def test_ffcv_version_without_package_metadata(synthetic_data, tmp_path, monkeypatch):
    """A copied-in ffcv without its package metadata (importlib.metadata raises): the converter
    still writes its outputs and the manifest says what it knows. Catches a bare
    ``version('ffcv')`` (it would raise after the .beton files were written)."""
    import importlib.metadata as md
    from ffcv_pipeline import ffcv_version
    from ffcv_pipeline.writer import write_datasets
    real = md.version

    def version(name):
        if name == 'ffcv':
            raise md.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(md, 'version', version)
    assert ffcv_version() == '0.0.3rc1 (ffcv.__version__)'  # what ffcv 1.0.2's module says
    res = write_datasets(synthetic_data[0], tmp_path / 'out', progress=False, log=lambda *_: None)
    assert res.manifest['ffcv_version'] == '0.0.3rc1 (ffcv.__version__)'
    assert (tmp_path / 'out' / BETON_NAMES['train']).is_file()


@pytest.mark.parametrize('deterministic', [True, False])
def test_training_deterministic_sets_cudnn(synthetic_betons, tmp_path, deterministic):
    """``training.deterministic``: cuDNN's deterministic algorithms without autotuning (bit-exact
    GPU resumes), else autotuning. Catches the trainer ignoring the key."""
    from training.config import load_config
    from training.trainer import Trainer
    torch.backends.cudnn.benchmark = torch.backends.cudnn.deterministic = not deterministic
    cfg = load_config('tiny_cpu', tiny(synthetic_betons, tmp_path / 'det', **{
        'data.loader': 'torchvision', 'training.deterministic': deterministic}))
    Trainer(cfg, log=lambda *_: None).setup()
    assert torch.backends.cudnn.deterministic is deterministic
    assert torch.backends.cudnn.benchmark is (not deterministic)


NOT_INSTALLED = '''
import atexit, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]
atexit.register(lambda: print('training from', sys.modules['training'].__file__))  # an error exits normally
'''


def test_scripts_run_from_a_checkout_that_is_not_installed(tmp_path):
    """The offline GPU host's runbook runs ``python3 scripts/train.py`` from a checkout that was
    never ``pip install``ed (a sitecustomize hides the editable install here): scripts/_cli.py
    puts this checkout first on the path. Catches removing that fallback."""
    (tmp_path / 'sitecustomize.py').write_text(NOT_INSTALLED)
    r = subprocess.run([PY, 'scripts/train.py', '--config', 'tiny_cpu', '--data.loader', 'foo'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'PYTHONPATH': str(tmp_path)})
    assert r.returncode == 2 and "data.loader: 'foo' is not one of" in r.stderr, r.stderr
    assert f'training from {ROOT / "training" / "__init__.py"}' in r.stdout
