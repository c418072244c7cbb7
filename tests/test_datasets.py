"""A dataset is one value (issue 24): CIFAR-10 and a user's own image folder go archive/folder ->
.beton -> a tiny training run -> predict -> the app's model check -> ONNX export, like CIFAR-100;
the converters' guarantees hold for them; train/test/resume files of different datasets and
labels outside a dataset's classes stop with one line naming the offending file; a CIFAR-100
conversion in the old layout is moved, not converted again."""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (CIFAR10, CIFAR100, ROOT, as_cli, build_archive, build_cifar10_archive, cifar10_batch,
                      make_image_folder, make_split, one_line, run_main, tiny)

QUIET = dict(progress=False, log=lambda *_: None)


def train_run(train: Path, test: Path, out: Path, **extra):
    """A tiny CPU run on the given files (``train.py`` in-process): (exit code, stdout, stderr)."""
    o = tiny(train.parent, out, **{'data.train_path': train, 'data.test_path': test, **extra})
    return run_main('train', '--config', 'tiny_cpu', *as_cli(o))


def serve_and_export(run: Path, image, tmp: Path, root: Path) -> dict:
    """predict.py on ``image``, the app's model check, an ONNX export and its top-1 agreement."""
    from app.app import example_dirs, find_examples, load_predictor
    from app.predictor import Predictor
    code, out, err = run_main('predict', image, '--checkpoint', run / 'best.pt', '--json', '--topk', 2)
    assert code == 0, err
    pred = json.loads(out)['predictions'][0]
    predictor, problem = load_predictor(str(run / 'best.pt'))
    assert problem is None
    examples = find_examples(example_dirs(predictor, root=root))
    code, out, err = run_main('export', run / 'best.pt', '--out', tmp / 'export', '--onnx')
    assert code == 0, err
    onnx = Predictor(tmp / 'export' / 'model.onnx')
    assert onnx.image_size == predictor.image_size and onnx.class_names == predictor.class_names
    assert onnx.predict(image).label == predictor.predict(image).label == pred['top'][0]['label']
    return {'prediction': pred, 'predictor': predictor, 'examples': examples, 'onnx': onnx}


# --- CIFAR-10 ---------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def cifar10(tmp_path_factory):
    """(archive, folder with its conversion): 5 x 20 training images, 20 test images."""
    d = tmp_path_factory.mktemp('cifar10')
    archive = build_cifar10_archive(d / 'cifar-10-python.tar.gz')
    code, out, err = run_main('write_datasets', '--dataset', 'cifar10', '--source', archive,
                              '--out', d / 'data_beton' / 'cifar10', '--quiet')
    assert code == 0, err
    return archive, d / 'data_beton' / 'cifar10'


def test_cifar10_archive_converts_in_the_official_layout(cifar10, tmp_path):
    """Five training batches concatenated in order, the test batch, bytes keys; the manifest's
    dataset is CIFAR-10 (10 classes, no superclasses) and the files carry no superclass field."""
    from ffcv_pipeline.archive import read_archive
    archive, out = cifar10
    data = read_archive(CIFAR10, archive)
    assert len(data.train) == 100 and len(data.test) == 20 and data.train.superclasses is None
    with __import__('tarfile').open(archive) as tar:  # the order is the members' order
        first = pickle.loads(tar.extractfile('cifar-10-batches-py/data_batch_1').read(), encoding='bytes')
    assert list(data.train.labels[:20]) == first[b'labels']
    m = json.loads((out / 'manifest.json').read_text())
    assert m['dataset']['name'] == 'cifar10' and m['dataset']['class_names'] == list(CIFAR10.class_names)
    assert m['dataset']['superclass_names'] is None and set(m['fields']) == {'image', 'label'}
    arrays = np.load(out / 'cifar10_train.npy')
    assert arrays.dtype.names == ('image', 'label')
    assert np.array_equal(arrays['image'], data.train.images) and np.array_equal(arrays['label'], data.train.labels)
    folder = build_cifar10_archive(tmp_path / 'x', folder=True, bytes_keys=False)  # extracted, str keys
    assert np.array_equal(read_archive(CIFAR10, folder / 'cifar-10-batches-py').test.labels,
                          read_archive(CIFAR10, folder).test.labels)


def test_cifar10_download_from_a_url_checks_the_md5(tmp_path):
    """The real download path (urllib, progress bar, md5, .part then rename) on a file:// URL;
    a second run reuses the downloaded archive. The official URL and md5 are the ones given."""
    import ffcv_pipeline.writer as W
    from ffcv_pipeline.archive import DatasetError, md5sum
    from ffcv_pipeline.datasets import Download
    assert CIFAR10.download == Download('https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz',
                                        'c58f30108f718f92721af3b95e74349a')
    (tmp_path / 'mirror').mkdir()
    src = build_cifar10_archive(tmp_path / 'mirror' / 'cifar-10-python.tar.gz')
    url, out = src.as_uri(), tmp_path / 'out'
    with pytest.raises(DatasetError, match='md5'):  # the official md5: a synthetic archive is refused
        W.write_datasets(None, out, dataset='cifar10', url=url, **QUIET)
    assert not list(out.glob('*.part')) and not list(out.glob('*.npy'))
    official = replace(CIFAR10, download=Download(url, md5sum(src)))
    logs = []
    res = W.write_datasets(None, out, dataset=official, log=logs.append, progress=False)
    assert res.status == 'written' and (out / 'cifar-10-python.tar.gz').is_file() and f'downloading {url}' in logs
    assert res.manifest['source']['official'] is True
    res2 = W.write_datasets(None, out, dataset=official, url='http://127.0.0.1:9/x', progress=False,
                            log=logs.append)
    assert res2.status == 'skipped'


def _bad_cifar10(kind: str, tmp_path: Path) -> Path:
    good = build_cifar10_archive(tmp_path / 'good.tar.gz')
    if kind == 'truncated':
        p = tmp_path / 'cut.tar.gz'
        p.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
        return p
    if kind == 'corrupt':
        return build_cifar10_archive(tmp_path / 'c.tar.gz', train=[b'not a pickle'] + [
            cifar10_batch(make_split(1, seed=i, classes=10), 'b') for i in range(4)])
    if kind == 'foreign':  # a CIFAR-100 archive given as CIFAR-10
        return build_archive(tmp_path / 'cifar-100-python.tar.gz')
    split = make_split(1, seed=3, classes=10)
    if kind == 'shape':
        split['data'] = split['data'][:, :3000]
    else:
        split['fine_labels'][0] = 10
    return build_cifar10_archive(tmp_path / 'b.tar.gz', test=cifar10_batch(split, 'test'))


@pytest.mark.parametrize('kind, expected', [
    ('truncated', 'corrupt or truncated archive'), ('corrupt', 'data_batch_1: not a readable CIFAR pickle'),
    ('foreign', 'missing member cifar-10-batches-py/data_batch_1'), ('shape', "'data' must be an N x 3072"),
    ('labels', "'labels' out of range: values must lie in [0, 9]")])
def test_bad_cifar10_input_is_one_line_and_writes_nothing(kind, expected, tmp_path):
    src, out = _bad_cifar10(kind, tmp_path), tmp_path / 'out'
    code, _, err = run_main('write_datasets', '--dataset', 'cifar10', '--source', src, '--out', out, '--quiet')
    line = one_line(err)
    assert code == 2 and expected in line, line
    assert not [p for p in out.iterdir() if p.name != 'cifar-10-python.tar.gz'], list(out.iterdir())


def test_cifar10_end_to_end(cifar10, tmp_path):
    """.beton -> a tiny run (its head and checkpoint are CIFAR-10's) -> predict -> app -> ONNX."""
    _, data = cifar10
    run = tmp_path / 'run'
    code, out, err = train_run(data / 'cifar10_train.beton', data / 'cifar10_test.beton', run)
    assert code == 0, err
    assert 'CIFAR-10 (10 classes, 32x32)' in out
    ck = torch.load(run / 'best.pt', weights_only=True, map_location='cpu')
    assert ck['dataset']['name'] == 'cifar10' and ck['class_names'] == list(CIFAR10.class_names)
    assert ck['model_config']['num_classes'] == 10 and ck['model']['fc.weight'].shape[0] == 10
    assert ck['coarse_names'] is None and ck['fine_to_coarse'] is None
    assert ck['config']['model']['num_classes'] == 10 and ck['config']['data']['dataset'] == 'cifar10'
    image = sorted((data / 'examples').glob('*.png'))[0]
    got = serve_and_export(run, image, tmp_path, data.parent.parent)
    assert got['prediction']['superclass'] is None  # CIFAR-10 has none
    assert got['predictor'].meta.title == 'CIFAR-10' and got['examples'] and \
        Path(got['examples'][0]).parent == data / 'examples'


# --- a user's image folder ---------------------------------------------------------------------------
@pytest.fixture(scope='module')
def folder64(tmp_path_factory):
    """A class-folder layout (3 classes x 12 images, four formats, 72x90) converted at 64 px with
    a quarter of each class held out: (source folder, conversion folder)."""
    d = tmp_path_factory.mktemp('photos')
    src = make_image_folder(d / 'my photos', per_class=12)
    code, out, err = run_main('write_datasets', '--image-folder', src, '--size', 64, '--val-fraction', 0.25,
                              '--out', d / 'data_beton' / 'pets', '--name', 'pets', '--quiet')
    assert code == 0, err
    return src, d / 'data_beton' / 'pets'


def test_image_folder_converts_like_the_app_prepares(folder64):
    """Class names are the sorted folder names; a stratified, seeded quarter of each class is the
    test split; every image is the app's own preparation at 64 px; mean/std are the training
    split's."""
    from app.images import prepare_image
    from ffcv_pipeline.folder import scan
    src, out = folder64
    m = json.loads((out / 'manifest.json').read_text())
    ds = m['dataset']
    assert ds['name'] == 'pets' and ds['class_names'] == ['cat', 'dog', 'emu'] and ds['image_size'] == 64
    assert m['splits']['train']['count'] == 27 and m['splits']['test']['count'] == 9
    assert m['splits']['test']['per_class_min'] == m['splits']['test']['per_class_max'] == 3
    found = scan(src, val_fraction=0.25, seed=0)
    train = np.load(out / 'pets_train.npy')
    for (path, label), row in zip(found.train, train):
        assert np.array_equal(row['image'], prepare_image(path, size=64)[0]) and row['label'] == label
    pixels = train['image'].reshape(-1, 3).astype(np.float64)
    assert np.allclose(ds['mean'], pixels.mean(0), atol=1e-3) and np.allclose(ds['std'], pixels.std(0), atol=1e-3)
    assert scan(src, val_fraction=0.25, seed=1).test != found.test  # the seed picks the split


def test_exif_orientation_and_modes(tmp_path):
    """A JPEG whose EXIF says 'rotate 90' is converted upright; palette/grey/alpha images become
    RGB (transparency on white), as the app shows them."""
    from ffcv_pipeline.folder import write_image_folder
    src = tmp_path / 'src'
    for c in ('a', 'b'):
        (src / c).mkdir(parents=True)
    top = np.zeros((40, 40, 3), np.uint8)
    top[:20] = (250, 0, 0)  # red on top, black below
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer rotates 90 degrees clockwise
    Image.fromarray(np.ascontiguousarray(np.rot90(top, 1))).save(src / 'a' / 'rot.jpg', exif=exif, quality=95)
    Image.fromarray(top).save(src / 'a' / 'plain.png')
    Image.new('LA', (40, 40), (0, 0)).save(src / 'b' / 'clear.png')  # fully transparent: white
    Image.new('L', (40, 40), 128).save(src / 'b' / 'grey.bmp')
    res = write_image_folder(src, tmp_path / 'out', size=8, val_fraction=0.5, **QUIET)
    rows = {**{i: r for i, r in enumerate(np.load(tmp_path / 'out' / 'src_train.npy'))}}
    images = [r['image'] for r in rows.values()] + list(np.load(tmp_path / 'out' / 'src_test.npy')['image'])
    assert res.manifest['dataset']['class_names'] == ['a', 'b'] and len(images) == 4
    upright = [im for im in images if im[0, 4, 0] > 200 and im[0, 4, 1] < 50]
    assert len(upright) == 2 and all(im[7, 4].max() < 40 for im in upright)  # both red on top
    assert any((im == 255).all() for im in images) and any((im == 128).all() for im in images)


def test_bad_images_are_named_skipped_and_counted(tmp_path):
    """A truncated JPEG and a corrupt PNG are each named and skipped, with a count at the end;
    other files are ignored by their extension; --strict stops at the first with one line."""
    src = make_image_folder(tmp_path / 'src', per_class=6, formats=('JPEG',))
    good = src / 'cat' / 'cat_000.jpg'
    (src / 'cat' / 'cut.jpg').write_bytes(good.read_bytes()[:300])
    (src / 'dog' / 'noise.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 50)
    (src / 'dog' / 'notes.txt').write_text('not an image')
    code, out, err = run_main('write_datasets', '--image-folder', src, '--out', tmp_path / 'out', '--quiet')
    assert code == 0, err
    warned = [line for line in out.splitlines() if line.startswith('warning: skipped')]
    assert len(warned) == 2 and any('cut.jpg' in w for w in warned) and any('noise.png' in w for w in warned)
    assert 'skipped 2 unreadable images of 20' in out and 'ignored 1 files' in out
    m = json.loads((tmp_path / 'out' / 'manifest.json').read_text())
    assert m['splits']['train']['count'] + m['splits']['test']['count'] == 18 and m['source']['skipped'] == 2
    code, out, err = run_main('write_datasets', '--image-folder', src, '--out', tmp_path / 'strict',
                              '--quiet', '--strict', '--force')
    line = one_line(err)
    assert code == 2 and ('cut.jpg' in line or 'noise.png' in line) and '--strict' in line
    assert not (tmp_path / 'strict' / 'manifest.json').exists()


@pytest.mark.parametrize('kind, expected', [
    ('empty class', 'no images in this class folder'), ('no classes', 'no class folders'),
    ('mixed', 'train and val hold different classes (only in'), ('one class', 'needs at least 2'),
    ('one class in train/val', 'needs at least 2'),
    ('a built-in name', "'cifar10' is the built-in dataset's"), ('missing', 'no such folder')])
def test_image_folders_that_cannot_train_are_one_line(kind, expected, tmp_path):
    src = tmp_path / 'src'
    if kind == 'empty class':
        make_image_folder(src, per_class=2)
        (src / 'zebra').mkdir()
    elif kind == 'no classes':
        src.mkdir()
        Image.new('RGB', (8, 8)).save(src / 'loose.png')
    elif kind == 'mixed':
        make_image_folder(src, per_class=2, layout='train/val', val_per_class=1)
        shutil.rmtree(src / 'val' / 'emu')
    elif kind == 'one class':
        make_image_folder(src, classes=('cat',), per_class=3)
    elif kind == 'one class in train/val':  # was a traceback after decoding every image
        make_image_folder(src, classes=('cat',), per_class=2, layout='train/val', val_per_class=1)
    elif kind == 'a built-in name':  # would have replaced the official conversion in data_beton/cifar10/
        src = make_image_folder(tmp_path / 'cifar10', per_class=2)
    code, _, err = run_main('write_datasets', '--image-folder', src, '--out', tmp_path / 'out', '--quiet')
    line = one_line(err)
    assert code == 2 and expected in line, line
    if kind == 'mixed':
        assert 'only in ' in line and 'emu' in line


def test_image_folder_train_val_layout_and_idempotence(tmp_path):
    """train/ and val/ are the splits as given; a second run over the unchanged folder does
    nothing; a changed file converts again."""
    src = make_image_folder(tmp_path / 'src', per_class=4, layout='train/val', val_per_class=2)
    out = tmp_path / 'out'
    code, o1, err = run_main('write_datasets', '--image-folder', src, '--out', out, '--quiet')
    assert code == 0, err
    m = json.loads((out / 'manifest.json').read_text())
    assert (m['splits']['train']['count'], m['splits']['test']['count']) == (12, 6)
    assert m['source']['layout'] == 'train/val'
    code, o2, _ = run_main('write_datasets', '--image-folder', src, '--out', out, '--quiet')
    assert code == 0 and 'nothing to do' in o2
    Image.new('RGB', (50, 50), (1, 2, 3)).save(src / 'val' / 'dog' / 'dog_000.png')  # same name, new pixels
    code, o3, _ = run_main('write_datasets', '--image-folder', src, '--out', out, '--quiet')
    assert code == 0 and 'wrote' in o3


@pytest.mark.parametrize('loader', ['ffcv', 'torchvision'])
def test_image_folder_at_64px_end_to_end(folder64, loader, tmp_path):
    """64x64 images train through either loader (auto crop/cutout scale with the size: 8 and 16
    px), and the model serves at 64 px: predict, the app (its examples), ONNX."""
    src, data = folder64
    run = tmp_path / 'run'
    code, out, err = train_run(data / 'pets_train.beton', data / 'pets_test.beton', run,
                               **{'data.loader': loader, 'data.train_per_class': 0, 'data.test_per_class': 0,
                                  'data.batch_size': 9})
    assert code == 0, err
    assert 'pets (3 classes, 64x64)' in out and f'{loader} loader' in out
    ck = torch.load(run / 'best.pt', weights_only=True, map_location='cpu')
    assert ck['image_size'] == 64 and ck['config']['augment']['translate'] == 8
    assert ck['config']['augment']['cutout'] == 16 and ck['normalization']['mean'] == ck['dataset']['mean']
    if loader == 'torchvision':
        return  # the serving side is the same for both runs
    image = next(p for p in sorted(src.rglob('*.jpg')))  # a full-size photo, not a converted one
    got = serve_and_export(run, image, tmp_path, data.parent.parent)
    assert got['predictor'].image_size == 64 and got['predictor'].class_names == ['cat', 'dog', 'emu']
    assert got['prediction']['top'][0]['label'] in ('cat', 'dog', 'emu')
    assert got['examples'] and Path(got['examples'][0]).parent == data / 'examples'


def test_both_loaders_augment_64px_images_identically(folder64):
    """The pixel-identical augmentation check at 64 px, with the auto sizes (8 px shifts,
    16 px cutout): the FFCV JIT ops and the numpy twin agree on every pixel."""
    from ffcv_pipeline.augment import settings
    from ffcv_pipeline.loaders import make_loader, train_pipeline
    from ffcv_pipeline.ops import AugmentationState
    from ffcv_pipeline.torch_loader import make_torch_loader
    from ffcv_pipeline.writer import manifest_dataset, read_manifest
    from omegaconf import OmegaConf
    _, data = folder64
    ds = manifest_dataset(read_manifest(data), data)
    aug = settings(OmegaConf.create({'flip': True, 'brightness': 0.0, 'translate': None, 'cutout': None}),
                   ds.image_size)
    assert (aug['translate'], aug['cutout']) == (8, 16)
    cpu, state = torch.device('cpu'), AugmentationState(7)
    f = make_loader(data / 'pets_train.beton', batch_size=9, num_workers=1, order='sequential', os_cache=True,
                    drop_last=False, state=state,
                    pipelines=train_pipeline(device=cpu, dtype=torch.float32, state=state, mean=ds.mean,
                                             std=ds.std, image_size=64, normalize=False, **aug))
    t = make_torch_loader(data / 'pets_train.npy', batch_size=9, num_workers=0, device=cpu, dtype=torch.float32,
                          seed=7, train=True, augment=aug, shuffle=False, mean=ds.mean, std=ds.std)
    std, mean = torch.tensor(ds.std).view(1, 3, 1, 1), torch.tensor(ds.mean).view(1, 3, 1, 1)
    raw = np.load(data / 'pets_train.npy')['image']
    for epoch in (0, 1):
        a = torch.cat([x for x, _ in f.epoch(epoch)]).permute(0, 2, 3, 1).numpy()
        b = (torch.cat([x for x, _ in t.epoch(epoch)]) * std + mean).round().permute(0, 2, 3, 1).numpy()
        assert a.shape == (27, 64, 64, 3) and (a == b).all(), f'epoch {epoch}: {(a != b).any(-1).sum()} pixels differ'
        assert (a != raw).any()  # augmented


# --- files that do not belong together ---------------------------------------------------------------
def test_train_and_test_of_different_datasets_name_the_wrong_file(cifar10, synthetic_betons, tmp_path):
    """The file given explicitly (else the training file) decides the dataset; the other one is
    named. Both orders, and the defaults of data.dataset."""
    _, c10 = cifar10
    c100_test, c10_train = synthetic_betons / 'cifar100_test.beton', c10 / 'cifar10_train.beton'
    code, _, err = train_run(c10_train, c100_test, tmp_path / 'a')
    line = one_line(err)
    assert code == 2 and line.startswith(f'error: {c100_test}: holds cifar100 (CIFAR-100), not cifar10'), line
    code, _, err = train_run(synthetic_betons / 'cifar100_train.beton', c10 / 'cifar10_test.beton', tmp_path / 'b')
    assert code == 2 and one_line(err).startswith(f'error: {c10 / "cifar10_test.beton"}: holds cifar10')
    # only the test file given: the training file of data.dataset (a default) is the wrong one
    from ffcv_pipeline.archive import DatasetError
    from ffcv_pipeline.data import build_data
    from training.config import load_config
    root = c10.parent.parent
    cfg = load_config('tiny_cpu', [f'data.test_path={c100_test}', 'data.dataset=cifar10'])
    with pytest.raises(DatasetError, match='data.test_path') as e:
        build_data(cfg, device=torch.device('cpu'), dtype=torch.float32, root=root, workers=1)
    assert str(e.value).startswith(f'{c10_train}: holds cifar10') and '--data.dataset cifar100' in str(e.value)


def test_train_and_test_of_different_sizes_name_the_test_file(folder64, tmp_path):
    src, data = folder64
    code, _, err = run_main('write_datasets', '--image-folder', src, '--size', 32, '--val-fraction', 0.25,
                            '--out', tmp_path / 'pets32', '--name', 'pets', '--quiet')
    assert code == 0, err
    code, _, err = train_run(data / 'pets_train.beton', tmp_path / 'pets32' / 'pets_test.beton', tmp_path / 'r')
    line = one_line(err)
    assert code == 2 and line.startswith(f'error: {tmp_path / "pets32" / "pets_test.beton"}: holds 32x32 images, '
                                         f'not 64x64'), line


def test_resuming_on_another_datasets_files_is_refused(baseline_run, cifar10, tmp_path):
    run, _, _ = baseline_run
    _, c10 = cifar10
    copy = tmp_path / 'run'
    shutil.copytree(run, copy)
    train = c10 / 'cifar10_train.beton'
    code, _, err = run_main('train', '--resume', copy / 'epoch_001.pt', '--data.train_path', train,
                            '--data.test_path', c10 / 'cifar10_test.beton', '--output.progress', 'off')
    line = one_line(err)
    assert code == 2 and line.startswith(f'error: {train}: holds cifar10 (CIFAR-10), not cifar100'), line
    assert 'was trained on CIFAR-100' in line


def _beton_with_labels(path: Path, labels, size: int = 32) -> Path:
    """A raw-image .beton as the converter writes one (image + label), with the given labels."""
    from ffcv_pipeline import load_ffcv
    load_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Rows:
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return np.full((size, size, 3), 9 * i % 256, np.uint8), int(labels[i])
    DatasetWriter(str(path), {'image': RGBImageField(write_mode='raw'), 'label': IntField()},
                  num_workers=1).from_indexed_dataset(Rows())
    return path


@pytest.mark.parametrize('split, bad', [('train', 100), ('train', -1), ('test', 250), ('test', -3)])
def test_labels_outside_the_datasets_classes_name_the_file(synthetic_betons, tmp_path, split, bad):
    """Labels in [0, classes) in both splits, negative ones included: one line naming the file
    before the first step (a label of 100 would have trained on a 100-class head silently...
    or crashed inside cross-entropy)."""
    folder = tmp_path / 'data'
    folder.mkdir()
    shutil.copy(synthetic_betons / 'manifest.json', folder)  # CIFAR-100, 100 classes
    files = {s: synthetic_betons / f'cifar100_{s}.beton' for s in ('train', 'test')}
    files[split] = _beton_with_labels(folder / f'odd_{split}.beton', [0, 5, bad, 7] * 25)
    code, _, err = train_run(files['train'], files['test'], tmp_path / 'run')
    line = one_line(err)
    assert code == 2 and line.startswith(f'error: {files[split]}: labels out of range for CIFAR-100'), line
    assert f'[0, 99], found [{min(bad, 0)}, {max(bad, 7)}]' in line
    assert not (tmp_path / 'run' / 'last.pt').exists()


def test_model_num_classes_must_match_the_dataset(cifar10, tmp_path):
    _, c10 = cifar10
    code, _, err = train_run(c10 / 'cifar10_train.beton', c10 / 'cifar10_test.beton', tmp_path / 'r',
                             **{'model.num_classes': 100})
    assert code == 2 and 'model.num_classes: 100, but' in one_line(err) and 'leave it unset' in err


def test_augment_sizes_are_checked_against_the_image_size(cifar10, tmp_path):
    _, c10 = cifar10
    code, _, err = train_run(c10 / 'cifar10_train.beton', c10 / 'cifar10_test.beton', tmp_path / 'r',
                             **{'augment.cutout': 40})
    assert code == 2 and 'augment.cutout: 40 must lie in [0, 32] for 32x32 images' in one_line(err)


# --- the layout before dataset folders ------------------------------------------------------------------
def _old_layout(synthetic_betons: Path, root: Path) -> Path:
    """data_beton/ as the converter of format 2 left it: files and manifest at the top."""
    old = root / 'data_beton'
    old.mkdir(parents=True)
    for p in synthetic_betons.iterdir():
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, old / p.name)
    m = json.loads((old / 'manifest.json').read_text())
    ds = m.pop('dataset')
    m.update(format_version=2, fine_label_names=ds['class_names'], coarse_label_names=ds['superclass_names'],
             fine_to_coarse=ds['superclass_of'])
    (old / 'manifest.json').write_text(json.dumps(m))
    return old


def test_an_old_cifar100_conversion_is_moved_not_converted_again(synthetic_betons, tmp_path):
    """The converter and the trainer each move data_beton/cifar100_* into data_beton/cifar100/
    with one line; the files are the very same (no conversion, no download)."""
    from ffcv_pipeline.data import data_paths
    from ffcv_pipeline.writer import write_datasets
    from training.config import load_config
    old = _old_layout(synthetic_betons, tmp_path / 'a')
    inode = (old / 'cifar100_train.beton').stat().st_ino
    logs = []
    res = write_datasets(None, old / 'cifar100', url='http://127.0.0.1:9/unreachable', log=logs.append,
                         progress=False)
    assert res.status == 'skipped' and logs[0].startswith(f'note: moved the CIFAR-100 conversion in {old}/')
    assert (old / 'cifar100' / 'cifar100_train.beton').stat().st_ino == inode
    assert not (old / 'manifest.json').exists() and (old / 'cifar100' / 'examples').is_dir()
    assert json.loads((old / 'cifar100' / 'manifest.json').read_text())['dataset']['name'] == 'cifar100'
    old = _old_layout(synthetic_betons, tmp_path / 'b')  # the trainer's default paths move it too
    notices = []
    (train, test), _ = data_paths(load_config('tiny_cpu').data, old.parent, notices)
    assert train == old / 'cifar100' / 'cifar100_train.beton' and train.is_file() and test.is_file()
    assert len(notices) == 1 and 'moved' in notices[0]


def test_an_old_manifest_reads_as_cifar100(synthetic_betons, tmp_path):
    """Files converted into another --out by the old converter train as they are."""
    old = _old_layout(synthetic_betons, tmp_path)
    code, out, err = train_run(old / 'cifar100_train.beton', old / 'cifar100_test.beton', tmp_path / 'r',
                               **{'training.epochs': 1})
    assert code == 0 and 'CIFAR-100 (100 classes, 20 superclasses, 32x32)' in out, err


def test_a_builtin_read_back_from_a_file_is_the_builtin():
    """What a manifest or checkpoint holds (``to_dict``) reads back as the built-in itself: equal,
    and usable as a dict key. Catches a field the files do not carry (split sizes) taking part in
    equality: every CIFAR read back compared unequal to CIFAR, and no Dataset could be hashed."""
    from ffcv_pipeline.datasets import BUILTIN, Dataset
    for ds in BUILTIN.values():
        back = Dataset.from_dict(ds.to_dict(), 'test')
        assert back == ds and {ds: 1}[back] == 1 and back.download == ds.download


def test_a_third_dataset_is_one_value(tmp_path):
    """What a new built-in in the CIFAR layout takes: one Dataset value (here CIFAR-100's
    superclasses as the labels, 20 classes); the reader, writer and trainer need nothing else."""
    from ffcv_pipeline.archive import read_archive
    from ffcv_pipeline.datasets import PickleLayout
    coarse = replace(CIFAR100, name='cifar20', title='CIFAR-100 superclasses', class_names=CIFAR100.superclass_names,
                     superclass_names=None, superclass_of=None,
                     layout=PickleLayout(folder='cifar-100-python', train=('train',), test=('test',), meta='meta',
                                         labels='coarse_labels', names='coarse_label_names'))
    train = make_split(2, seed=1)
    data = read_archive(coarse, build_archive(tmp_path / 'a.tar.gz', train=train))
    assert data.dataset.num_classes == 20 and list(data.train.labels) == train['coarse_labels']


def test_cifar100_real_archive_end_to_end(real_betons, tmp_path):
    """The shared real archive (our stratified re-split, not the official test set) through the
    same path: .beton -> a tiny run on 2 images per class -> predict -> app -> ONNX."""
    out, _ = real_betons
    run = tmp_path / 'run'
    code, stdout, err = train_run(out / 'cifar100_train.beton', out / 'cifar100_test.beton', run,
                                  **{'data.train_per_class': 2, 'data.test_per_class': 1, 'training.epochs': 1})
    assert code == 0, err
    assert 'CIFAR-100 (100 classes, 20 superclasses, 32x32)' in stdout
    image = sorted((out / 'examples').glob('*.png'))[0]
    got = serve_and_export(run, image, tmp_path, out.parent)
    assert got['prediction']['superclass'] is not None and got['predictor'].meta.title == 'CIFAR-100'
    assert len(got['predictor'].class_names) == 100


def test_make_names_an_image_folder_as_the_converter_does_and_a_missing_config_does_not_hang(tmp_path):
    """``make run IMAGE_FOLDER=DIR`` trains on the dataset the converter writes (its name for a
    folder called ``cats+dogs.v2`` is ``cats_dogs.v2``; make passed the raw name, which
    --name refuses); a CONFIG that does not exist leaves the error to train.py instead of awk
    waiting on the terminal (stdin held open here, as a terminal does)."""
    if shutil.which('make') is None:
        pytest.skip('no make')
    folder = tmp_path / 'cats+dogs.v2'
    out = subprocess.run(['make', '-n', 'train', f'IMAGE_FOLDER={folder}'], cwd=ROOT, capture_output=True,
                         text=True, timeout=60).stdout
    assert f'--image-folder "{folder}"  --size 32' in out and '--data.dataset cats_dogs.v2' in out, out
    with open(tmp_path / 'out.txt', 'w') as f:
        p = subprocess.Popen(['make', '-n', 'train', 'CONFIG=no-such-config.yaml'], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=f)
        try:
            p.wait(timeout=30)  # stdin stays open, unwritten
        finally:
            p.kill()
    assert '--config no-such-config.yaml' in (tmp_path / 'out.txt').read_text()
