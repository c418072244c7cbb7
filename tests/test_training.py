"""Training on the CPU with a narrow ResNet-18 (width 8) on the synthetic .beton files:
learning, metrics/summary/plot, checkpoints, exact resume, config errors, NaN, Ctrl-C, DDP."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PY, ROOT, run_script
from ffcv_pipeline.constants import BETON_NAMES, FINE_LABEL_NAMES
from model import build_model, count_parameters


def tiny(betons: Path, out: Path, **extra) -> list[str]:
    """Overrides for a fast CPU run: 400 images, batch 50 -> 8 steps per epoch."""
    o = {'data.train_path': betons / BETON_NAMES['train'], 'data.test_path': betons / BETON_NAMES['test'],
         'data.batch_size': 50, 'data.test_batch_size': 100, 'data.num_workers': 2,
         'model.width': 8, 'training.epochs': 2, 'training.lr': 0.2, 'training.warmup_epochs': 0.5,
         'training.device': 'cpu', 'output.dir': out.parent, 'output.name': out.name,
         'output.progress': 'off', **extra}
    return [f'{k}={v}' for k, v in o.items()]


def as_cli(overrides: list[str]) -> list[str]:
    return [f'--{o}' for o in overrides]


def weights(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)['model']


def assert_same_weights(a: Path, b: Path):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_resnet18_parameter_count_and_layout():
    m = build_model('resnet18', num_classes=100)
    assert count_parameters(m) == 11_220_132
    assert m.stem[0].kernel_size == (3, 3) and m.stem[0].stride == (1, 1)
    assert not any(isinstance(x, torch.nn.MaxPool2d) for x in m.modules())
    assert m.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    assert m(x).shape == (2, 100)


def test_lr_schedule_shape():
    from training.trainer import lr_schedule
    s = lr_schedule(lr=0.4, epochs=10, iters_per_epoch=10, warmup_epochs=2, kind='linear')
    assert len(s) == 100 and s[19] == pytest.approx(0.4) and s[0] == pytest.approx(0.02)
    assert np.all(np.diff(s[:20]) > 0) and np.all(np.diff(s[20:]) < 0) and s[-1] < 0.4 / 50
    c = lr_schedule(lr=0.4, epochs=10, iters_per_epoch=10, warmup_epochs=2, kind='cosine')
    assert c[20] == pytest.approx(0.4) and c[60] == pytest.approx(0.2) and c[-1] < 1e-3


@pytest.fixture(scope='module')
def baseline_run(synthetic_betons, tmp_path_factory):
    """An uninterrupted 2-epoch run that keeps epoch_001.pt (the resume tests start from it)."""
    from training.trainer import train
    out = tmp_path_factory.mktemp('runs') / 'baseline'
    summary = train('tiny_cpu', tiny(synthetic_betons, out, **{'output.save_every': 1}),
                    log=lambda *_: None)
    return out, summary


def test_two_epochs_lower_the_loss_and_write_everything(baseline_run):
    out, summary = baseline_run
    records = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [1, 2]
    assert records[1]['train_loss'] < records[0]['train_loss']
    for r in records:
        for key in ('lr', 'train_loss', 'train_acc', 'test_top1', 'test_top5', 'epoch_seconds',
                    'train_images_per_s', 'wallclock_s'):
            assert isinstance(r[key], float) and r[key] >= 0, key
        assert r['train_images'] == 400 and r['test_images'] == 200
    assert records[1]['wallclock_s'] > records[0]['wallclock_s']
    s = json.loads((out / 'summary.json').read_text())
    assert s == summary
    assert s['best_top1'] == max(r['test_top1'] for r in records)
    assert s['numba_compile_seconds'] > 0 and s['total_seconds'] >= records[-1]['wallclock_s']
    assert s['target_top1'] == 0.05 and (s['time_to_target_s'] is None) == (s['best_top1'] < 0.05)
    assert (out / 'curves.png').read_bytes()[:4] == b'\x89PNG'
    assert {'last.pt', 'best.pt', 'epoch_001.pt', 'epoch_002.pt', 'config.yaml'} <= {p.name for p in out.iterdir()}
    ck = torch.load(out / 'last.pt', map_location='cpu', weights_only=True)
    assert ck['format'] == 'cifar100-ffcv-checkpoint' and ck['epoch'] == 2 and ck['step'] == 16
    assert ck['class_names'] == list(FINE_LABEL_NAMES) and len(ck['fine_to_coarse']) == 100
    assert ck['normalization']['scale'] == 255 and len(ck['normalization']['mean']) == 3
    assert ck['config']['model']['width'] == 8 and ck['model_config']['arch'] == 'resnet18'
    assert {'optimizer', 'scaler', 'rng'} <= set(ck)
    assert not any(k.startswith(('_orig_mod.', 'module.')) for k in ck['model'])
    best = torch.load(out / 'best.pt', map_location='cpu', weights_only=True)
    assert best['metrics']['test_top1'] == s['best_top1'] and best['epoch'] == s['best_epoch']
    e1 = torch.load(out / 'epoch_001.pt', map_location='cpu', weights_only=True)
    assert e1['epoch'] == 1 and e1['step'] == 8  # a separate file, not a link to the last one


def test_resume_after_epoch_1_reproduces_final_weights(baseline_run, synthetic_betons, tmp_path):
    from training.trainer import train
    base, _ = baseline_run
    run = tmp_path / 'resumed'
    run.mkdir()
    shutil.copy(base / 'epoch_001.pt', run / 'last.pt')
    shutil.copy(base / 'metrics.jsonl', run / 'metrics.jsonl')
    train(None, ['output.progress=off'], resume=str(run / 'last.pt'), log=lambda *_: None)
    assert_same_weights(base / 'last.pt', run / 'last.pt')
    a = [json.loads(l) for l in (base / 'metrics.jsonl').read_text().splitlines()]
    b = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in b] == [1, 2]
    assert b[1]['train_loss'] == pytest.approx(a[1]['train_loss'], abs=1e-12)
    assert b[1]['test_top1'] == a[1]['test_top1']


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(baseline_run, tmp_path):
    base, _ = baseline_run
    run = tmp_path / 'diverge'
    run.mkdir()
    shutil.copy(base / 'epoch_001.pt', run / 'last.pt')
    before = (run / 'last.pt').read_bytes()
    r = run_script('scripts/train.py', '--resume', run / 'last.pt', '--training.lr', '1e30',
                   '--output.progress', 'off')
    assert r.returncode == 3, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: training diverged: the loss is')
    assert 'last good checkpoint' in err[0] and 'Traceback' not in r.stderr
    assert (run / 'last.pt').read_bytes() == before
    assert not (run / 'best.pt').exists()


@pytest.mark.parametrize('args, expected', [
    (['--config', 'tiny_cpu', '--training.epoch', '3'], "unknown key 'training.epoch'"),
    (['--config', 'tiny_cpu', '--training.epochs', 'two'], "'training.epochs'"),
    (['--config', 'tiny_cpu', '--training.precision', 'fp8'], "training.precision: 'fp8' is not one of"),
    (['--config', 'tiny_cpu', '--data.batch_size', '0'], 'data.batch_size: must be > 0'),
    (['--config', 'no_such_config'], "config 'no_such_config' not found"),
    (['--config', 'tiny_cpu', '--data.train_path', '/nonexistent.beton'], 'no such .beton file'),
    (['--resume', '/nonexistent/last.pt'], 'no such checkpoint file'),
])
def test_config_errors_are_one_clear_line(args, expected):
    r = run_script('scripts/train.py', *args, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and expected in err[0], r.stderr


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
        cfg = load_config(p)
        assert cfg.training.epochs > 0, p
    rn18 = load_config('rn18.yaml')
    assert rn18.model.arch == 'resnet18' and rn18.training.target_top1 == 0.73
    ref = load_config('rn18_reference.yaml')
    assert (ref.data.batch_size, ref.training.lr, ref.training.warmup_epochs, ref.training.epochs,
            ref.training.lr_schedule, ref.training.label_smoothing, ref.augment.cutout) == \
        (128, 0.1, 5.0, 100, 'cosine', 0.1, 16)


def _popen_train(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([PY, 'scripts/train.py', *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1'})


def test_ctrl_c_mid_epoch_saves_checkpoint_and_resume_matches_uninterrupted(synthetic_betons, tmp_path):
    """SIGINT at step 5 of 40 -> interrupted.pt at the next batch boundary; resuming it gives
    the same final weights as a run that was never interrupted (batch 10: 40 steps/epoch)."""
    import threading
    from training.config import load_config
    from training.trainer import Trainer, TrainingInterrupted, train
    extra = {'data.batch_size': 10, 'training.epochs': 1}
    ref = tmp_path / 'ref'
    train('tiny_cpu', tiny(synthetic_betons, ref, **extra), log=lambda *_: None)

    run = tmp_path / 'interrupted'
    trainer = Trainer(load_config('tiny_cpu', tiny(synthetic_betons, run, **extra)), log=lambda *_: None)

    def press_ctrl_c():  # like a user's Ctrl-C, once training is under way
        while getattr(trainer, 'step', 0) < 5:
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with pytest.raises(TrainingInterrupted):
        trainer.run()
    ck = torch.load(run / 'interrupted.pt', map_location='cpu', weights_only=True)
    assert 5 <= ck['batch'] < 40 and ck['epoch'] == 0 and ck['step'] == ck['batch']  # mid-epoch
    train(None, ['output.progress=off'], resume=str(run / 'interrupted.pt'), log=lambda *_: None)
    assert_same_weights(ref / 'last.pt', run / 'last.pt')
    assert not (run / 'interrupted.pt').exists()


def test_ctrl_c_from_the_command_line_exits_130_with_resume_hint(synthetic_betons, tmp_path):
    run = tmp_path / 'cli'
    p = _popen_train(['--config', 'tiny_cpu', *as_cli(tiny(synthetic_betons, run, **{
        'data.batch_size': 2, 'training.epochs': 3}))])
    for line in p.stdout:  # training starts right after the set-up line
        if line.startswith('set-up'):
            break
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    hint = err.strip().splitlines()[-1]
    assert hint.startswith('interrupted; checkpoint saved. Resume with: python scripts/train.py --resume ')
    assert Path(hint.rsplit(' ', 1)[1]).is_file() and 'Traceback' not in err


def test_ddp_two_cpu_processes(synthetic_betons, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): rank 0 alone writes; metrics cover both ranks."""
    run = tmp_path / 'ddp'
    r = subprocess.run([PY, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        'scripts/train.py', '--config', 'tiny_cpu',
                        *as_cli(tiny(synthetic_betons, run, **{'data.num_workers': 1,
                                                               'data.batch_size': 25}))],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines()]
    assert [x['epoch'] for x in records] == [1, 2]  # one writer, not two
    assert all(x['train_images'] == 400 and x['test_images'] == 200 for x in records)
    assert sorted(p.name for p in run.glob('*.pt')) == ['best.pt', 'last.pt']
    assert r.stdout.count('epoch   1/2') == 1  # only rank 0 logs


PROBE = '''
import json, os, sys
import numpy as np, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from ffcv.fields.basics import IntDecoder
from ffcv.transforms import ToTensor
from ffcv_pipeline.loaders import make_loader
dist.init_process_group('gloo')
loader = make_loader({beton!r}, batch_size=10, num_workers=1, order='quasi_random', os_cache=True,
                     drop_last=True, distributed=True, seed=0,
                     pipelines={{'image': None, 'label': [IntDecoder(), ToTensor()]}})
seen = {{e: [int(i) for (y,) in loader.epoch(e) for i in y.ravel()] for e in (0, 1)}}
json.dump(seen, open(os.path.join({out!r}, f'rank{{dist.get_rank()}}.json'), 'w'))
dist.destroy_process_group()
'''


def test_ddp_ranks_see_disjoint_data(tmp_path):
    """FFCV distributed loading through make_loader: each sample goes to exactly one rank,
    and the split changes between epochs. Labels hold the sample index here."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    beton = tmp_path / 'index.beton'

    class DS:
        def __len__(self): return 200
        def __getitem__(self, i): return np.zeros((32, 32, 3), np.uint8), i
    DatasetWriter(str(beton), {'image': RGBImageField(write_mode='raw'), 'label': IntField()},
                  num_workers=1).from_indexed_dataset(DS())
    script = tmp_path / 'probe.py'
    script.write_text(PROBE.format(root=str(ROOT), beton=str(beton), out=str(tmp_path)))
    r = subprocess.run([PY, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f'rank{i}.json').read_text()) for i in (0, 1)]
    for e in ('0', '1'):
        a, b = set(ranks[0][e]), set(ranks[1][e])
        assert len(ranks[0][e]) == len(a) == 100 and len(b) == 100
        assert not a & b and a | b == set(range(200))
    assert ranks[0]['0'] != ranks[0]['1']
