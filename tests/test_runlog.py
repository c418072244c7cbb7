"""The run log (issue 26): every record through one RunLog to its sinks; TensorBoard read back
with its own reader equals metrics.jsonl; a sink that is off is not even imported."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from conftest import PY, ROOT, tiny


def test_the_runlog_hands_each_record_to_the_sinks_that_take_it():
    """A sink gets only the records it defines a method for; ``wants_steps`` is off without a
    step sink (the trainer then builds no per-step record); order is the sinks' order."""
    from training.sinks import RunLog, Sink
    seen = []

    class Epochs(Sink):
        def epoch(self, step, record):
            seen.append(('epochs', step, record['epoch']))

    class Lines(Sink):
        def line(self, text):
            seen.append(('lines', text))

        def epoch(self, step, record):
            seen.append(('lines-epoch', step))

    log = RunLog([Epochs(), Lines()])
    assert not log.wants_steps
    log.line('hello')
    log.step(3, {'lr/weights': 0.1})
    log.epoch(8, {'epoch': 1})
    log.summary(8, {})
    log.close()
    assert seen == [('lines', 'hello'), ('epochs', 8, 1), ('lines-epoch', 8)]

    class Steps(Sink):
        def step(self, step, scalars):
            seen.append(('steps', step, scalars))
    assert RunLog([Steps()]).wants_steps


def test_tensorboard_events_equal_metrics_jsonl(synthetic_betons, tmp_path):
    """A tiny run with ``output.tensorboard: true``: its event file, read back with tensorboard's
    own EventAccumulator, holds every number of every metrics.jsonl line at that epoch's step,
    the summary's time budget, and the LR of every step, each equal to the JSON's value as a
    float32 (TensorBoard's precision). Catches a sink fed other values than the JSONL, a missing
    epoch or span, and per-step LRs at the wrong step."""
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from training.trainer import train
    run = tmp_path / 'tb'
    summary = train('tiny_cpu', tiny(synthetic_betons, run, **{'data.loader': 'torchvision',
                                                               'output.tensorboard': True}), log=lambda *_: None)
    events = list(run.glob('events.out.tfevents.*'))
    assert len(events) == 1
    acc = EventAccumulator(str(run), size_guidance={'scalars': 0})  # 0: keep every event
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()['scalars']}
    f32 = lambda v: float(np.float32(v))
    records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    steps = 8  # 400 images, batch 50
    for r in records:
        numbers = {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert {'train_loss', 'train_acc', 'test_top1', 'lr', 'train_images_per_s', 'wallclock_s'} <= set(numbers)
        for key, value in numbers.items():
            assert scalars[f'epoch/{key}'][r['epoch'] * steps] == f32(value), key
    for span, seconds in summary['time_budget'].items():
        assert scalars[f'time_budget/{span}'][2 * steps] == f32(seconds), span
    assert scalars['summary/best_top1'][2 * steps] == f32(summary['best_top1'])
    lrs = scalars['step/lr/weights']
    assert sorted(lrs) == list(range(1, 2 * steps + 1))
    assert lrs[2 * steps] == f32(records[-1]['lr']) and lrs[steps] == f32(records[0]['lr'])
    assert set(scalars['step/train_loss']) == {steps, 2 * steps}  # the check at each epoch's end


def test_with_tensorboard_off_it_is_not_imported(synthetic_betons, tmp_path):
    """A whole run in a fresh process with ``output.tensorboard`` off (the default) imports no
    tensorboard module and writes no event file: the sink costs nothing. Catches a module-level
    import of the sink or of ``torch.utils.tensorboard``."""
    run = tmp_path / 'quiet'  # not 'off': YAML reads that as false
    code = f'''
import sys
from training.trainer import train
train('tiny_cpu', {tiny(synthetic_betons, run, **{'data.loader': 'torchvision', 'training.epochs': 1})!r},
      log=lambda *_: None)
print('imported:', sorted(m for m in sys.modules if 'tensorboard' in m))
'''
    r = subprocess.run([PY, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == 'imported: []', r.stdout
    assert (run / 'metrics.jsonl').is_file() and not list(run.glob('events.out.tfevents.*'))
