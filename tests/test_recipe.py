"""The recipe itself, as the trainer runs it: each test fails when one ingredient is dropped.

Label smoothing, gradient clipping and weight decay only on conv/linear weights (checked as the
exact SGD update of the trainer's own step); best.pt only on a better top-1; the test loader
reading ``data.test_path``; and the trainer paths no other test runs (``training.compile``,
``grad_clip > 0``, ``eval_every > 1``, ``tta: false``).
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, same_weights, tiny

QUIET = dict(log=lambda *_: None)


def trainer_after_setup(betons, out, **overrides):
    from training.config import load_config
    from training.trainer import Trainer
    overrides = {'training.precision': 'fp32', **overrides}  # the closed forms below are fp32 maths
    t = Trainer(load_config('tiny_cpu', tiny(betons, out, **overrides)), config_name='recipe', **QUIET)
    t.setup()
    return t


def test_the_trainers_step_smooths_labels_clips_and_decays_only_weights(synthetic_betons, tmp_path):
    """One step of the trainer's own TrainStep/optimizer equals SGD written out by hand:
    smoothed cross-entropy, gradients clipped to the configured norm, weight decay on
    dim >= 2 parameters only (BatchNorm weights/biases and the fc bias undecayed). Momentum
    0 keeps the update a closed form. Catches: a step ignoring label smoothing or grad_clip,
    weight decay on BatchNorm, a trainer not passing the config to the step."""
    wd, clip, smoothing, lr = 0.5, 0.05, 0.3, 0.1
    t = trainer_after_setup(synthetic_betons, tmp_path / 'run', **{
        'training.label_smoothing': smoothing, 'training.grad_clip': clip,
        'training.momentum': 0.0, 'training.weight_decay': wd})
    try:
        groups = t.train_step.optimizer.param_groups
        assert sum(len(g['params']) for g in groups) == len(list(t.model.parameters()))
        for g in groups:
            for p in g['params']:
                assert g['weight_decay'] == (wd if p.dim() >= 2 else 0.0), tuple(p.shape)
        torch.manual_seed(1)
        x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 100, (16,))
        ref = copy.deepcopy(t.model).train()
        logits = ref(x)
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        assert abs(float(F.cross_entropy(logits, y).detach()) - float(loss.detach())) > 0.01  # smoothing shows
        loss.backward()
        assert torch.nn.utils.clip_grad_norm_(ref.parameters(), clip) > 10 * clip  # clipping bites
        with torch.no_grad():
            want = {n: p - lr * (p.grad + (wd * p if p.dim() >= 2 else 0.0))
                    for n, p in ref.named_parameters()}
        got, _ = t.train_step(x, y, lr / t.cfg.training.lr)  # the schedule's multiplier
        assert float(got) == pytest.approx(float(loss.detach()), rel=1e-5)
        for n, p in t.model.named_parameters():
            torch.testing.assert_close(p.detach(), want[n], rtol=1e-4, atol=1e-6, msg=n)
    finally:
        t.data.close()


def test_best_pt_is_written_only_when_top1_improves(synthetic_betons, tmp_path, monkeypatch):
    """Evaluations scoring 0.30, 0.20, 0.25: best.pt stays epoch 1's (its weights, its
    metrics), last.pt is epoch 3's. Catches: best.pt written every epoch, or on any top-1."""
    from training.trainer import Trainer, train
    scores = iter([0.30, 0.20, 0.25])
    monkeypatch.setattr(Trainer, 'evaluate', lambda self: (next(scores), 0.5, 0.0, 200))
    out = tmp_path / 'run'
    summary = train('tiny_cpu', tiny(synthetic_betons, out, **{
        'training.epochs': 3, 'data.loader': 'torchvision', 'data.train_per_class': 1}), **QUIET)
    best, last = (torch.load(out / n, map_location='cpu', weights_only=True) for n in ('best.pt', 'last.pt'))
    assert (best['epoch'], best['metrics']['test_top1'], last['epoch']) == (1, 0.30, 3)
    assert best['best_top1'] == last['best_top1'] == summary['best_top1'] == 0.30
    assert not same_weights(best['model'], last['model'])


@pytest.mark.parametrize('loader', ['ffcv', 'torchvision'])
def test_the_test_loader_reads_the_test_file(loader, synthetic_betons, synthetic_data, tmp_path):
    """Every test label, in file order, is the test split's (the synthetic train and test
    splits have other labels in another order). Catches: a test loader opening
    data.train_path (the indices of the 200 test images exist in the 400-image train file)."""
    from ffcv_pipeline.data import build_data
    from training.config import load_config
    cfg = load_config('tiny_cpu', tiny(synthetic_betons, tmp_path / 'run', **{'data.loader': loader}))
    data = build_data(cfg, device=torch.device('cpu'), dtype=torch.float32, root=ROOT, workers=2,
                      channels_last=False)
    try:
        labels = torch.cat([y for _, y in data.test.epoch(0)]).tolist()
    finally:
        data.close()
    assert labels == list(synthetic_data[2]['fine_labels'])


def test_clipped_run_evaluating_every_second_epoch_without_tta(synthetic_betons, tmp_path):
    """grad_clip > 0, eval_every 2 and tta false, through the trainer: epoch 1 is not
    evaluated, epochs 2 and 3 (the last) are, and the summary reads those. Catches:
    eval_every ignored, the last epoch not evaluated, a summary counting skipped epochs."""
    from training.trainer import train
    out = tmp_path / 'run'
    summary = train('tiny_cpu', tiny(synthetic_betons, out, **{
        'training.epochs': 3, 'training.grad_clip': 1.0, 'training.eval_every': 2,
        'training.tta': False, 'data.loader': 'torchvision', 'data.train_per_class': 1}), **QUIET)
    records = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [1, 2, 3]
    assert [r['test_images'] for r in records] == [0, 200, 200]
    assert records[0]['test_top1'] is None and all(0 <= r['test_top1'] <= 1 for r in records[1:])
    assert summary['best_top1'] == max(r['test_top1'] for r in records[1:])
    assert summary['final_top1'] == records[2]['test_top1']
    last = torch.load(out / 'last.pt', map_location='cpu', weights_only=True)
    assert last['config']['training']['grad_clip'] == 1.0 and last['step'] == 6  # 100 images, batch 50


def test_a_checkpoint_of_a_compiled_model_holds_the_bare_weights():
    """torch.compile wraps the model (its state_dict keys gain ``_orig_mod.``); a checkpoint
    must hold the bare model's keys, loadable without compiling. Wrapping compiles nothing
    yet, so this is fast. Catches: make_checkpoint saving the wrapper as is."""
    from conftest import CIFAR100
    from model import build_model
    from model.checkpoint import make_checkpoint, model_from_checkpoint
    mcfg = {'arch': 'resnet18', 'num_classes': 100, 'width': 8}
    bare = build_model(mcfg)
    compiled = torch.compile(bare)
    assert all(k.startswith('_orig_mod.') for k in compiled.state_dict())
    ckpt = make_checkpoint(compiled, model_config=mcfg, dataset=CIFAR100.to_dict())
    assert list(ckpt['model']) == list(bare.state_dict())
    assert same_weights(model_from_checkpoint(ckpt).state_dict(), ckpt['model'])


@pytest.mark.slow  # ~80 s on 2 cores: Inductor compiles the training and evaluation graphs
def test_compiled_run_saves_the_bare_model(synthetic_betons, tmp_path):
    """training.compile through the trainer: Dynamo really captures graphs, the run trains and
    evaluates, and its checkpoint loads into a fresh, uncompiled model. Catches: the setting
    ignored (no graph captured), a compiled run whose checkpoint only a compiled model loads."""
    from torch._dynamo.utils import counters
    from model.checkpoint import model_from_checkpoint
    from training.trainer import train
    out = tmp_path / 'run'
    counters.clear()
    summary = train('tiny_cpu', tiny(synthetic_betons, out, **{
        'training.compile': True, 'data.loader': 'torchvision', 'data.train_per_class': 1}), **QUIET)
    assert summary['final_top1'] is not None and counters['stats']['unique_graphs'] >= 1
    last = torch.load(out / 'last.pt', map_location='cpu', weights_only=True)
    assert last['config']['training']['compile'] is True
    assert not any(k.startswith(('_orig_mod.', 'module.')) for k in last['model'])
    model_from_checkpoint(last)


def test_the_trainers_evaluation_uses_the_configured_tta(synthetic_betons, tmp_path):
    """The same weights evaluated by the trainer with ``training.tta`` on and off: with it, the
    counts are those of the summed logits of each image and its mirror (recomputed here), and
    they differ from the plain evaluation. Catches an evaluation that ignores the flip TTA."""
    results = {}
    for tta in (True, False):
        t = trainer_after_setup(synthetic_betons, tmp_path / f'tta{tta}', **{'training.tta': tta, 'model.width': 16})
        try:
            torch.manual_seed(3)
            with torch.no_grad():  # varied predictions, which the mirror images change
                for m in t.model.modules():
                    if isinstance(m, torch.nn.BatchNorm2d):
                        m.running_mean.uniform_(-0.3, 0.3)
                        m.running_var.uniform_(0.1, 0.5)
                t.model.fc.weight.normal_(0, 3.0)
            results[tta] = t.evaluate()[:2]
            if tta:
                t.model.eval()
                with torch.no_grad():
                    xs, ys = zip(*t.data.test.epoch(0))
                    x, y = torch.cat(xs), torch.cat(ys)
                    logits = t.model(x) + t.model(torch.flip(x, dims=[3]))
                    keep = y >= 0
                    want = float((logits.argmax(1)[keep] == y[keep]).float().mean())
                assert results[tta][0] == pytest.approx(want, abs=1e-9)
        finally:
            t.data.close()
    assert results[True] != results[False]
