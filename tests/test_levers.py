"""Issue 17's levers, each shown to take effect on the CPU: float32 normalization before the
cast to the AMP dtype, multi-view TTA, weight averaging (EMA), the optimizer and LR paths of the
step (foreach/fused, tensor LR), CUDA-graph refusal on the CPU and torch.compile against eager.
Every docstring names the mutation it catches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import CIFAR100_MEAN, CIFAR100_STD


def u8_batch(n=8, seed=0) -> torch.Tensor:
    """Every pixel value 0..255 in every channel, channels-last like ToTorchImage's output."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    x[0].view(-1, 3)[:256] = torch.arange(256, dtype=torch.uint8)[:, None]
    return x.permute(0, 3, 1, 2)


# ---- 17.1: normalization in float32, then the cast --------------------------------------------
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_normalize_computes_in_float32_then_rounds_once(dtype):
    """A bf16/fp16 batch is exactly the float32 normalization rounded to that dtype, keeps the
    channels-last layout, and differs from the old arithmetic in the low dtype (mean and 1/std
    rounded to bf16, then subtract and multiply in bf16) on some pixel. Catches a return to the
    low-precision arithmetic."""
    from ffcv_pipeline.pixels import Normalize
    x = u8_batch()
    out = Normalize(CIFAR100_MEAN, CIFAR100_STD, dtype)(x)
    f32 = Normalize(CIFAR100_MEAN, CIFAR100_STD, torch.float32)(x)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, f32.to(dtype))
    mean = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)
    ref = (x.double() - mean.double()) / torch.tensor(CIFAR100_STD).double().view(1, 3, 1, 1)
    assert (f32.double() - ref).abs().max() < 1e-6
    old = x.to(dtype).sub_(mean.to(dtype)).mul_((1 / torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)).to(dtype))
    if dtype == torch.bfloat16:
        assert (old.double() - ref).abs().max() > 5e-3  # the error the issue measured (~0.012)
    assert not torch.equal(old, out)
    assert (out.double() - ref).abs().max() <= (old.double() - ref).abs().max()


def test_every_normalization_path_gives_the_same_bits():
    """Every uint8 value in every channel through the four normalizations: ``Normalize`` (the
    GPU path's float32 arithmetic), the FFCV CPU pipeline's lookup kernel, the resident test
    split and the app's preprocessing give the same float32 bits. Catches a table computed
    another way (in float64 and rounded once, as FFCV's ``NormalizeImage``: 372 of the 768
    values 1 ulp off)."""
    from app.images import normalize as app_normalize
    from ffcv_pipeline.pixels import Normalize, normalization_table
    from ffcv_pipeline.resident import ResidentSplit
    nhwc = np.stack([np.roll(np.arange(256, dtype=np.uint8), 85 * c) for c in range(3)], -1)
    nhwc = np.ascontiguousarray(nhwc.reshape(1, 16, 16, 3))
    device_path = Normalize(CIFAR100_MEAN, CIFAR100_STD, dtype=torch.float32)(torch.from_numpy(nhwc).permute(0, 3, 1, 2))
    split = ResidentSplit(nhwc, np.zeros(1, np.int64), device=torch.device('cpu'), dtype=torch.float32,
                          batch_size=1, mean=CIFAR100_MEAN, std=CIFAR100_STD)
    assert torch.equal(next(iter(split.epoch(0)))[0], device_path)
    assert np.array_equal(app_normalize(nhwc, CIFAR100_MEAN, CIFAR100_STD), device_path.numpy())
    pytest.importorskip('ffcv', reason='the CPU pipeline kernel needs ffcv/numba')
    from ffcv_pipeline.ops import normalize_kernel
    cpu_path = np.empty(nhwc.shape, np.float32)
    normalize_kernel(nhwc, cpu_path, normalization_table(CIFAR100_MEAN, CIFAR100_STD))
    assert np.array_equal(cpu_path.transpose(0, 3, 1, 2), device_path.numpy())


def test_normalize_leaves_a_float_input_alone():
    """The arithmetic is in place on its own copy: a float32 caller's tensor is not modified."""
    from ffcv_pipeline.pixels import Normalize
    x = u8_batch().float()
    before = x.clone()
    Normalize(CIFAR100_MEAN, CIFAR100_STD, dtype=torch.bfloat16)(x)
    assert torch.equal(x, before)


# ---- 17.2: multi-view TTA -----------------------------------------------------------------------
class Probe(torch.nn.Module):
    """A 'network' whose logits are a fixed linear function of every pixel: each view's logits
    differ, so the weights of the views can be read off."""

    def __init__(self, classes=5, seed=0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3 * 32 * 32, classes, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x):
        return x.reshape(x.shape[0], -1) @ self.w


def test_tta_views_and_weights_are_airbench_mirror_translate():
    """flip + translate t: 0.5 m(x) + 0.25 m(up-left) + 0.25 m(down-right), m = mean over the
    mirror, the shifted views cut from a reflect-padded copy; flip alone = m(x); neither =
    net(x). Catches wrong weights, a missing mirror of the shifted views, zero instead of
    reflect padding and the same shift twice."""
    import torch.nn.functional as F
    from training.tta import tta_logits, tta_views
    net = Probe()
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    mirror = lambda v: (net(v) + net(torch.flip(v, dims=[3]))) / 2
    assert torch.equal(tta_logits(net, x, flip=False, translate=0), net(x))
    torch.testing.assert_close(tta_logits(net, x, flip=True, translate=0), mirror(x))
    for t in (1, 2):
        p = F.pad(x, (t,) * 4, mode='reflect')
        ul, dr = p[:, :, :32, :32], p[:, :, 2 * t:, 2 * t:]
        assert torch.equal(ul[:, :, t:, t:], x[:, :, :32 - t, :32 - t])  # content moved right/down by t
        want = 0.5 * mirror(x) + 0.25 * mirror(ul) + 0.25 * mirror(dr)
        torch.testing.assert_close(tta_logits(net, x, flip=True, translate=t), want)
        want = 0.5 * net(x) + 0.25 * net(ul) + 0.25 * net(dr)
        torch.testing.assert_close(tta_logits(net, x, flip=False, translate=t), want)
    assert [tta_views(f, t) for f in (False, True) for t in (0, 1)] == [1, 3, 2, 6]


def test_tta_translate_changes_a_resnets_logits_and_returns_float32():
    """On a real (untrained) ResNet under bf16 autocast: float32 logits, and the translated
    views change them (so ``training.tta_translate`` takes effect); the evaluation forward count
    is as documented. Catches a translate argument that is ignored."""
    from model import build_model
    from training.tta import tta_logits
    torch.manual_seed(0)
    net = build_model({'arch': 'resnet18', 'num_classes': 10, 'width': 8}).eval()
    calls = []
    net.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        a = tta_logits(net, x, flip=True, translate=0)
        b = tta_logits(net, x, flip=True, translate=1)
    assert a.dtype == b.dtype == torch.float32 and len(calls) == 2 + 6
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match='tta_translate'):
        tta_logits(net, x, flip=False, translate=32)


def test_tta_translate_config_bounds(synthetic_betons, tmp_path):
    """Negative: refused by the config; half the image size or more: refused by the trainer,
    which knows the size (the dataset's), before the first step."""
    from conftest import as_cli, run_main, tiny
    from training.config import ConfigError, load_config
    assert load_config('tiny_cpu', ['training.tta_translate=1']).training.tta_translate == 1
    with pytest.raises(ConfigError, match='training.tta_translate'):
        load_config('tiny_cpu', ['training.tta_translate=-1'])
    code, _, err = run_main('train', '--config', 'tiny_cpu',
                            *as_cli(tiny(synthetic_betons, tmp_path / 'r', **{'training.tta_translate': 16})))
    assert code == 2 and err.startswith('error: training.tta_translate: must lie in [0, 15] for 32x32 images')


# ---- 17.3: weight averaging (EMA) ---------------------------------------------------------------
def small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 30 * 30, 3))


def test_ema_update_is_the_documented_average():
    """After each update e <- d e + (1 - d) w with d = min(decay**every, (1 + n) / (10 + n)),
    for weights *and* BatchNorm running statistics; num_batches_tracked copied; updates only
    every ``every`` steps; the EMA is a separate copy (differs from the raw weights). Catches a
    missing warm-up, averaging by the wrong side (1 - d vs d), BN statistics left at their
    initial values, and ``every`` ignored."""
    from training.ema import EMA
    net = small_net()
    ema = EMA(net, 0.9, every=2)
    ref = {k: v.clone().double() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    n = 0
    for step in range(1, 8):
        net.train()
        loss = net(torch.randn(4, 3, 32, 32)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(net, step)
        if step % 2 == 0:
            d = min(0.9 ** 2, (1 + n) / (10 + n))
            for k, v in net.state_dict().items():
                ref[k] = d * ref[k] + (1 - d) * v.double() if v.is_floating_point() else v.double()
            n += 1
    assert ema.updates == n == 3 and ema.state_dict() == {'decay': 0.9, 'every': 2, 'updates': 3}
    got = ema.module.state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-5, atol=1e-6)
    assert not torch.equal(got['1.running_mean'], torch.zeros(4))  # BN statistics averaged
    assert got['1.num_batches_tracked'] == 6  # copied at the last update (step 6 of 7)
    assert not torch.allclose(got['0.weight'], net.state_dict()['0.weight'])  # not the raw weights
    assert not got['0.weight'].requires_grad and not ema.module.training


def test_ema_config_bounds():
    from training.config import ConfigError, load_config
    for bad in ('training.ema=1.0', 'training.ema=-0.1', 'training.ema_every=0'):
        with pytest.raises(ConfigError, match=bad.split('=')[0]):
            load_config('tiny_cpu', [bad])


def test_ema_run_evaluates_checkpoints_and_exports_the_average(synthetic_betons, tmp_path):
    """A run with ``training.ema``: its checkpoint's 'model' (what the app and export load) is
    the EMA, different from 'raw_model' (the trained weights, for resuming); the reported
    test_top1 is what those EMA weights score and test_top1_raw what the raw ones score (both
    re-evaluated here from the checkpoint); the inference-only export drops the training part.
    Catches an evaluation of the raw model, a checkpoint that saves the raw weights as 'model',
    and an EMA that is never updated."""
    import json
    from conftest import tiny
    from model.checkpoint import model_from_checkpoint, slim_checkpoint
    from training.config import load_config
    from training.trainer import Trainer
    run = tmp_path / 'ema'
    over = tiny(synthetic_betons, run, **{'data.loader': 'torchvision', 'training.ema': 0.99,
                                          'training.ema_every': 2, 'training.precision': 'fp32'})
    Trainer(load_config('tiny_cpu', over), log=lambda *_: None).run()
    ck = torch.load(run / 'last.pt', weights_only=True)
    assert ck['ema'] == {'decay': 0.99, 'every': 2, 'updates': 8}  # 16 steps, every 2nd
    assert ck['model'].keys() == ck['raw_model'].keys()
    assert not torch.equal(ck['model']['fc.weight'], ck['raw_model']['fc.weight'])
    last = json.loads((run / 'metrics.jsonl').read_text().splitlines()[-1])
    assert last['test_top1'] != last['test_top1_raw']  # so the checks below tell them apart
    # re-evaluate both weight sets through the trainer's own evaluation of its raw model
    t = Trainer(load_config('tiny_cpu', tiny(synthetic_betons, tmp_path / 'eval', **{'data.loader': 'torchvision',
                                                                                  'training.precision': 'fp32'})),
                log=lambda *_: None)
    t.setup()
    try:
        t.model.load_state_dict(ck['model'])
        assert t.evaluate(raw=True)[0] == last['test_top1']
        t.model.load_state_dict(ck['raw_model'])
        assert t.evaluate(raw=True)[0] == last['test_top1_raw']
    finally:
        t.data.close()
    slim = slim_checkpoint(ck)
    assert 'raw_model' not in slim and 'ema' not in slim
    served = model_from_checkpoint(slim)
    assert torch.equal(served.state_dict()['fc.weight'], ck['model']['fc.weight'])


# ---- 17.5: the step ---------------------------------------------------------------------------
def _train_steps(tcfg_overrides: list[str], steps=4, compile_=False, plain_loop=False):
    """A width-8 ResNet-18 trained ``steps`` steps on fixed random batches through TrainStep;
    returns (losses, final state_dict, optimizer). ``plain_loop``: torch's SGD over the same
    groups with its reference for-loop implementation (foreach=False)."""
    from model import build_model
    from training.config import load_config
    from training.optim import make_optimizer
    from training.schedule import scales
    from training.step import TrainStep
    cfg = load_config('tiny_cpu', ['training.lr=0.2', *tcfg_overrides])
    torch.manual_seed(0)
    model = build_model({'arch': 'resnet18', 'num_classes': 10, 'width': 8})
    opt = make_optimizer(model, cfg.training)
    if plain_loop:
        opt = torch.optim.SGD([{**g, 'foreach': False} for g in opt.param_groups], lr=0.0)
    net = torch.compile(model) if compile_ else model
    step = TrainStep(net, opt, device=torch.device('cpu'), dtype=torch.float32, label_smoothing=0.1)
    lrs = scales('linear', total=steps, warmup=steps // 2)
    g = torch.Generator().manual_seed(1)
    losses = []
    for i in range(steps):
        x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        losses.append(step(x, y, lrs[i])[0].item())
    return losses, model.state_dict(), opt


def test_fused_sgd_matches_the_foreach_and_plain_loops():
    """``training.fused_sgd`` picks torch's fused SGD (the CPU has it too), which trains to the
    same losses and weights as the foreach path and torch's plain for-loop, to float32 rounding;
    the optimizer state (float LR) still saves and loads with weights_only. Catches a fused flag
    that is not passed, and a fused step that differs (e.g. Nesterov or weight decay dropped)."""
    import io
    fused_l, fused_w, fused_opt = _train_steps(['training.fused_sgd=true'])
    fe_l, fe_w, fe_opt = _train_steps([])
    assert fused_opt.defaults['fused'] and not fe_opt.defaults['fused'] and fe_opt.defaults['foreach']
    loop_l, loop_w, loop_opt = _train_steps([], plain_loop=True)  # torch's reference for-loop
    assert not any(g['foreach'] or g['fused'] for g in loop_opt.param_groups)
    for l, w in ((fused_l, fused_w), (loop_l, loop_w)):
        assert l == pytest.approx(fe_l, rel=1e-5)
        for k in fe_w:
            torch.testing.assert_close(w[k], fe_w[k], rtol=1e-4, atol=1e-5)
    assert not torch.equal(fused_w['fc.weight'], _train_steps([], steps=3)[1]['fc.weight'])  # it trained
    buf = io.BytesIO()
    torch.save(fused_opt.state_dict(), buf)
    buf.seek(0)
    assert isinstance(torch.load(buf, weights_only=True)['param_groups'][0]['lr'], float)


def test_cuda_graph_warm_up_is_undone_and_the_tensor_lr_trains_like_the_float_one():
    """What the CUDA-graph path does besides capturing, run on the CPU: the fused SGD with the
    LR in a tensor (``lr_t.fill_(lr)`` per step) and gradients kept allocated (zeroed, not set
    to None) trains exactly as the eager float-LR step; three warm-up steps at LR 0 followed by
    ``_restore`` leave weights, BatchNorm statistics and momentum as if they never ran (the
    first real step then matches a fresh model's, bit for bit). Catches warm-up steps that leak
    into training (BatchNorm statistics, momentum) and a tensor LR that is not read."""
    from model import build_model
    from training.config import load_config
    from training.optim import make_optimizer
    from training.step import TrainStep
    tc = load_config('tiny_cpu', ['training.fused_sgd=true', 'training.lr=0.1']).training
    cpu = torch.device('cpu')

    def fresh():
        torch.manual_seed(0)
        m = build_model({'arch': 'resnet18', 'num_classes': 10, 'width': 8})
        return m, TrainStep(m, make_optimizer(m, tc), device=cpu, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    ref_model, ref = fresh()
    ref_losses = [ref(x, y, 1.0)[0] for x, y in batches]  # the peak LR, 0.1
    model, step = fresh()
    step.cuda_graph = True  # static gradients, as under capture (the capture itself needs CUDA)
    step.lr_t = torch.zeros(())
    for grp in step.optimizer.param_groups:
        grp['lr'] = step.lr_t
    saved = step._snapshot()
    for _ in range(3):
        step._step(*batches[0])
    assert not torch.equal(model.state_dict()['stem.1.running_mean'], saved[0]['stem.1.running_mean'])
    step._restore(saved)
    losses = []
    for x, y in batches:
        step.lr_t.fill_(0.1)
        losses.append(step._step(x, y)[0].detach())
    assert torch.equal(torch.stack(losses), torch.stack(ref_losses))
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_cuda_graph_is_refused_on_the_cpu_with_one_line(synthetic_betons, tmp_path):
    """No CUDA here: ``training.cuda_graph`` stops with one line (exit 2) naming the key and the
    way out, before any training; combined with ``training.compile`` the config refuses it."""
    from conftest import as_cli, run_main, tiny
    from training.config import ConfigError, load_config
    run = tmp_path / 'graph'
    code, out, err = run_main('train', '--config', 'tiny_cpu', *as_cli(tiny(synthetic_betons, run, **{
        'data.loader': 'torchvision', 'training.cuda_graph': 'true'})))
    assert code == 2, err
    assert err.strip().splitlines() == ['error: training.cuda_graph: needs a CUDA device (this run is on cpu); '
                                        'set training.cuda_graph=false']
    assert not (run / 'last.pt').exists()
    with pytest.raises(ConfigError, match='reduce-overhead'):
        load_config('tiny_cpu', ['training.cuda_graph=true', 'training.compile=true'])


@pytest.mark.slow  # 35-80 s on 2 cores: inductor compiles forward and backward C++ kernels
def test_compile_gives_the_eager_losses(tmp_path, monkeypatch):
    """torch.compile (inductor, on the CPU) trains to the eager losses to tolerance (measured:
    equal to ~2e-7 relative over 3 steps). Its caches
    persist across processes (TORCHINDUCTOR_CACHE_DIR; the FX graph cache is on by default):
    a second compile in this process reuses them."""
    import time
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path / 'inductor'))
    eager, _, _ = _train_steps([], steps=3)
    t = time.perf_counter()
    compiled, _, _ = _train_steps([], steps=3, compile_=True)
    seconds = time.perf_counter() - t
    print('eager', eager, 'compiled', compiled)
    assert compiled == pytest.approx(eager, rel=1e-3)
    assert any((tmp_path / 'inductor').rglob('*')), 'nothing cached'
    print(f'compile + 3 steps: {seconds:.1f} s')
