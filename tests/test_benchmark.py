"""scripts/benchmark.py in its tiny mode: the JSON has every section and every figure is > 0."""
import json

from conftest import run_script
from ffcv_pipeline.constants import BETON_NAMES


def _numbers(obj, path=''):
    if isinstance(obj, bool) or obj is None:
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f'{path}.{k}')
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f'{path}[{i}]')


def test_tiny_benchmark_writes_complete_positive_figures(synthetic_betons, tmp_path):
    r = run_script('scripts/benchmark.py', '--tiny', '--device', 'cpu',
                   '--train-beton', synthetic_betons / BETON_NAMES['train'], '--out', tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / 'benchmark.json').read_text())
    for section in ('loader_ffcv', 'loader_torchvision', 'model_step', 'full_epoch'):
        assert section in res, section
    for key in ('images_per_s_median', 'images_per_s_min', 'images_per_s_max', 'warmup_epoch_s'):
        assert res['loader_ffcv'][key] > 0 and res['loader_torchvision'][key] > 0, key
    assert len(res['loader_ffcv']['epochs']) == 2  # steady-state epochs, warm-up apart
    assert res['loader_speedup'] > 0 and res['verdict'] in ('loader-bound', 'compute-bound')
    assert 0 <= res['full_epoch']['data_wait_fraction'] < 1
    env = res['environment']
    assert env['cores'] >= 1 and env['torch'] and env['ffcv'] == '1.0.2' and env['numba']
    numbers = dict(_numbers({k: v for k, v in res.items() if k != 'settings'}))
    bad = {k: v for k, v in numbers.items() if v <= 0 and not k.endswith(('data_wait_s', 'data_wait_fraction'))}
    assert not bad, bad
    assert (tmp_path / 'benchmark.png').read_bytes()[:4] == b'\x89PNG'
    assert 'loader speed-up FFCV / torchvision' in r.stdout  # the table
