"""Optimizers and LR schedules by name (issue 26): the registries, Muon's arithmetic against
torch's, the refusals, and each new choice training tiny_cpu and resuming bit for bit on the
CPU in fp32, as SGD does. Every docstring names the mutation it catches."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import same_weights, tiny


# ---- schedules ---------------------------------------------------------------------------------
def test_linear_and_cosine_warm_up_then_decay_to_zero():
    from training.schedule import scales
    s = scales('linear', total=100, warmup=20)
    assert len(s) == 100 and s[19] == pytest.approx(1.0) and s[0] == pytest.approx(0.05)
    assert np.all(np.diff(s[:20]) > 0) and np.all(np.diff(s[20:]) < 0) and s[-1] < 1 / 50
    c = scales('cosine', total=100, warmup=20)
    assert c[20] == pytest.approx(1.0) and c[60] == pytest.approx(0.5) and c[-1] < 1e-3


def test_onecycle_is_torchs_one_cycle_step_by_step():
    """``training.schedule: onecycle`` = ``torch.optim.lr_scheduler.OneCycleLR`` with pct_start =
    warm-up / total, every step. Catches another rise (linear), floor or phase boundary."""
    from training.schedule import scales
    for total, warm in ((10, 3), (97, 20), (50, 2)):
        opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=total, pct_start=warm / total)
        want = []
        for i in range(total):
            want.append(opt.param_groups[0]['lr'])
            opt.step()
            if i + 1 < total:
                sched.step()
        np.testing.assert_allclose(scales('onecycle', total=total, warmup=warm), want, rtol=1e-9, atol=1e-12)


def test_piecewise_points_and_their_validation():
    from training.config import ConfigError, load_config
    from training.schedule import lr_scales
    cfg = load_config('tiny_cpu', ['training.schedule=piecewise',
                                   'training.schedule_points=[[0,0.2],[0.25,1],[1,0.07]]'])
    s = lr_scales(cfg.training, 10)  # tiny_cpu: 2 epochs
    assert len(s) == 20 and s[0] == pytest.approx(0.2) and s[5] == pytest.approx(1.0)
    assert s[-1] == pytest.approx(np.interp(19 / 20, [0, 0.25, 1], [0.2, 1, 0.07]))
    for bad in ('[]', '[[0,1]]', '[[0.1,1],[1,0]]', '[[0,1],[0.5,2],[0.4,0],[1,0]]', '[[0,-1],[1,0]]'):
        with pytest.raises(ConfigError, match='training.schedule_points'):
            load_config('tiny_cpu', ['training.schedule=piecewise', f'training.schedule_points={bad}'])


def test_unknown_names_list_the_registered_ones():
    from training.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"training.optimizer: 'lion' is not one of \['adamw', 'muon', 'sgd'\]"):
        load_config('tiny_cpu', ['training.optimizer=lion'])
    with pytest.raises(ConfigError, match=r"training.schedule: 'step' is not one of \['cosine', 'linear', 'onecycle', 'piecewise'\]"):
        load_config('tiny_cpu', ['training.schedule=step'])


def test_the_old_lr_schedule_key_still_loads(tmp_path):
    """``training.lr_schedule`` (configs and checkpoints before issue 26) is read as
    ``training.schedule``; both at once with different values is refused."""
    from training.config import ConfigError, load_config
    old = tmp_path / 'old.yaml'
    old.write_text('training:\n  lr_schedule: cosine\n')
    assert load_config(old).training.schedule == 'cosine'
    assert load_config(None, ['training.lr_schedule=cosine']).training.schedule == 'cosine'
    assert load_config(None, base={'training': {'lr_schedule': 'cosine'}}).training.schedule == 'cosine'
    old.write_text('training:\n  lr_schedule: cosine\n  schedule: linear\n')
    with pytest.raises(ConfigError, match='both given'):
        load_config(old)


def test_a_new_schedule_or_optimizer_is_one_registration(monkeypatch):
    """Registering a name is all it takes for the config to accept it and the trainer's
    factories to build it."""
    from training import optim, schedule
    from training.config import load_config
    monkeypatch.setitem(schedule.SCHEDULES, 'flat', lambda total, warm, tc: np.ones(total))
    monkeypatch.setitem(optim.OPTIMIZERS, 'plain', optim.OptimizerEntry(
        lambda model, tc: (torch.optim.SGD, optim._decay_groups(model, tc), {})))
    cfg = load_config('tiny_cpu', ['training.schedule=flat', 'training.optimizer=plain'])
    assert schedule.lr_scales(cfg.training, 5).tolist() == [1.0] * 10
    opt = optim.make_optimizer(torch.nn.Linear(3, 2), cfg.training)
    assert type(opt) is torch.optim.SGD and [g['name'] for g in opt.param_groups] == ['weights', 'others']


# ---- the optimizers -----------------------------------------------------------------------------
def test_refused_combinations_are_one_line():
    """Keys only another optimizer reads, the fused SGD or the CUDA graph without an SGD to run
    them, Muon's momentum out of range, and switching optimizer on resume."""
    from training.config import RESUME_REFUSED, ConfigError, load_config
    for overrides, match in (
            (['training.muon_lr=0.1'], r"training.muon_lr: only read by training.optimizer \['muon'\], not by 'sgd'"),
            (['training.optimizer=adamw', 'training.momentum=0.8'], "training.momentum: only read by"),
            (['training.optimizer=adamw', 'training.fused_sgd=true'], "training.fused_sgd: training.optimizer 'adamw'"),
            (['training.optimizer=muon', 'training.cuda_graph=true'], 'training.cuda_graph: captures the fused SGD step only'),
            (['training.optimizer=muon', 'training.muon_momentum=1'], 'training.muon_momentum'),
            (['training.optimizer=adamw', 'training.adam_betas=[0.9]'], 'training.adam_betas')):
        with pytest.raises(ConfigError, match=match):
            load_config('tiny_cpu', overrides)
    assert 'training.optimizer' in RESUME_REFUSED
    load_config('tiny_cpu', ['training.optimizer=muon', 'training.fused_sgd=true', 'training.momentum=0.8'])


def test_muon_groups_the_resnets_parameters_as_airbench_does():
    """Muon on every conv kernel (dim >= 2 but the head), SGD with training.lr/momentum on the
    head (decayed) and on BatchNorm parameters and biases (not decayed). Catches the head or a
    BatchNorm parameter given to Muon, and a group with another group's LR or decay."""
    from model import build_model
    from training.config import load_config
    from training.optim import make_optimizer
    tc = load_config('tiny_cpu', ['training.optimizer=muon', 'training.muon_lr=0.03',
                                  'training.muon_weight_decay=0.01']).training
    m = build_model({'arch': 'resnet18', 'num_classes': 10, 'width': 8})
    opt = make_optimizer(m, tc)
    g = {x['name']: x for x in opt.param_groups}
    assert list(g) == ['muon', 'head', 'others']
    convs = [mod.weight for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [id(p) for p in g['muon']['params']] == [id(p) for p in convs]
    assert [id(p) for p in g['head']['params']] == [id(m.fc.weight)]
    assert sum(len(x['params']) for x in g.values()) == len(list(m.parameters()))
    assert (g['muon']['peak_lr'], g['muon']['momentum'], g['muon']['weight_decay'], g['muon']['muon']) == (0.03, 0.95, 0.01, True)
    assert (g['head']['peak_lr'], g['head']['momentum'], g['head']['weight_decay']) == (tc.lr, 0.9, tc.weight_decay)
    assert (g['others']['weight_decay'], g['others']['muon']) == (0.0, False)


def test_muon_is_torchs_muon_on_matrices_and_on_flattened_kernels():
    """On a 2-D weight our Muon step equals ``torch.optim.Muon``'s bit for bit (nesterov, lr
    adjustment, decoupled decay, 3 steps); on a conv kernel (contiguous and channels-last) it is
    torch's Muon on the (out, in*k*k) matrix, the update written into the kernel itself.
    Catches a missing orthogonalization, another LR scale, decay applied after the update, a
    channels-last kernel flattened in the wrong column order, and an update written to a copy."""
    from training.muon import Muon
    g = torch.Generator().manual_seed(0)
    for shape, fmt in (((6, 10), None), ((8, 3, 3, 3), torch.contiguous_format), ((8, 4, 3, 3), torch.channels_last),
                       ((12, 5), None)):
        w0 = torch.randn(*shape, generator=g)
        grads = [torch.randn(*shape, generator=g) for _ in range(3)]
        ours = torch.nn.Parameter(w0.clone() if fmt is None else w0.clone().contiguous(memory_format=fmt))
        ref = torch.nn.Parameter(w0.reshape(shape[0], -1).clone())
        a = Muon([{'params': [ours], 'muon': True, 'lr': 0.05, 'momentum': 0.9, 'nesterov': True, 'weight_decay': 0.1}])
        b = torch.optim.Muon([ref], lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)
        for gr in grads:
            ours.grad = gr.clone() if fmt is None else gr.clone().contiguous(memory_format=fmt)
            ref.grad = gr.reshape(shape[0], -1).clone()
            a.step()
            b.step()
        got = ours.detach().reshape(shape[0], -1)
        if fmt is None:
            assert torch.equal(got, ref.detach()), shape
        else:  # bf16 Newton-Schulz on the columns in another order: equal to bf16 rounding
            torch.testing.assert_close(got, ref.detach(), rtol=0, atol=2e-2)
            assert not torch.equal(ours.detach(), w0) and ours.is_contiguous(memory_format=fmt)
        assert (got - w0.reshape(shape[0], -1)).abs().max() > 0.05  # it moved


def test_muon_sgd_groups_step_exactly_as_torchs_sgd():
    """The non-Muon groups (head, BatchNorm, biases) take torch's SGD step, foreach or fused:
    the same weights as ``torch.optim.SGD``. Catches a hand-written SGD that drops Nesterov or
    decay, and momentum buffers that are not kept between steps."""
    from training.muon import Muon
    for fused in (False, True):
        torch.manual_seed(0)
        a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
        b.load_state_dict(a.state_dict())
        ours = Muon([{'params': [a.weight], 'lr': 0.1, 'momentum': 0.9, 'nesterov': True, 'weight_decay': 0.01},
                     {'params': [a.bias], 'lr': 0.1, 'momentum': 0.9, 'nesterov': True}], fused=fused)
        ref = torch.optim.SGD([{'params': [b.weight], 'weight_decay': 0.01}, {'params': [b.bias]}],
                              lr=0.1, momentum=0.9, nesterov=True)
        x = torch.randn(8, 5)
        for _ in range(3):
            for net, opt in ((a, ours), (b, ref)):
                opt.zero_grad()
                net(x).square().sum().backward()
                opt.step()
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a.bias, b.bias, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('name', ['adamw', 'muon'])
def test_eager_steps_of_every_optimizer_import_no_dynamo(name):
    """The eager path (no torch._dynamo import, 0.9 s) holds for AdamW and Muon too, in a fresh
    process. Catches an optimizer whose kernels import it at their first call."""
    import subprocess
    from conftest import PY, ROOT
    extra = {'adamw': "'training.lr=0.002'", 'muon': ''}[name]
    code = f'''
import sys, torch
from model import build_model
from training.config import load_config
from training.optim import make_optimizer
from training.step import TrainStep
cfg = load_config('tiny_cpu', ['training.optimizer={name}', {extra}])
m = build_model({{'arch': 'resnet18', 'width': 8, 'num_classes': 10}})
step = TrainStep(m, make_optimizer(m, cfg.training), device=torch.device('cpu'), dtype=torch.float32)
x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
losses = [step(x, y, 1.0)[0].item() for _ in range(3)]
print('dynamo imported:', 'torch._dynamo' in sys.modules, losses[-1] < losses[0])
'''
    r = subprocess.run([PY, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-2:] == ['False', 'True'], r.stdout


# ---- each new choice trains and resumes exactly ----------------------------------------------------
CHOICES = {
    'muon': {'training.optimizer': 'muon'},
    'adamw': {'training.optimizer': 'adamw', 'training.lr': 0.002, 'training.weight_decay': 0.05},
    'onecycle': {'training.schedule': 'onecycle'},
}


@pytest.mark.parametrize('choice', list(CHOICES))
def test_each_choice_trains_and_resumes_bit_for_bit(choice, synthetic_betons, tmp_path):
    """tiny_cpu (fp32, 20 steps per epoch) with ``--training.optimizer muon``, ``adamw`` or
    ``--training.schedule onecycle``: the loss falls from epoch 1 to 2, and resuming epoch 2
    from epoch 1's checkpoint in another trainer ends on the same weights bit for bit. Catches
    optimizer state (Muon's or AdamW's moments) that is not saved or not restored, and a
    schedule that restarts on resume."""
    from training.trainer import train
    over = {'data.loader': 'torchvision', 'data.batch_size': 20, 'output.save_every': 1, **CHOICES[choice]}
    ref = tmp_path / 'ref'
    train('tiny_cpu', tiny(synthetic_betons, ref, **over), log=lambda *_: None)
    records = [json.loads(line) for line in (ref / 'metrics.jsonl').read_text().splitlines()]
    print(choice, [round(r['train_loss'], 4) for r in records], [r['test_top1'] for r in records])
    assert records[1]['train_loss'] < records[0]['train_loss']
    ck = torch.load(ref / 'epoch_001.pt', weights_only=True)
    assert ck['optimizer']['state'] and ck['config']['training'][list(CHOICES[choice])[0].split('.')[1]] == \
        list(CHOICES[choice].values())[0]
    run = tmp_path / 'resumed'
    run.mkdir()
    shutil.copy(ref / 'epoch_001.pt', run / 'last.pt')
    train(None, ['output.progress=off'], resume=str(run / 'last.pt'), log=lambda *_: None)
    assert same_weights(ref / 'last.pt', run / 'last.pt')


def test_a_resumed_run_takes_its_config_s_optimizer_settings(synthetic_betons, tmp_path):
    """Resuming with ``--training.weight_decay`` (accepted, with a note) really decays with the
    new value: the checkpoint's momentum buffers come back, its old settings do not. Catches
    ``load_state_dict`` silently restoring the checkpoint's weight decay, momentum or peak LR."""
    from training.config import load_config
    from training.trainer import Trainer, train
    run = tmp_path / 'run'
    train('tiny_cpu', tiny(synthetic_betons, run, **{'data.loader': 'torchvision', 'training.epochs': 1,
                                                     'data.train_per_class': 1}), log=lambda *_: None)
    cfg = load_config(None, ['training.weight_decay=0.125', 'training.lr=0.3', 'training.epochs=2'],
                      base=torch.load(run / 'last.pt', weights_only=True)['config'])
    t = Trainer(cfg, resume=str(run / 'last.pt'), log=lambda *_: None)
    t.setup()
    try:
        g = {x['name']: x for x in t.train_step.optimizer.param_groups}
        assert (g['weights']['weight_decay'], g['weights']['peak_lr'], g['others']['weight_decay']) == (0.125, 0.3, 0.0)
        assert all('momentum_buffer' in s for s in t.train_step.optimizer.state.values())
    finally:
        t.data.close()
        t.run_dir.close()
