"""Tests of app/predictor.py (both backends: torch and ONNX Runtime), app/images.py and
scripts/predict.py: image modes and sizes, preprocessing equal to the training normalization,
probabilities, model-file validation, bad inputs, the CLI.

    .venv/bin/python -m pytest tests/test_predictor.py            # ~25 s on the 2-core CPU
    .venv/bin/python -m pytest tests/test_predictor.py -m slow    # latency acceptance, ~1 min

Checkpoints are built from untrained models (BatchNorm statistics randomized, so that folding
BatchNorm into the convs is really exercised); the ONNX models are exported from them with
``app.export.onnx_bytes``. No data set or GPU is needed. Tests taking the ``predictor`` fixture
run once per backend.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from app.export import onnx_bytes
from app.predictor import (MAX_PIXELS, ImageError, ModelFileError, Predictor, latency, normalize,
                           resolve_checkpoint)
from app.images import prepare_image as _prepare_image
from app.torch_backend import compile_for_cpu, fold_batchnorm
from conftest import (CIFAR100_MEAN, CIFAR100_STD, COARSE_LABEL_NAMES,
                                     FINE_LABEL_NAMES, FINE_TO_COARSE)
from model import build_model
from conftest import PY, ROOT, make_test_checkpoint, run_main


def prepare_image(source, **kw):
    """The app's preparation at CIFAR's 32 px (the size of the models these tests serve)."""
    return _prepare_image(source, size=kw.pop('size', 32), **kw)


def make_test_onnx(ckpt_path: Path, out: Path, *, fp16: bool = False) -> Path:
    """``ckpt_path`` exported as scripts/export.py --onnx does (graph + metadata)."""
    out.write_bytes(onnx_bytes(torch.load(ckpt_path, weights_only=True), fp16=fp16))
    return out


@pytest.fixture(scope='module')
def ckpt_path(tmp_path_factory) -> Path:
    return make_test_checkpoint(tmp_path_factory.mktemp('ckpt') / 'tiny.pt')


@pytest.fixture(scope='module')
def onnx_path(ckpt_path) -> Path:
    return make_test_onnx(ckpt_path, ckpt_path.with_suffix('.onnx'))


@pytest.fixture(scope='module')
def torch_predictor(ckpt_path) -> Predictor:
    return Predictor(ckpt_path)


@pytest.fixture(scope='module')
def onnx_predictor(onnx_path) -> Predictor:
    return Predictor(onnx_path)


@pytest.fixture(scope='module', params=['torch', 'onnx'])
def predictor(request) -> Predictor:
    """Each test that takes it runs on both backends."""
    return request.getfixturevalue(f'{request.param}_predictor')


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_bytes(img: Image.Image, fmt: str = 'PNG', **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# --------------------------------------------------------------------------- modes and sizes

MODES = ['RGB', 'RGBA', 'L', 'P', 'I;16', 'I', 'F', 'LA', '1', 'CMYK']


@pytest.mark.parametrize('mode', MODES)
def test_every_mode_gives_a_valid_prediction(predictor, mode):
    base = Image.fromarray(rgb(40, 56))
    img = (Image.fromarray((np.asarray(base.convert('L')).astype(np.uint16) * 257))
           if mode == 'I;16' else base.convert(mode))
    assert img.mode == mode
    pred = predictor.predict(img, topk=5)
    probs = [p for _, p in pred.classes]
    assert len(pred.classes) == 5 and probs == sorted(probs, reverse=True)
    assert all(0 <= p <= 1 for p in probs)
    assert pred.superclass in COARSE_LABEL_NAMES
    x, _ = prepare_image(img)
    assert x.shape == (32, 32, 3) and x.dtype == np.uint8


def test_rgba_is_composited_on_white():
    arr = np.zeros((32, 32, 4), np.uint8)
    arr[..., 0] = 255  # red, but...
    arr[:, :16, 3] = 0  # left half fully transparent
    arr[:, 16:, 3] = 255  # right half opaque
    x, notes = prepare_image(Image.fromarray(arr, 'RGBA'))
    assert (x[:, :16] == 255).all()  # transparent -> white
    assert (x[:, 16:] == [255, 0, 0]).all()  # opaque red stays red
    assert any('white' in n for n in notes)
    half = arr.copy()
    half[..., 3] = 128
    x, _ = prepare_image(Image.fromarray(half, 'RGBA'))
    assert (x[..., 0] == 255).all() and (np.abs(x[..., 1].astype(int) - 127) <= 1).all()


def test_palette_with_transparency_and_opaque_rgba():
    p = Image.new('P', (32, 32), 0)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.paste(1, (0, 0, 16, 32))
    p.info['transparency'] = 0  # colour 0 (black) is transparent -> white
    x, _ = prepare_image(p)
    assert (x[:, :16] == [10, 200, 30]).all() and (x[:, 16:] == 255).all()
    opaque = Image.fromarray(rgb(32, 32)).convert('RGBA')
    assert np.array_equal(prepare_image(opaque)[0], rgb(32, 32))  # alpha 255: same pixels


def test_16bit_is_scaled_not_clipped():
    for mode_arr, expect in [((np.full((32, 32), 65535, np.uint16)), 255),
                             ((np.full((32, 32), 100 * 257, np.uint16)), 100)]:
        img = Image.fromarray(mode_arr)
        assert img.mode.startswith('I;16')
        x, notes = prepare_image(img)
        assert (x == expect).all(), (img.mode, x[0, 0])
        assert any('16-bit' in n for n in notes)
    # a 16-bit PNG (Pillow may open it as 'I' or 'I;16'): same result
    data = png_bytes(Image.fromarray(np.full((32, 32), 200 * 257, np.uint16)))
    assert (prepare_image(data)[0] == 200).all()
    # uint16 numpy array, float arrays in [0, 1] and 0-255
    assert (prepare_image(np.full((4, 4), 65535, np.uint16))[0] == 255).all()
    assert (prepare_image(np.full((4, 4, 3), 0.5, np.float32))[0] == 128).all()
    assert (prepare_image(np.full((4, 4, 3), 77.0))[0] == 77).all()


def test_exif_orientation_is_applied(tmp_path):
    # Stored pixels: top half black, bottom half white. EXIF orientation 6 says "rotate 90
    # degrees clockwise to display": displayed, the left half is white, the right half black.
    stored = np.zeros((64, 64, 3), np.uint8)
    stored[32:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / 'rotated.jpg'
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    x, _ = prepare_image(path)
    displayed = np.asarray(Image.fromarray(stored).transpose(Image.Transpose.ROTATE_270))
    expect = np.asarray(Image.fromarray(displayed).resize((32, 32), Image.Resampling.BICUBIC))
    assert np.abs(x.astype(int) - expect).mean() < 4  # JPEG noise only
    assert x[:, :12].mean() > 200 and x[:, 20:].mean() < 50  # white left, black right
    unrotated = np.asarray(Image.fromarray(stored).resize((32, 32), Image.Resampling.BICUBIC))
    assert np.abs(x.astype(int) - unrotated).mean() > 60  # the test would notice no rotation


def test_sizes_tiny_exact_and_large_non_square(predictor):
    # 1x1: upsampled to a flat 32x32 image of that colour
    x, _ = prepare_image(np.array([[[10, 20, 30]]], np.uint8))
    assert x.shape == (32, 32, 3) and (x == [10, 20, 30]).all()
    # 32x32 RGB: not resampled at all
    a = rgb(32, 32, seed=3)
    assert np.array_equal(prepare_image(a)[0], a)
    assert np.array_equal(prepare_image(png_bytes(Image.fromarray(a)))[0], a)  # PNG is lossless
    # 3000x1000: centre square crop, so the middle third (green) fills the result
    wide = np.zeros((1000, 3000, 3), np.uint8)
    wide[:, :1000, 0] = 255
    wide[:, 1000:2000, 1] = 255
    wide[:, 2000:, 2] = 255
    x, _ = prepare_image(wide)
    assert (x[:, 2:30] == [0, 255, 0]).all()
    assert len(predictor.predict(wide).classes) == 5
    # a big JPEG (decoded at a reduced DCT scale): same picture as a full decode + resize
    big = np.asarray(Image.fromarray(rgb(30, 40)).resize((2000, 1500), Image.Resampling.NEAREST))
    data = png_bytes(Image.fromarray(big), 'JPEG', quality=95)
    full = Image.open(io.BytesIO(data)).convert('RGB')
    ref = np.asarray(full.resize((32, 32), Image.Resampling.BICUBIC, box=(250, 0, 1750, 1500)))
    assert np.abs(prepare_image(data)[0].astype(int) - ref).mean() < 6


def test_inputs_path_bytes_fileobj_pil_array_agree(predictor, tmp_path):
    a = rgb(32, 32, seed=5)
    path = tmp_path / 'a.png'
    Image.fromarray(a).save(path)
    probs = [predictor.predict(src).probs for src in
             (a, Image.fromarray(a), path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes()))]
    for p in probs[1:]:
        np.testing.assert_array_equal(p, probs[0])
    assert predictor.predict(str(path)).source == str(path)
    assert predictor.predict(a, name='upload.png').source == 'upload.png'


# --------------------------------------------------------------------------- numbers

def test_preprocessing_equals_training_normalization_exactly(predictor):
    batch = np.stack([rgb(32, 32, seed=s) for s in range(4)])
    xn = normalize(batch, CIFAR100_MEAN, CIFAR100_STD)
    assert xn.dtype == np.float32 and xn.shape == (4, 3, 32, 32)
    x = torch.from_numpy(xn)
    assert x.is_contiguous(memory_format=torch.channels_last)  # NHWC memory, no copy for torch
    # what the predictor feeds the model for a 32x32 RGB image
    xp, _ = predictor.preprocess(list(batch))
    assert np.array_equal(xp, xn)
    # the formula, independently
    ref = (torch.from_numpy(batch).permute(0, 3, 1, 2).double()
           - torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    assert torch.allclose(x.double(), ref, atol=1e-5)
    # the very op the training/test loaders run (Normalize, ffcv_pipeline/pixels.py), bit for bit
    pytest.importorskip('ffcv', reason='ffcv not installed: the training-side Normalize is unavailable')
    from ffcv_pipeline.pixels import Normalize
    u8 = torch.from_numpy(batch).permute(0, 3, 1, 2)  # what ToTorchImage(channels_last) yields
    train_x = Normalize(CIFAR100_MEAN, CIFAR100_STD, dtype=torch.float32)(u8)
    assert torch.equal(train_x, x)
    # a GPU's bf16 training batch is the served float32 input rounded once, as autocast rounds
    # it at the exported model's first convolution (issue 17: no bf16 arithmetic in between)
    assert torch.equal(Normalize(CIFAR100_MEAN, CIFAR100_STD, dtype=torch.bfloat16)(u8), x.to(torch.bfloat16))


def test_probabilities_topk_and_superclass(predictor):
    pred = predictor.predict(rgb(50, 50, seed=7), topk=10)
    assert pred.probs.shape == (100,)
    assert abs(float(pred.probs.sum()) - 1) < 1e-5
    order = np.argsort(-pred.probs, kind='stable')[:10]
    assert pred.indices == order.tolist()
    assert [p for _, p in pred.classes] == pytest.approx(pred.probs[order].tolist())
    assert [n for n, _ in pred.classes] == [FINE_LABEL_NAMES[i] for i in order]
    c = FINE_TO_COARSE[pred.indices[0]]
    assert pred.superclass == COARSE_LABEL_NAMES[c]
    members = [i for i in range(100) if FINE_TO_COARSE[i] == c]
    assert pred.superclass_prob == pytest.approx(float(pred.probs[members].sum()), abs=1e-6)
    d = pred.to_dict()
    assert [t['rank'] for t in d['top']] == list(range(1, 11)) and d['superclass']['label'] == pred.superclass
    json.dumps(d)  # serializable
    with pytest.raises(ValueError, match='topk'):
        predictor.predict(rgb(8, 8), topk=0)
    with pytest.raises(ValueError, match='topk'):
        predictor.predict(rgb(8, 8), topk=101)


def test_batch_equals_single(predictor):
    imgs = [rgb(32, 32, seed=1), rgb(100, 60, seed=2), Image.fromarray(rgb(16, 16, seed=3)).convert('L')]
    batch = predictor.predict_batch(imgs, topk=3)
    for img, b in zip(imgs, batch):
        np.testing.assert_allclose(predictor.predict(img).probs, b.probs, atol=1e-6)
    with pytest.raises(ImageError, match='no images'):
        predictor.predict_batch([])


def test_optimized_model_matches_plain(ckpt_path):
    fast, plain = Predictor(ckpt_path), Predictor(ckpt_path, optimize=False)
    # the optimization really happened: no BatchNorm left in the served model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.backend.model.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.backend.model.modules())
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32), dtype=np.float32)
    lf, lp = fast.logits(x), plain.logits(x)
    assert np.abs(lp).max() > 0.1  # non-trivial logits
    np.testing.assert_allclose(lf, lp, atol=1e-4, rtol=1e-4)
    # fold_batchnorm keeps the original model untouched
    m = build_model({'arch': 'resnet18', 'num_classes': 100, 'width': 8}).eval()
    fold_batchnorm(m)
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())


# --------------------------------------------------------------------------- checkpoints

def test_checkpoint_validation(tmp_path, ckpt_path):
    with pytest.raises(ModelFileError, match='no such checkpoint'):
        Predictor(tmp_path / 'missing.pt')
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(b'this is not a checkpoint' * 10)
    with pytest.raises(ModelFileError, match='not a readable checkpoint'):
        Predictor(garbage)
    wrong = tmp_path / 'wrong.pt'
    torch.save({'state_dict': {}, 'epoch': 3}, wrong)
    with pytest.raises(ModelFileError, match='not a cifar100-ffcv-checkpoint'):
        Predictor(wrong)
    ckpt = torch.load(ckpt_path, weights_only=True)
    newer = tmp_path / 'newer.pt'
    torch.save({**ckpt, 'format_version': 99}, newer)
    with pytest.raises(ModelFileError, match='version 99 is newer'):
        Predictor(newer)
    lacking = tmp_path / 'lacking.pt'
    torch.save({k: v for k, v in ckpt.items() if k != 'normalization'}, lacking)
    with pytest.raises(ModelFileError, match='lacks normalization'):
        Predictor(lacking)
    misfit = tmp_path / 'misfit.pt'
    torch.save({**ckpt, 'model_config': {**ckpt['model_config'], 'width': 16}}, misfit)
    with pytest.raises(ModelFileError, match='do not fit'):
        Predictor(misfit)
    names = tmp_path / 'names.pt'
    torch.save({**ckpt, 'class_names': ckpt['class_names'][:99]}, names)
    with pytest.raises(ModelFileError, match='99 class names for a 100-class model'):
        Predictor(names)
    assert issubclass(ModelFileError, ValueError) and issubclass(ImageError, ValueError)


def test_onnx_model_validation(tmp_path, onnx_path):
    """Corrupt, truncated, foreign and metadata-less ONNX files are refused with one line naming
    the file. Catches: a backend that lets onnxruntime's own exception (a multi-line C++ message)
    escape, or one that serves a model without class names."""
    import onnx
    with pytest.raises(ModelFileError, match=r'missing\.onnx: no such model file'):
        Predictor(tmp_path / 'missing.onnx')
    corrupt = tmp_path / 'corrupt.onnx'
    corrupt.write_bytes(b'\x08\x07garbage, not a protobuf' * 50)
    truncated = tmp_path / 'truncated.onnx'
    truncated.write_bytes(onnx_path.read_bytes()[:100_000])
    for bad in (corrupt, truncated):
        with pytest.raises(ModelFileError, match=rf'{bad.name}: not a readable ONNX model') as e:
            Predictor(bad)
        assert '\n' not in str(e.value)
    proto = onnx.load(onnx_path)
    del proto.metadata_props[:]
    bare = tmp_path / 'bare.onnx'
    onnx.save(proto, bare)
    with pytest.raises(ModelFileError, match="bare.onnx: an ONNX model without this project's metadata"):
        Predictor(bare)
    proto.metadata_props.add(key='cifar100_ffcv_meta', value='{"class_names": ["a"]}')
    onnx.save(proto, bare)
    with pytest.raises(ModelFileError, match='bare.onnx: unreadable model metadata'):
        Predictor(bare)
    # the backend follows the file name; --backend overrides it (a .pt read as ONNX is refused)
    with pytest.raises(ModelFileError, match='not a readable ONNX model'):
        Predictor(onnx_path.with_suffix('.pt'), backend='onnx')
    with pytest.raises(ValueError, match='backend must be one of torch, onnx'):
        Predictor(onnx_path, backend='tensorrt')


def test_info_reports_the_checkpoint(predictor):
    info = predictor.info()
    assert info['arch'] == 'resnet18' and info['width'] == 8 and info['epoch'] == 40
    assert info['test_top1'] == pytest.approx(0.7512) and info['train_seconds'] == 812.5
    assert info['parameters'] == sum(p.numel() for p in build_model({'arch': 'resnet18', 'num_classes': 100, 'width': 8}).parameters())
    assert info['checkpoint'] == str(predictor.path)
    assert info['backend'].startswith({'torch': 'PyTorch', 'onnx': 'ONNX Runtime'}[predictor.backend.name])


def test_backends_agree(torch_predictor, onnx_predictor, tmp_path):
    """The ONNX Runtime model gives the torch model's probabilities (to 1e-5) and the same top-5
    for photos of every kind. Catches: an ONNX export or backend that permutes, reverses or
    rescales the logits, or feeds the channels-last view as if it were contiguous NCHW."""
    images = [rgb(32, 32, seed=s) for s in range(6)] + [rgb(300, 200, seed=9),
                                                        Image.fromarray(rgb(64, 64)).convert('L')]
    want, got = torch_predictor.predict_batch(images), onnx_predictor.predict_batch(images)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g.probs, w.probs, atol=1e-5)
        assert g.indices == w.indices and g.superclass == w.superclass
    assert len({tuple(w.indices) for w in want}) > 1  # the images are told apart


def test_resolve_checkpoint_order(tmp_path):
    older, newer = tmp_path / 'runs/a/best.pt', tmp_path / 'runs/b/best.pt'
    for p, t in ((older, 1_000_000), (newer, 2_000_000)):
        p.parent.mkdir(parents=True)
        p.write_bytes(b'x')
        os.utime(p, (t, t))
    (tmp_path / 'runs/b/last.pt').write_bytes(b'x')
    env = {'MODEL_PATH': '/models/env.pt'}
    nothing = tmp_path / 'nothing'
    nothing.mkdir()
    assert resolve_checkpoint('given.pt', env=env, root=tmp_path) == Path('given.pt')
    assert resolve_checkpoint(None, env=env, root=tmp_path) == Path('/models/env.pt')
    assert resolve_checkpoint(None, env={}, root=tmp_path, shipped_dir=nothing) == newer
    os.utime(older, (3_000_000, 3_000_000))
    assert resolve_checkpoint(None, env={'MODEL_PATH': ''}, root=tmp_path, shipped_dir=nothing) == older
    assert resolve_checkpoint(None, env={}, root=nothing, shipped_dir=nothing) is None
    # an exported Space folder: the model beside app.py comes first, model.onnx before model.pt
    space = tmp_path / 'space'
    space.mkdir()
    (space / 'model.pt').write_bytes(b'x')
    assert resolve_checkpoint(None, env={}, root=tmp_path, shipped_dir=space) == space / 'model.pt'
    (space / 'model.onnx').write_bytes(b'x')
    assert resolve_checkpoint(None, env={}, root=tmp_path, shipped_dir=space) == space / 'model.onnx'


# --------------------------------------------------------------------------- bad inputs

def test_bad_images_raise_clear_errors(predictor, tmp_path):
    corrupt = tmp_path / 'corrupt.png'
    corrupt.write_bytes(b'\x00garbage, not an image' * 20)
    with pytest.raises(ImageError, match=r'corrupt\.png: not an image'):
        predictor.predict(corrupt)
    truncated = tmp_path / 'truncated.png'
    truncated.write_bytes(png_bytes(Image.fromarray(rgb(64, 64)))[:300])
    with pytest.raises(ImageError, match=r'truncated\.png: corrupt or truncated'):
        predictor.predict(truncated)
    empty = tmp_path / 'empty.jpg'
    empty.write_bytes(b'')
    with pytest.raises(ImageError, match='empty'):
        predictor.predict(empty)
    with pytest.raises(ImageError, match='no such file'):
        predictor.predict(tmp_path / 'missing.png')
    with pytest.raises(ImageError, match='not a file'):
        predictor.predict(tmp_path)
    with pytest.raises(ImageError, match='empty input'):
        predictor.predict(b'')
    with pytest.raises(ImageError, match='empty array'):
        predictor.predict(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ImageError, match='not an image'):
        predictor.predict(np.zeros((3, 32, 32), np.uint8))  # CHW is ambiguous: refused
    with pytest.raises(ImageError, match='no image given'):
        predictor.predict(None)
    with pytest.raises(ImageError, match='unsupported input type'):
        predictor.predict(12345)
    with pytest.raises(ImageError, match='empty'):
        predictor.predict(Image.new('RGB', (0, 0)))


def test_huge_image_is_refused_before_decoding(predictor, tmp_path, monkeypatch):
    """A 100 MP PNG (12 kB: a decompression bomb) is refused from its header: Pillow's decoder
    (``ImageFile.load``) is never called for it. Catches: a predictor that skips the pixel
    check before decoding (the spy sees the load; without the spy, 300 MB would be decoded)."""
    huge = tmp_path / 'huge.png'
    Image.new('1', (10000, 10000)).save(huge)  # 100 MP, 12 kB compressed
    decoded = []
    real_load = ImageFile.ImageFile.load

    def spy_load(self):
        decoded.append(self.size)
        if self.size[0] * self.size[1] > MAX_PIXELS:
            raise AssertionError(f'decoding a {self.size} image')  # don't really decode 100 MP
        return real_load(self)
    monkeypatch.setattr(ImageFile.ImageFile, 'load', spy_load)
    with pytest.raises(ImageError, match=r'10000x10000 pixels \(100 megapixels\) is too large'):
        predictor.predict(huge)
    assert decoded == []  # refused from the header, never decoded
    small = tmp_path / 'small.png'
    Image.fromarray(rgb(40, 40)).save(small)
    predictor.predict(small)
    assert (40, 40) in decoded  # the spy does see real decodes
    # a zero-copy 100 MP array view and a PIL image over the limit too
    with pytest.raises(ImageError, match='too large'):
        predictor.predict(np.broadcast_to(np.uint8(0), (10000, 10000, 3)))
    side = int(MAX_PIXELS ** 0.5) + 1
    with pytest.raises(ImageError, match='too large'):
        predictor.predict(Image.new('1', (side, side)))


def test_animated_gif_uses_the_first_frame(predictor, tmp_path):
    frames = [Image.fromarray(rgb(40, 40, seed=s)) for s in range(3)]
    gif = tmp_path / 'anim.gif'
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    pred = predictor.predict(gif)
    assert any('animated image: classified the first frame' in n for n in pred.notes)
    still, second = tmp_path / 'first.png', tmp_path / 'second.png'
    with Image.open(gif) as frames_in:
        frames_in.seek(0)
        frames_in.convert('RGB').save(still)
        frames_in.seek(1)
        frames_in.convert('RGB').save(second)
    np.testing.assert_allclose(pred.probs, predictor.predict(still).probs, atol=1e-6)
    assert not np.allclose(pred.probs, predictor.predict(second).probs, atol=1e-6)


# --------------------------------------------------------------------------- speed

def test_latency_times_predict_calls():
    """``latency`` times what ``predict`` really costs: with a predictor that takes >= 3 ms per
    call, p50 >= 3 ms, and it makes the warm-up plus n calls. Catches: a timer around nothing,
    or percentiles taken from the wrong end of the list."""
    class Slow:
        calls = 0

        def predict(self, image):
            Slow.calls += 1
            time.sleep(0.003 if Slow.calls % 2 else 0.006)  # half 3 ms, half 6 ms
    r = latency(Slow(), 'img', 40)
    assert Slow.calls == 20 + 40 and r['n'] == 40
    assert 3 <= r['min_ms'] < 6 <= r['p95_ms'] and 3 <= r['p50_ms']


@pytest.fixture(scope='module')
def full_size_predictor(full_size_ckpt) -> Predictor:
    return Predictor(full_size_ckpt)


@pytest.fixture(scope='module')
def compiled_predictor(full_size_ckpt) -> Predictor:
    p = Predictor(full_size_ckpt, compile_model=True)
    if p.backend.compiled is None:
        pytest.skip('torch.compile is unavailable here (no C++ compiler?)')
    return p


@pytest.mark.slow
def test_compiled_model_matches_plain(compiled_predictor, full_size_ckpt):
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    plain = Predictor(full_size_ckpt, optimize=False)
    np.testing.assert_allclose(compiled_predictor.logits(x), plain.logits(x), atol=1e-4, rtol=1e-4)
    batch = np.random.default_rng(1).standard_normal((3, 3, 32, 32), dtype=np.float32)
    # other batch sizes take the eager model: no recompiling
    np.testing.assert_allclose(compiled_predictor.logits(batch), plain.logits(batch),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_single_image_latency_acceptance(compiled_predictor, full_size_predictor, full_size_ckpt,
                                         tmp_path):
    """In-process single-image prediction (one 32x32 PNG) on a 2-core CPU: the served ONNX
    Runtime model meets p50 <= 10 ms and is >= 1.3x faster than torch eager, side by side (on
    the 2-core EPYC: ONNX 6.8 ms, eager 10.4, compiled 10.6; docs/BENCHMARKS.md "Export /
    ONNX"). Best of 3 rounds, alternating the models, since other load on the machine only
    makes them slower. Compiled torch is printed, not bounded: it beat eager 1.4x on the Xeon
    this was first measured on, and ties it on the EPYC. Catches: ONNX Runtime losing its
    graph optimizations (10.8 ms) or its second thread (12.7 ms)."""
    path = tmp_path / 'a.png'
    Image.fromarray(rgb(32, 32)).save(path)
    onnx_predictor = Predictor(make_test_onnx(full_size_ckpt, tmp_path / 'rn18.onnx'))
    runs = {'compiled': [], 'eager': [], 'onnx': []}
    for _ in range(3):
        for name, p in (('compiled', compiled_predictor), ('eager', full_size_predictor),
                        ('onnx', onnx_predictor)):
            runs[name].append(latency(p, path, 200)['p50_ms'])
    best = {k: min(v) for k, v in runs.items()}
    print(f'single-image p50 (best of 3): {best}')
    assert best['onnx'] <= 10.0 and best['onnx'] * 1.3 <= best['eager'], best


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError('no C++ compiler')
    monkeypatch.setattr(torch, 'compile', broken)
    with pytest.warns(UserWarning, match='torch.compile failed, serving the eager model'):
        assert compile_for_cpu(build_model({'arch': 'resnet18', 'num_classes': 100, 'width': 8}).eval(), torch.zeros(1, 3, 32, 32)) is None


# --------------------------------------------------------------------------- CLI

def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, str(ROOT / 'scripts' / 'predict.py'), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope='module')
def images_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp('imgs')
    Image.fromarray(rgb(32, 32, seed=1)).save(d / 'one.png')
    Image.fromarray(rgb(300, 200, seed=2)).save(d / 'two.jpg')
    (d / 'bad.png').write_bytes(b'not a png at all')
    return d


def test_cli_table(ckpt_path, torch_predictor, images_dir):
    """The script run as a file (a subprocess: its own imports, `run`, exit code)."""
    r = run_cli(images_dir / 'one.png', images_dir / 'two.jpg', '--checkpoint', ckpt_path, '--topk', 3)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert 'resnet18' in lines[0] and 'test top-1 75.12%' in lines[0] and '13m 32s' in lines[0]
    expect = torch_predictor.predict(images_dir / 'one.png', topk=3)
    block = next(i for i, l in enumerate(lines) if l.startswith(str(images_dir / 'one.png')))
    assert f'superclass: {expect.superclass}' in lines[block]
    for rank, (name, prob) in enumerate(expect.classes, 1):
        assert lines[block + rank].split()[:2] == [f'{rank}.', name]
        assert lines[block + rank].strip().endswith(f'{prob:.2%}')
    assert any(l.startswith(str(images_dir / 'two.jpg')) for l in lines)


def test_cli_json(predictor, images_dir):
    """Both model files through the CLI: the same classes as the predictor in process."""
    code, out, err = run_main('predict', images_dir / 'one.png', images_dir / 'two.jpg',
                                 '--checkpoint', predictor.path, '--json')
    assert code == 0, err
    out = json.loads(out)
    assert out['checkpoint'] == str(predictor.path) and len(out['predictions']) == 2
    assert out['backend'] == predictor.backend.name and out['errors'] == []
    first = out['predictions'][0]
    expect = predictor.predict(images_dir / 'one.png', topk=5)
    assert first['image'] == str(images_dir / 'one.png')
    assert [t['label'] for t in first['top']] == [n for n, _ in expect.classes]
    assert [t['prob'] for t in first['top']] == pytest.approx([p for _, p in expect.classes], abs=1e-5)
    assert first['superclass']['label'] == expect.superclass


def test_cli_errors_are_one_line_with_exit_code_2(ckpt_path, images_dir,
                                                   tmp_path, monkeypatch):
    corrupt_onnx = tmp_path / 'corrupt.onnx'
    corrupt_onnx.write_bytes(b'\x08\x07 not an onnx model' * 30)
    cases = [
        ((images_dir / 'bad.png', '--checkpoint', ckpt_path), 'bad.png: not an image'),
        ((images_dir / 'one.png', '--checkpoint', tmp_path / 'nope.pt'), 'no such checkpoint file'),
        ((images_dir / 'one.png', '--checkpoint', images_dir / 'one.png'), 'not a readable checkpoint'),
        ((images_dir / 'one.png', '--checkpoint', corrupt_onnx), 'corrupt.onnx: not a readable ONNX model'),
        ((images_dir / 'one.png', '--checkpoint', ckpt_path, '--topk', 0), 'topk must be between'),
    ]
    for args, msg in cases:
        code, out, err = run_main('predict', *args)
        assert code == 2, (args, out, err)
        assert err.startswith('error: ') and msg in err, err
        assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err
    # MODEL_PATH is used without --checkpoint
    monkeypatch.setenv('MODEL_PATH', str(ckpt_path))
    code, out, err = run_main('predict', images_dir / 'one.png', '--json')
    assert code == 0 and json.loads(out)['checkpoint'] == str(ckpt_path)


def test_cli_without_any_checkpoint(images_dir, tmp_path, monkeypatch):
    """No --checkpoint, no MODEL_PATH, no runs/ and no shipped model: one line saying how to
    train one, exit 2. Catches: a CLI that hands ``None`` to the predictor (a traceback)."""
    import app.predictor as predictor_module
    monkeypatch.delenv('MODEL_PATH', raising=False)
    monkeypatch.setattr(predictor_module, 'ROOT', tmp_path)  # a root without runs/
    monkeypatch.setattr(predictor_module, 'HERE', tmp_path)  # no model.onnx / model.pt beside
    code, out, err = run_main('predict', images_dir / 'one.png')
    assert code == 2 and out == ''
    assert err.strip().splitlines() == [f'error: {predictor_module.NO_CHECKPOINT_MESSAGE}']


def test_cli_mixed_good_and_bad_images(ckpt_path, torch_predictor, images_dir):
    """Good images are classified and printed, each bad one gets its own ``error:`` line on
    stderr, the exit code is 2. Catches: stopping at the first bad image (the good one after it
    is lost), or exit code 0 when some failed."""
    order = [images_dir / 'bad.png', images_dir / 'one.png', images_dir / 'missing.png',
             images_dir / 'two.jpg']
    code, out, err = run_main('predict', *order, '--checkpoint', ckpt_path, '--topk', 2)
    assert code == 2
    assert err.splitlines() == [f'error: {images_dir / "bad.png"}: not an image, or a corrupt one '
                                f'(Pillow cannot identify it)',
                                f'error: {images_dir / "missing.png"}: no such file']
    printed = [l for l in out.splitlines() if l.startswith(str(images_dir))]
    assert printed[0].startswith(str(images_dir / 'one.png')) and printed[1].startswith(str(images_dir / 'two.jpg'))
    assert torch_predictor.predict(images_dir / 'two.jpg', topk=1).label in out
    code, out, err = run_main('predict', *order, '--checkpoint', ckpt_path, '--json')
    data = json.loads(out)
    assert code == 2 and [p['image'] for p in data['predictions']] == [str(order[1]), str(order[3])]
    assert [e['image'] for e in data['errors']] == [str(order[0]), str(order[2])]


def test_serving_imports_no_training_stack_and_onnx_needs_no_torch(onnx_path):
    """A Space installs only app/requirements*.txt: the app must not need ffcv, numba or OpenCV,
    and the predictor and app modules must not import torch until a torch model is loaded;
    with torch made unimportable, an ONNX model still classifies. Catches: a module-level
    ``import torch`` anywhere on the ONNX path (app.predictor, app.images, app.modelmeta,
    app.onnx_backend, app.app)."""
    code = ('import sys, numpy as np\n'
            'import app.predictor, app.images, app.modelmeta, app.onnx_backend, app.app\n'
            'bad = [m for m in ("ffcv", "numba", "cv2", "torch") if m in sys.modules]\n'
            'assert not bad, bad\n'
            'sys.modules["torch"] = None  # from here on, `import torch` raises ImportError\n'
            f'p = app.predictor.Predictor({str(onnx_path)!r})\n'
            'print(p.predict(np.zeros((40, 40, 3), np.uint8)).label)\n')
    r = subprocess.run([PY, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() in FINE_LABEL_NAMES
