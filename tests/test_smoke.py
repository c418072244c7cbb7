"""The install smoke: what a second interpreter must do before we say the project runs on it.
``.ci/run`` builds a second environment on the newest Python the machine has and runs this file
with the loader tests there (``-m 'not slow'``); the default suite skips it (marker ``smoke``):
everything here is covered there by the longer tests.

    .venv-newest/bin/python -m pytest -m 'not slow' tests/test_smoke.py tests/test_loaders.py

One test, black box, each step a fresh process as a user runs it: ``write_datasets.py`` converts
a synthetic archive; ``train.py`` trains one epoch with ``data.loader: auto``, which must pick the
ffcv loader (a broken ffcv build would fall back to torchvision with a notice, and pass
unnoticed otherwise); ``export.py`` writes the ONNX model and the safetensors + config.json pair,
and ``predict.py`` gives the checkpoint's top-5 with each.
"""
from __future__ import annotations

import json
import sys

import pytest

from conftest import build_archive, make_split, run_script

pytestmark = pytest.mark.smoke


def test_convert_train_through_ffcv_export_and_predict(tmp_path):
    archive = build_archive(tmp_path / 'c.tar.gz', train=make_split(6, seed=1), test=make_split(2, seed=2))
    data = tmp_path / 'data'
    r = run_script('scripts/write_datasets.py', '--source', archive, '--out', data, '--quiet', '--workers', '2')
    assert r.returncode == 0, r.stderr[-2000:]
    assert (data / 'cifar100_train.beton').is_file() and (data / 'cifar100_test.npy').is_file()
    r = run_script('scripts/train.py', '--config', 'tiny_cpu.yaml', '--data.train_path', data / 'cifar100_train.beton',
                   '--data.test_path', data / 'cifar100_test.beton', '--data.train_per_class', 6,
                   '--data.test_per_class', 2, '--model.width', 8, '--training.epochs', 1,
                   '--output.dir', tmp_path / 'runs', '--output.name', 'smoke', '--output.plot', 'false',
                   '--output.progress', 'false')
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / 'runs' / 'smoke' / 'summary.json').read_text())
    assert summary['loader'] == 'ffcv' and ', ffcv loader with ' in r.stdout, (sys.version, r.stdout[-2000:])
    best = tmp_path / 'runs' / 'smoke' / 'best.pt'
    r = run_script('scripts/export.py', best, '--out', tmp_path / 'export', '--onnx')
    assert r.returncode == 0, r.stderr[-2000:]
    from app.hub import export_model_repo
    export_model_repo(best, tmp_path / 'model-repo', repo_id='smoke/model', log=lambda *_: None,
                      example_dirs=[data / 'examples'])
    examples = sorted((data / 'examples').glob('*.png'))[:4]
    tops = []
    for model_file in (best, tmp_path / 'export' / 'model.onnx', tmp_path / 'model-repo'):
        r = run_script('scripts/predict.py', *examples, '--checkpoint', model_file, '--json')
        assert r.returncode == 0, r.stderr[-2000:]
        tops.append([p['top'][0]['label'] for p in json.loads(r.stdout)['predictions']])
    assert tops[0] == tops[1] == tops[2] and len(tops[0]) == len(examples) > 0
