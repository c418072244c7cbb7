"""What the trainer applies, read from the trainer itself (issue 26, part 7), not from the
helpers it calls: the LR each step runs with, the test-time views its evaluation makes, EMA's
average when it updates every k steps, the augment settings both loaders get from the config,
and the wall-clock time to target. Each test names the break in the trainer's own wiring that
it catches (every one was made once, and failed the test)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from conftest import tiny, tv

QUIET = dict(log=lambda *_: None)


class Recorder:
    """A run-log sink that keeps every per-step record (and runs ``on_step`` first)."""

    def __init__(self, on_step=None):
        self.steps, self.on_step = {}, on_step

    def step(self, step, scalars):
        if self.on_step is not None and any(k.startswith('lr/') for k in scalars):  # once per step
            self.on_step(step)
        self.steps.setdefault(step, {}).update(scalars)


def linear_lr(peak: float, step: int, *, total: int, warm: int) -> float:
    """The LR of 0-based ``step`` under warm-up then linear decay, written out here."""
    return peak * (step + 1) / warm if step < warm else peak * (1 - (step - warm) / (total - warm))


@pytest.mark.parametrize('optimizer', ['sgd', 'muon'])
def test_every_step_runs_at_the_scheduled_lr_of_each_group(optimizer, synthetic_betons, tmp_path):
    """The LR each parameter group held when the trainer's step ran (read back from the
    optimizer), every step of a 2-epoch run, against warm-up + linear decay written out here:
    training.lr for SGD's groups (and Muon's SGD groups), training.muon_lr for Muon's. Catches
    the trainer indexing the schedule with another step (a stale or an advanced one), a step
    that leaves the groups' LR alone, one LR for every group, and a schedule shifted by one."""
    from training.config import load_config
    from training.trainer import Trainer
    rec = Recorder()
    over = {'training.optimizer': optimizer, 'training.lr': 0.2, 'training.muon_lr': 0.03} \
        if optimizer == 'muon' else {'training.lr': 0.2}
    Trainer(load_config('tiny_cpu', tv(synthetic_betons, tmp_path / 'run', **over)), sinks=[rec], **QUIET).run()
    total, warm = 16, 4  # 8 steps per epoch, 2 epochs, warm-up 0.5 epoch
    assert sorted(rec.steps) == list(range(1, total + 1))
    peaks = {'weights': 0.2, 'others': 0.2} if optimizer == 'sgd' else {'muon': 0.03, 'head': 0.2, 'others': 0.2}
    for step, scalars in rec.steps.items():
        for group, peak in peaks.items():
            assert scalars[f'lr/{group}'] == pytest.approx(linear_lr(peak, step - 1, total=total, warm=warm),
                                                           rel=1e-12), (step, group)


def test_the_trainers_evaluation_runs_the_configured_views(synthetic_betons, tmp_path):
    """``training.tta`` and ``training.tta_translate`` as configured reach the trainer's own
    evaluation: forward passes per test batch are 1 (neither), 2 (flip), 3 (translate), 6 (both).
    Catches the trainer passing a fixed or default TTA setting to ``evaluate``."""
    from training.config import load_config
    from training.trainer import Trainer
    for flip, translate, views in ((False, 0, 1), (True, 0, 2), (False, 1, 3), (True, 2, 6)):
        t = Trainer(load_config('tiny_cpu', tv(synthetic_betons, tmp_path / f'v{views}', **{
            'training.tta': flip, 'training.tta_translate': translate})), **QUIET)
        t.setup()
        try:
            calls = []
            t.eval_net.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
            *_, n = t.evaluate()
            assert n == 200 and len(calls) == views * len(t.data.test), (flip, translate)
        finally:
            t.data.close()
            t.run_dir.close()


def test_the_trainers_ema_averages_the_weights_after_every_kth_step(synthetic_betons, tmp_path):
    """A run with ``training.ema 0.9, ema_every 3``: the raw weights after every optimizer step
    (taken by a sink), averaged here at steps 3, 6, 9, ... with decay min(0.9**3, (1+n)/(10+n)),
    give the EMA the trainer evaluated and checkpointed. Catches the trainer updating the EMA
    before the step count moves (it would average after steps 1, 4, 7, ...), every step, with
    the decay of one step, or from the weights of the wrong model."""
    from training.config import load_config
    from training.trainer import Trainer
    snapshots = {}
    t = Trainer(load_config('tiny_cpu', tv(synthetic_betons, tmp_path / 'ema', **{
        'training.ema': 0.9, 'training.ema_every': 3})), **QUIET)
    t.sinks.append(Recorder(on_step=lambda step: snapshots.__setitem__(
        step, {k: v.detach().clone() for k, v in t.model.state_dict().items()})))
    t.setup()
    want = {k: v.double() for k, v in t.ema.module.state_dict().items()}  # the initial weights (a copy)
    t.run()
    assert sorted(snapshots) == list(range(1, 17))
    n = 0
    for step in range(3, 17, 3):
        d, w = min(0.9 ** 3, (1 + n) / (10 + n)), snapshots[step]
        want = {k: d * want[k] + (1 - d) * w[k].double() if w[k].is_floating_point() else w[k].double() for k in w}
        n += 1
    ck = torch.load(tmp_path / 'ema' / 'last.pt', weights_only=True)
    assert ck['ema']['updates'] == n == 5
    for k, v in want.items():
        torch.testing.assert_close(t.ema.module.state_dict()[k].double(), v, rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(ck['model'][k].double(), v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize('loader', ['ffcv', 'torchvision'])
def test_the_configs_augment_settings_reach_the_training_loader(loader, synthetic_betons):
    """``build_data`` from a config with non-default augmentation (no flip, 2-px translate, 5-px
    cutout): the first training batch of epoch 3 is exactly the reference augmentation
    (``augment_batch``) with those settings, and not the one with the defaults. Catches a loader
    built with default settings, or with one of the three keys dropped on its way."""
    from ffcv_pipeline.augment import augment_batch
    from conftest import CIFAR100_MEAN, CIFAR100_STD
    from ffcv_pipeline.data import build_data
    from ffcv_pipeline.pixels import fill_colour
    from training.config import load_config
    cfg = load_config('tiny_cpu', tiny(synthetic_betons, synthetic_betons / 'unused', **{
        'data.loader': loader, 'data.order': 'sequential', 'data.batch_size': 40,
        'augment.flip': False, 'augment.translate': 2, 'augment.cutout': 5, 'training.seed': 7}))
    data = build_data(cfg, device=torch.device('cpu'), dtype=torch.float32, root=synthetic_betons, workers=1)
    try:
        x, y = next(iter(data.train.epoch(3)))
        if loader == 'torchvision':
            data.train.sampler.epoch = 3
            idx = next(iter(data.train.sampler))[1]
        else:
            idx = np.arange(40)  # sequential order
    finally:
        data.close()
    arrays = np.load(synthetic_betons / 'cifar100_train.npy')
    assert torch.equal(y, torch.from_numpy(arrays['label'][idx].astype(np.int64)))
    mean, std = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    got = (x * std + mean).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
    ref = lambda **aug: augment_batch(arrays['image'][idx], idx, seed=7, epoch=3, augment=aug,
                                      fill=fill_colour(CIFAR100_MEAN))
    assert np.array_equal(got, ref(flip=False, translate=2, cutout=5))
    assert not np.array_equal(got, ref(flip=True, translate=4, cutout=8))


def test_time_to_target_includes_its_epochs_evaluation(synthetic_betons, tmp_path):
    """The clock (started here) is read after the epoch's evaluation: each evaluation made 1 s
    slower ends before its record's ``wallclock_s``, and the summary's ``time_to_target_s`` is
    epoch 1's. Catches a wall-clock read before the evaluation (the time to target would leave
    the evaluation out)."""
    from training.budget import TimeBudget
    from training.config import load_config
    from training.trainer import Trainer
    t = Trainer(load_config('tiny_cpu', tv(synthetic_betons, tmp_path / 'run', **{'training.target_top1': 0.0})),
                budget=TimeBudget(start=time.perf_counter()), **QUIET)
    evaluate, ends = t.evaluate, []

    def slow_evaluate(raw=False):
        time.sleep(1.0)
        out = evaluate(raw)
        ends.append(t.budget.elapsed())
        return out
    t.evaluate = slow_evaluate
    summary = t.run()
    records = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    assert len(ends) == len(records) == 2
    for r, end in zip(records, ends):
        assert end - 1e-3 <= r['wallclock_s'] <= end + 0.5, (r['wallclock_s'], end)  # rounded to ms
    assert summary['time_to_target_s'] == records[0]['wallclock_s'] and summary['epoch_reached_target'] == 1


def test_the_wall_clock_continues_across_a_resume(synthetic_betons, tmp_path):
    """A run resumed from epoch 1's checkpoint, whose earlier sessions took (say) 1000 s: epoch 2's
    wall-clock, the time to target reached in epoch 2 and the total count from the run's first
    start, not from the resumed process's. Catches a resumed clock that restarts from zero."""
    from training.budget import TimeBudget
    from training.config import load_config
    from training.trainer import Trainer, train
    ref = tmp_path / 'ref'
    train('tiny_cpu', tv(synthetic_betons, ref, **{'output.save_every': 1}), **QUIET)
    ck = torch.load(ref / 'epoch_001.pt', weights_only=True)
    ck['elapsed_s'] = 1000.0
    run = tmp_path / 'resumed'
    run.mkdir()
    torch.save(ck, run / 'last.pt')
    first = json.loads((ref / 'metrics.jsonl').read_text().splitlines()[0])
    (run / 'metrics.jsonl').write_text(json.dumps({**first, 'test_top1': None}) + '\n')  # not evaluated
    cfg = load_config(None, ['training.target_top1=0.0', 'output.progress=off'], base=ck['config'])
    start = time.perf_counter()
    summary = Trainer(cfg, resume=str(run / 'last.pt'), budget=TimeBudget(start=start), **QUIET).run()
    this_session = time.perf_counter() - start
    r2 = json.loads((run / 'metrics.jsonl').read_text().splitlines()[1])
    assert r2['epoch'] == 2 and 1000 < r2['wallclock_s'] < 1000 + this_session
    assert 1000 < summary['total_seconds'] <= 1000 + this_session + 0.01
    assert summary['epoch_reached_target'] == 2 and summary['time_to_target_s'] == r2['wallclock_s']
