"""Resuming and stopping: a resumed run really resumes (not a silent restart that happens to
end on the same weights), Ctrl-C / SIGTERM / a second Ctrl-C / Ctrl-C during evaluation, the
GradScaler state, a NaN loss, and a full disk. Every docstring names the mutation it catches.

Most runs use the ``torchvision`` loader (no JIT compilation: ~1 s of set-up instead of ~7 s);
the trainer logic under test is the same for both loaders, and one test resumes through FFCV."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import PY, ROOT, as_cli, run_main, same_weights, tiny, tv


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.fixture(scope='module')
def ref_run(synthetic_betons, tmp_path_factory):
    """An uninterrupted 2-epoch run (torchvision loader, batch 20: 20 steps/epoch), keeping
    epoch_001.pt for the resume tests."""
    from training.trainer import train
    out = tmp_path_factory.mktemp('ref') / 'ref'
    train('tiny_cpu', tv(synthetic_betons, out, **{'data.batch_size': 20, 'output.save_every': 1}),
          log=lambda *_: None)
    return out


def resume(path: Path, *overrides: str) -> list[str]:
    from training.trainer import train
    logs = []
    train(None, ['output.progress=off', *overrides], resume=str(path), log=logs.append)
    return logs


def test_resume_after_epoch_1_through_ffcv(baseline_run, tmp_path):
    """FFCV loader: epoch 2 resumed from epoch_001.pt gives the uninterrupted run's weights bit
    for bit, the log names where it resumes, and epoch 1's metrics line is left untouched.
    Catches a no-op resume (it would log nothing and rewrite epoch 1's line with new timings)."""
    base = baseline_run[0]
    run = tmp_path / 'resumed'
    run.mkdir()
    shutil.copy(base / 'epoch_001.pt', run / 'last.pt')
    (run / 'metrics.jsonl').write_text(lines(base / 'metrics.jsonl')[0] + '\n')
    logs = resume(run / 'last.pt')
    assert f'resuming {run / "last.pt"} at the start of epoch 2 (step 8)' in logs
    assert same_weights(base / 'last.pt', run / 'last.pt')
    a, b = lines(base / 'metrics.jsonl'), lines(run / 'metrics.jsonl')
    assert len(b) == 2 and b[0] == a[0]  # epoch 1's line, byte for byte
    assert json.loads(b[1])['train_loss'] == pytest.approx(json.loads(a[1])['train_loss'], abs=1e-12)


def test_resume_uses_the_checkpoint_weights(ref_run, tmp_path):
    """A checkpoint whose weights were nudged leads to other final weights; the unchanged one to
    the reference's. Catches a resume that restarts from scratch, or that loads the position
    but not the weights (both end on the reference weights whatever the checkpoint holds)."""
    ck = torch.load(ref_run / 'epoch_001.pt', weights_only=True)
    ck['model'] = {k: v + 1e-3 if v.is_floating_point() else v for k, v in ck['model'].items()}
    run = tmp_path / 'nudged'
    run.mkdir()
    torch.save(ck, run / 'last.pt')
    resume(run / 'last.pt')
    assert not same_weights(ref_run / 'last.pt', run / 'last.pt')
    plain = tmp_path / 'plain'
    plain.mkdir()
    shutil.copy(ref_run / 'epoch_001.pt', plain / 'last.pt')
    resume(plain / 'last.pt')
    assert same_weights(ref_run / 'last.pt', plain / 'last.pt')


def _interrupt_at(trainer, step: int, sig=signal.SIGINT):
    """Send ``sig`` to this process once the trainer reaches ``step``, as a user's Ctrl-C would."""
    import threading

    def press():
        while getattr(trainer, 'step', 0) < step:
            time.sleep(0.001)
        os.kill(os.getpid(), sig)
    threading.Thread(target=press, daemon=True).start()


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM], ids=['ctrl-c', 'sigterm'])
def test_stop_mid_epoch_then_resume_matches_uninterrupted(ref_run, synthetic_betons, tmp_path, sig):
    """SIGINT/SIGTERM at step 5 of 20 -> interrupted.pt at the next batch boundary; resuming it
    ends on the uninterrupted run's weights, and the resumed run starts at that batch (the log
    says so). Catches a no-op resume (no log line), a lost optimizer state or batch position
    (other weights), and a handler that ignores SIGTERM (the run would not stop)."""
    from training.config import load_config
    from training.trainer import Trainer, TrainingInterrupted
    run = tmp_path / 'stopped'
    trainer = Trainer(load_config('tiny_cpu', tv(synthetic_betons, run, **{'data.batch_size': 20})),
                      log=lambda *_: None)

    def unhandled(signum, frame):  # were the trainer not to handle it, this would run instead
        raise AssertionError(f'signal {signum} reached the default handler, not the trainer')
    previous = signal.signal(sig, unhandled) if sig != signal.SIGINT else None
    _interrupt_at(trainer, 5, sig)
    try:
        with pytest.raises(TrainingInterrupted):
            trainer.run()
    finally:
        if previous is not None:
            signal.signal(sig, previous)
    ck = torch.load(run / 'interrupted.pt', map_location='cpu', weights_only=True)
    assert 5 <= ck['batch'] < 20 and ck['epoch'] == 0 and ck['step'] == ck['batch']  # mid-epoch
    assert not (run / 'metrics.jsonl').exists()  # no epoch finished
    logs = resume(run / 'interrupted.pt')
    assert f'resuming {run / "interrupted.pt"} at epoch 1, batch {ck["batch"]} (step {ck["step"]})' in logs
    assert same_weights(ref_run / 'last.pt', run / 'last.pt')
    assert not (run / 'interrupted.pt').exists()
    a, b = lines(ref_run / 'metrics.jsonl'), lines(run / 'metrics.jsonl')
    for x, y in zip(a, b):  # the interrupted epoch's statistics were carried over
        assert json.loads(y)['train_images'] == json.loads(x)['train_images'] == 400
        assert json.loads(y)['train_loss'] == pytest.approx(json.loads(x)['train_loss'], rel=1e-9)


def test_ctrl_c_during_evaluation_stops_after_the_epoch(ref_run, synthetic_betons, tmp_path):
    """Ctrl-C while epoch 1 is evaluated: the epoch completes (metrics line, last.pt), the run
    stops with last.pt as the resume point, and resuming gives the reference weights. Catches
    a stop request that is forgotten once the batch loop is over (the run would go on)."""
    from training.config import load_config
    from training.trainer import Trainer, TrainingInterrupted
    run = tmp_path / 'evalstop'
    trainer = Trainer(load_config('tiny_cpu', tv(synthetic_betons, run, **{'data.batch_size': 20})),
                      log=lambda *_: None)
    evaluate = trainer.evaluate

    def evaluate_with_ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)  # handled at once, in this (the main) thread
        return evaluate()
    trainer.evaluate = evaluate_with_ctrl_c
    with pytest.raises(TrainingInterrupted) as info:
        trainer.run()
    assert Path(info.value.args[0]) == run / 'last.pt'
    assert [json.loads(l)['epoch'] for l in lines(run / 'metrics.jsonl')] == [1]
    assert not (run / 'interrupted.pt').exists()
    resume(run / 'last.pt')
    assert same_weights(ref_run / 'last.pt', run / 'last.pt')


def test_second_ctrl_c_aborts_at_once(synthetic_betons, tmp_path):
    """A second Ctrl-C raises KeyboardInterrupt at once (no waiting for a batch boundary) and
    leaves no half-written file. Catches a handler that swallows every Ctrl-C."""
    from training.config import load_config
    from training.guards import StopRequest
    from training.trainer import Trainer
    stop = StopRequest()
    stop._handler(signal.SIGINT, None)
    assert stop.requested
    with pytest.raises(KeyboardInterrupt):
        stop._handler(signal.SIGINT, None)
    run = tmp_path / 'twice'
    trainer = Trainer(load_config('tiny_cpu', tv(synthetic_betons, run)), log=lambda *_: None)
    handler_before = signal.getsignal(signal.SIGINT)

    def evaluate_with_two_ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError('the second Ctrl-C should have stopped the run')
    trainer.evaluate = evaluate_with_two_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert sorted(p.name for p in run.iterdir()) == ['.lock', 'config.yaml']  # nothing half-written
    assert signal.getsignal(signal.SIGINT) is handler_before  # the handlers are restored


def test_ctrl_c_from_the_command_line_exits_130_and_the_hint_resumes(synthetic_betons, tmp_path):
    """The command line: Ctrl-C once training is under way (seen on the progress bar, no fixed
    sleep) -> exit 130 and a resume command; that command continues the run to the end."""
    run = tmp_path / 'cli'
    args = as_cli(tv(synthetic_betons, run, **{'data.batch_size': 2, 'training.epochs': 2,
                                               'output.progress': 'on'}))
    p = subprocess.Popen([PY, 'scripts/train.py', '--config', 'tiny_cpu', *args], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    seen = ''
    while not any(f' {k}/200 ' in seen for k in range(3, 200)):  # a few steps done
        chunk = p.stderr.read(1)
        assert chunk, f'training ended before a step was seen: {seen[-2000:]}'
        seen += chunk
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    hint = err.strip().splitlines()[-1]
    assert hint.startswith('interrupted; checkpoint saved. Resume with: python scripts/train.py --resume ')
    ckpt = Path(hint.rsplit(' ', 1)[1])
    assert ckpt == run / 'interrupted.pt' and 'Traceback' not in err + seen
    code, out, err = run_main('train', '--resume', ckpt, '--output.progress', 'off', '--training.epochs', 1)
    assert code == 0, err
    assert f'resuming {ckpt} at epoch 1, batch' in out
    assert json.loads(lines(run / 'metrics.jsonl')[-1])['train_images'] == 400


@pytest.mark.parametrize('loader', ['torchvision', 'ffcv'])
def test_ctrl_c_to_the_process_group_in_epoch_2_stops_cleanly(synthetic_betons, tmp_path, loader):
    """A terminal's Ctrl-C goes to the whole foreground process group: the trainer *and* its
    loader workers. Sent so (``killpg``) a few steps into epoch 2, with either loader: exit 130,
    the one-line resume hint, a resumable interrupted.pt, no traceback and no dead-worker error
    (with the torchvision loader a worker used to die of it: "DataLoader worker ... exited
    unexpectedly" instead of the stop at a batch boundary)."""
    run = tmp_path / 'group'
    args = as_cli(tiny(synthetic_betons, run, **{'data.loader': loader, 'data.batch_size': 4, 'training.epochs': 2,
                                                 'data.train_per_class': 2, 'output.progress': 'on',
                                                 'data.num_workers': 2}))  # 50 steps per epoch
    p = subprocess.Popen([PY, 'scripts/train.py', '--config', 'tiny_cpu', *args], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    seen = ''
    while 'epoch 2/2' not in seen or not any(f' {k}/50 ' in seen.split('epoch 2/2')[-1] for k in range(3, 45)):
        chunk = p.stderr.read(1)
        assert chunk, f'training ended before epoch 2 was under way: {seen[-2000:]}'
        seen += chunk
    os.killpg(p.pid, signal.SIGINT)  # what the terminal does: every process of the group
    out, err = p.communicate(timeout=120)
    err = seen + err
    assert p.returncode == 130, err[-3000:]
    assert 'Traceback' not in err and 'exited unexpectedly' not in err, err[-3000:]
    hint = err.strip().splitlines()[-1]
    assert hint.startswith('interrupted; checkpoint saved. Resume with: python scripts/train.py --resume ')
    ckpt = torch.load(run / 'interrupted.pt', weights_only=True, map_location='cpu')
    assert ckpt['epoch'] == 1 and ckpt['batch'] > 0


def test_grad_scaler_state_round_trips_through_a_checkpoint(tmp_path):
    """fp16 training (a GPU's) resumes with its loss scale and growth tracker: the scaler state
    goes into the checkpoint, through torch.save/load (weights_only), and back into an enabled
    scaler. (fp16 is refused on the CPU, so the round trip is tested directly.) Catches a resume
    that drops the scaler state (the scale would restart at 65536)."""
    from training.config import load_config
    from training.state import Position, restore, training_checkpoint
    from training.optim import make_optimizer
    cfg = load_config('tiny_cpu', ['model.width=8'])
    model = torch.nn.Linear(4, 2)
    opt = make_optimizer(model, cfg.training)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10, growth_interval=3)
    x = torch.randn(8, 4)
    for overflow in (True, False, False):  # one overflow halves the scale; two good steps count up
        opt.zero_grad()
        loss = model(x).sum() * (float('inf') if overflow else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    saved = scaler.state_dict()
    assert saved['scale'] == 512.0 and saved['_growth_tracker'] == 2
    from conftest import CIFAR10
    ck = training_checkpoint(model, cfg, dataset=CIFAR10, pos=Position(epoch=1),
                             metrics=None, n_params=10, optimizer=opt, scaler=scaler)
    torch.save(ck, tmp_path / 'ck.pt')
    fresh, fresh_model = torch.amp.GradScaler('cpu'), torch.nn.Linear(4, 2)
    pos = restore(tmp_path / 'ck.pt', model=fresh_model, optimizer=make_optimizer(fresh_model, cfg.training),
                  scaler=fresh)
    assert pos.epoch == 1 and fresh.state_dict() == saved
    assert torch.equal(fresh_model.weight, model.weight)
    assert torch.amp.GradScaler('cpu', enabled=False).state_dict() == {}  # what bf16/fp32 runs save


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(ref_run, tmp_path):
    run = tmp_path / 'diverge'
    run.mkdir()
    shutil.copy(ref_run / 'epoch_001.pt', run / 'last.pt')
    before = (run / 'last.pt').read_bytes()
    code, out, err = run_main('train', '--resume', run / 'last.pt', '--training.lr', '1e30',
                              '--output.progress', 'off')
    assert code == 3, err
    err = err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: training diverged: the loss is')
    assert 'last good checkpoint' in err[0]
    assert (run / 'last.pt').read_bytes() == before
    assert not (run / 'best.pt').exists()


def test_full_disk_during_a_checkpoint(small_disk, ref_run, synthetic_betons, tmp_path):
    """The disk fills up while epoch 2's checkpoint is written (2.5 MB: epoch 1's last.pt/best.pt
    pair, 1.5 MB, fits; a second copy beside it does not): one line naming the file and the
    full disk, exit code 2, no temporary file left, and epoch 1's checkpoint intact and
    resumable (finishing the run elsewhere gives the uninterrupted weights)."""
    run = small_disk / 'run'
    code, out, err = run_main('train', '--config', 'tiny_cpu', *as_cli(tv(synthetic_betons, run, **{
        'data.batch_size': 20})))  # ref_run's recipe
    lines_ = err.strip().splitlines()
    assert code == 2 and len(lines_) == 1, err
    assert lines_[0].startswith(f'error: {run / "last.pt"}: the disk is full (No space left on device')
    assert 'resume with: python scripts/train.py --resume' in lines_[0]
    assert not [p.name for p in run.iterdir() if p.name.startswith('.') and p.name != '.lock']  # (the run's lock stays)
    assert torch.load(run / 'last.pt', weights_only=True)['epoch'] == 1
    moved = tmp_path / 'moved'
    shutil.copytree(run, moved)
    resume(moved / 'last.pt')
    assert same_weights(ref_run / 'last.pt', moved / 'last.pt')


def test_no_room_even_for_the_temporary_file(few_inodes_disk):
    """The file system cannot create one more file (out of inodes: ENOSPC at create time, before
    a byte is written): the same one-line DiskFullError naming the file, the previous version
    intact. Catches a creation failure that escapes as a bare OSError."""
    from model.fileio import DiskFullError, atomic_write_text
    target = few_inodes_disk / 'last.json'
    atomic_write_text(target, 'epoch 1')
    for i in range(100):  # use up the inodes
        try:
            (few_inodes_disk / f'filler{i}').touch()
        except OSError:
            break
    with pytest.raises(DiskFullError) as e:
        atomic_write_text(target, 'epoch 2')
    assert str(e.value).startswith(f'{target}: the disk is full (No space left on device')
    assert target.read_text() == 'epoch 1' and not [p for p in few_inodes_disk.iterdir() if p.name.startswith('.')]


@pytest.mark.parametrize('victim', ['metrics.jsonl', 'summary.json', 'curves.png'])
def test_full_disk_while_writing_metrics_summary_or_plot(synthetic_betons, tmp_path, monkeypatch, victim):
    """ENOSPC injected into the write of one file (the real tmpfs test above covers
    checkpoints): one line naming that file, exit 2, no temporary files, checkpoints intact."""
    import model.fileio as F
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f'/proc/self/fd/{fd}').split('/')[-1].startswith(f'.{victim}.'):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)
    monkeypatch.setattr(F.os, 'fsync', fsync)
    run = tmp_path / 'run'
    code, out, err = run_main('train', '--config', 'tiny_cpu', *as_cli(tv(synthetic_betons, run, **{'output.plot': True})))
    assert code == 2 and err.startswith(f'error: {run / victim}: the disk is full'), err
    assert len(err.strip().splitlines()) == 1
    assert not [p.name for p in run.iterdir() if p.name.startswith('.') and p.name != '.lock']
    if victim != 'metrics.jsonl':  # epoch 2 finished: its checkpoint is complete
        assert torch.load(run / 'last.pt', weights_only=True)['epoch'] == 2
    else:  # the first epoch's line could not be written: no checkpoint claims otherwise
        assert not (run / 'last.pt').exists()


def test_stop_mid_epoch_then_resume_with_the_ema_on(synthetic_betons, tmp_path):
    """``training.ema`` on: Ctrl-C at step 5 of 20, resumed, ends on the uninterrupted run's
    averaged weights ('model') *and* raw weights ('raw_model') bit for bit, with the same update
    count. Catches an EMA that is not saved (the resumed average would restart from the raw
    weights), one that is not restored, a raw model resumed from the averaged weights, and a
    lost update counter (another warm-up decay)."""
    from training.config import load_config
    from training.trainer import Trainer, TrainingInterrupted, train
    ema = {'data.batch_size': 20, 'training.ema': 0.95, 'training.ema_every': 3}
    ref = tmp_path / 'ref'
    train('tiny_cpu', tv(synthetic_betons, ref, **ema), log=lambda *_: None)
    run = tmp_path / 'stopped'
    trainer = Trainer(load_config('tiny_cpu', tv(synthetic_betons, run, **ema)), log=lambda *_: None)
    _interrupt_at(trainer, 5)
    with pytest.raises(TrainingInterrupted):
        trainer.run()
    assert torch.load(run / 'interrupted.pt', weights_only=True)['ema']['updates'] >= 1
    resume(run / 'interrupted.pt')
    a, b = (torch.load(p / 'last.pt', weights_only=True) for p in (ref, run))
    assert a['ema'] == b['ema'] == {'decay': 0.95, 'every': 3, 'updates': 40 // 3}
    assert same_weights(a['model'], b['model']) and same_weights(a['raw_model'], b['raw_model'])
    assert not same_weights(a['model'], a['raw_model'])
