"""scripts/benchmark.py in its tiny mode: every section runs (loaders, augmentation ops, the
trainer's step, a full epoch, the conversion) and its figures are consistent with each other
and with the data it was given -- not merely positive."""
import json

import pytest

from conftest import run_main


def test_tiny_benchmark_measures_every_section_consistently(synthetic_data, synthetic_betons, tmp_path):
    """Catches a loader timing that does not iterate the epoch (image counts), a ratio or
    data-wait share computed from the wrong figures, and a --tiny that skips the conversion or
    the augmentation-ops comparison."""
    code, out, err = run_main('benchmark', '--tiny', '--device', 'cpu', '--data-dir', synthetic_betons,
                              '--archive', synthetic_data[0], '--out', tmp_path)
    assert code == 0, err
    res = json.loads((tmp_path / 'benchmark.json').read_text())
    assert set(res['loaders']) == {'ffcv', 'torchvision', 'classic'}
    for kind, d in res['loaders'].items():
        assert d['images_per_epoch'] == 384, kind  # 400 images (4 per class), batches of 64, drop_last
        assert len(d['epochs']) == 1 and d['warmup_epoch_s'] > 0
        assert 0 < d['images_per_s_min'] <= d['images_per_s_median'] <= d['images_per_s_max']
        assert d['images_per_s_median'] == pytest.approx(384 / d['epoch_s'], rel=0.5)
    rate = {k: d['images_per_s_median'] for k, d in res['loaders'].items()}
    assert res['loader_speedup'] == {'ffcv/torchvision': round(rate['ffcv'] / rate['torchvision'], 2),
                                     'ffcv/classic': round(rate['ffcv'] / rate['classic'], 2)}
    ops = res['augmentation_ops']
    assert ops['ours'] > 0 and ops['ffcv_builtin'] > 0
    assert ops['speedup'] == round(ops['ours'] / ops['ffcv_builtin'], 2)
    m = res['model_step']
    from training.runtime import cpu_has_native_bf16
    want = 'bfloat16' if cpu_has_native_bf16() else 'float32'  # precision auto on the CPU
    assert (m['batch'], m['steps'], m['precision'], m['width'], m['compiled']) == (16, 2, want, 8, False)
    assert m['images_per_s'] > 0 and 'model_step_compiled' not in res  # no compile on the CPU by default
    e = res['full_epoch']['torchvision']  # --tiny's full epoch: the loader with nothing to compile
    assert e['images_per_epoch'] == 96 and e['batch'] == 16  # 1 image per class, batches of 16
    assert 0 <= e['data_wait_fraction'] < 1
    assert res['verdict'] == ('loader-bound' if e['data_wait_fraction'] > 0.05 else 'compute-bound')
    c = res['conversion']
    assert c['images'] == 600 and c['seconds'] > 0
    env = res['environment']
    assert env['cores'] >= 1 and env['ffcv'] == '1.0.2' and env['torch'] and env['numba']
    assert (tmp_path / 'benchmark.png').read_bytes()[:4] == b'\x89PNG'
    for row in ('loader speed-up ffcv/classic', 'aug ops only', 'full epoch: torchvision loader + step',
                'conversion (600 images)'):
        assert row in out, row


def test_bad_loader_choice_is_one_line(synthetic_betons, tmp_path):
    code, out, err = run_main('benchmark', '--tiny', '--loaders', 'ffcv,dali', '--data-dir', synthetic_betons)
    assert code == 2 and err.strip() == "error: --loaders: 'ffcv,dali'; choose from ['ffcv', 'torchvision', 'classic']"
