"""Set-up files agree with each other: environment.yml pins == requirements*.txt pins, and
the ffcv pin is the same everywhere it is named."""
import re

import yaml

from conftest import ROOT


def pins(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.split('#')[0].strip().lstrip('- ').strip()
        if m := re.fullmatch(r'([A-Za-z0-9_.\-]+)==([^\s;]+)', line):
            out[m.group(1).lower().replace('_', '-')] = m.group(2)
    return out


def test_environment_yml_matches_pip_pins():
    pip_side = pins((ROOT / 'requirements.txt').read_text()) | pins((ROOT / 'requirements-dev.txt').read_text())
    env = yaml.safe_load((ROOT / 'environment.yml').read_text())
    pip_section = next(d['pip'] for d in env['dependencies'] if isinstance(d, dict))
    conda_side = pins('\n'.join(pip_section))
    assert conda_side == pip_side
    assert {'torch', 'torchvision', 'numpy', 'numba', 'opencv-python-headless', 'gradio'} <= set(pip_side)
    assert pip_side['torch'] == '2.14.1' and pip_side['torchvision'] == '0.29.1'
    assert 'python=3.11' in env['dependencies']


def test_ffcv_pin_is_consistent_and_installed_without_deps():
    setup = (ROOT / 'scripts' / 'setup.sh').read_text()
    assert 'FFCV_PIN="ffcv==1.0.2"' in setup and '--no-deps --no-build-isolation "$FFCV_PIN"' in setup
    assert 'pip install --no-deps --no-build-isolation ffcv==1.0.2' in (ROOT / 'environment.yml').read_text()
    assert 'opencv-python==' not in (ROOT / 'requirements.txt').read_text()  # only the headless build


def test_installed_versions_match_pins():
    from importlib.metadata import version
    pip_side = pins((ROOT / 'requirements.txt').read_text())
    for name in ('torch', 'torchvision', 'numpy', 'numba', 'gradio'):
        assert version(name).split('+')[0] == pip_side[name], name
    assert version('ffcv') == '1.0.2'
