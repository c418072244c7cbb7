"""Broken data files given to the trainer and the benchmark: real corrupted files, each ending
in one line that names the file, says what is wrong and how to fix it, exit code 2 -- never a
traceback, never a crash inside ffcv. (Corrupt archives given to the converter:
test_write_datasets.py.)"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import as_cli, run_main, tiny
from conftest import BETON_NAMES, MANIFEST_NAME

FIX = 'write_datasets.py --force'


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns('examples'))
    return dst


def _other_fields(path: Path) -> None:
    """A .beton with an image and a float 'label' (another tool's file, same name)."""
    from ffcv.fields import FloatField, RGBImageField
    from ffcv.writer import DatasetWriter

    class DS:
        def __len__(self): return 50
        def __getitem__(self, i): return np.zeros((32, 32, 3), np.uint8), float(i)
    path.unlink()
    DatasetWriter(str(path), {'image': RGBImageField(write_mode='raw'), 'label': FloatField()},
                  num_workers=1).from_indexed_dataset(DS())


def _corrupt(kind: str, folder: Path) -> tuple[Path, str]:
    """Damage the training .beton of ``folder`` in one way; (file, expected message part)."""
    f = folder / BETON_NAMES['train']
    raw = f.read_bytes()
    if kind == 'corrupt_header':
        f.write_bytes(b'\xde\xad\xbe\xef' * 4 + raw[16:])
        return f, 'not an FFCV .beton file, or a corrupt one'
    if kind == 'not_a_beton':
        f.write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(range(256)) * 40)
        return f, 'not an FFCV .beton file'
    if kind == 'truncated':
        f.write_bytes(raw[:len(raw) // 2])
        return f, 'truncated'
    if kind == 'truncated_table':  # cut inside the allocation table at the very end
        f.write_bytes(raw[:-100])
        return f, 'truncated or corrupt'
    if kind == 'empty':
        f.write_bytes(b'')
        return f, 'the file is empty'
    if kind == 'tiny':
        f.write_bytes(b'beton')
        return f, 'shorter than its header'
    if kind == 'other_fields':
        _other_fields(f)
        return f, 'written with other fields (image (image), label (type 0)'
    if kind == 'grown':  # bytes appended: the manifest's size no longer matches
        f.write_bytes(raw + b'\0' * 24)
        return f, 'truncated or corrupt'
    if kind in ('manifest_size', 'manifest_count'):  # the file or the manifest was changed since
        m = json.loads((folder / MANIFEST_NAME).read_text())
        m['splits']['train']['bytes' if kind == 'manifest_size' else 'count'] += 1
        (folder / MANIFEST_NAME).write_text(json.dumps(m))
        return f, 'but manifest.json records'
    raise AssertionError(kind)


KINDS = ['corrupt_header', 'not_a_beton', 'truncated', 'truncated_table', 'empty', 'tiny',
         'other_fields', 'grown', 'manifest_size', 'manifest_count']


@pytest.mark.parametrize('kind', KINDS)
def test_broken_beton_is_one_clear_line_for_the_trainer(kind, synthetic_betons, tmp_path):
    """Catches any check removed from ffcv_pipeline/beton.py: ffcv would then crash (assertion,
    IndexError, or a segfault in a loader thread) instead of this line."""
    folder = _copy(synthetic_betons, tmp_path / 'data')
    f, expected = _corrupt(kind, folder)
    code, out, err = run_main('train', '--config', 'tiny_cpu',
                              *as_cli(tiny(folder, tmp_path / 'run', **{'data.loader': 'ffcv'})))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f'error: {f}: ') and expected in lines[0] and FIX in lines[0], lines[0]


@pytest.mark.parametrize('kind', ['truncated', 'not_a_beton'])
def test_broken_beton_is_one_clear_line_for_the_benchmark(kind, synthetic_betons, tmp_path):
    folder = _copy(synthetic_betons, tmp_path / 'data')
    f, expected = _corrupt(kind, folder)
    code, out, err = run_main('benchmark', '--tiny', '--device', 'cpu', '--loaders', 'ffcv',
                              '--data-dir', folder, '--out', tmp_path / 'b')
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f'error: {f}: '), err
    assert expected in lines[0] and FIX in lines[0]


@pytest.mark.parametrize('kind, expected', [
    ('truncated', 'not a readable .npy file'),
    ('other', 'not the images and labels write_datasets.py writes'),
    ('count', 'but manifest.json records'),
])
def test_broken_arrays_are_one_clear_line(kind, expected, synthetic_betons, tmp_path):
    """The torchvision loader's .npy files get the same treatment."""
    folder = _copy(synthetic_betons, tmp_path / 'data')
    f = folder / 'cifar100_train.npy'
    if kind == 'truncated':
        f.write_bytes(f.read_bytes()[:5000])
    elif kind == 'other':
        np.save(f, np.zeros((10, 3), np.float32))
    else:
        np.save(f, np.load(f)[:100])
    code, out, err = run_main('train', '--config', 'tiny_cpu',
                              *as_cli(tiny(folder, tmp_path / 'run', **{'data.loader': 'torchvision'})))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f'error: {f}: '), err
    assert expected in lines[0] and FIX in lines[0]


def test_intact_files_pass_the_checks(synthetic_betons):
    from ffcv_pipeline.beton import check_beton
    m = json.loads((synthetic_betons / MANIFEST_NAME).read_text())
    for split, name in BETON_NAMES.items():
        e = m['splits'][split]
        assert check_beton(synthetic_betons / name, expected={'count': e['count'], 'bytes': e['bytes']}) == e['count']
