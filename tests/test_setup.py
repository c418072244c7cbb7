"""Set-up files agree with each other: environment.yml pins == requirements*.txt pins, and
the ffcv pin is the same everywhere it is named."""
import os
import re
import subprocess
from pathlib import Path

import pytest
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


# --- the interpreter: a different PYTHON rebuilds the venv (issue 25) ------------------------------
def pythons() -> dict[str, str]:
    """One interpreter per Python 3.x version found here (PATH, pyenv's versions): {'3.11': path}."""
    import glob
    import shutil
    found = {}
    cands = [shutil.which(f'python3.{m}') for m in range(11, 16)]
    cands += sorted(glob.glob(os.path.expanduser('~/.pyenv/versions/3.*/bin/python3')))
    for c in filter(None, cands):
        r = subprocess.run([c, '-c', 'import sys; print("%d.%d" % sys.version_info[:2])'],
                           capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip() >= '3.11':
            found.setdefault(r.stdout.strip(), c)
    return found


def setup_offline(venv: Path, python: str | None) -> subprocess.CompletedProcess:
    """scripts/setup.sh with nothing to install from (no index, no config, no local wheels): it gets
    as far as choosing and (re)creating the venv, then its first install fails within seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('PIP_')}
    env.update({'VENV': str(venv), 'WITH_FFCV': '0', 'PIP_NO_INDEX': '1', 'PIP_CONFIG_FILE': os.devnull})
    env.pop('PYTHON', None)
    if python:
        env['PYTHON'] = python
    return subprocess.run(['bash', 'scripts/setup.sh'], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def venv_version(venv: Path) -> str:
    return subprocess.run([venv / 'bin' / 'python', '-c', 'import sys; print("%d.%d" % sys.version_info[:2])'],
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope='module')
def two_pythons() -> tuple[tuple[str, str], tuple[str, str]]:
    found = pythons()
    if len(found) < 2:
        pytest.skip(f'needs two Python versions >= 3.11, found {sorted(found)}')
    (va, a), (vb, b) = sorted(found.items())[:2]
    return (va, a), (vb, b)


def test_another_python_rebuilds_the_venv_saying_so(two_pythons, tmp_path):
    """A venv of Python A, PYTHON naming Python B: set-up says it rebuilds, and the venv is then
    B's (before this, the stamp ignored the interpreter: "already set up", A's venv kept). Without
    PYTHON, or with A again, the venv keeps its interpreter. A folder that is no venv is never
    removed. Catches: a stamp without the version, a rebuild that is silent or never happens, an
    rm -rf of a folder set-up did not make."""
    (va, a), (vb, b) = two_pythons
    venv = tmp_path / 'venv'
    subprocess.run([a, '-m', 'venv', '--without-pip', venv], check=True)
    for python in (None, a):  # the venv's own interpreter: no rebuild
        r = setup_offline(venv, python)
        assert 'rebuilding' not in r.stdout and venv_version(venv) == va, r.stdout + r.stderr
    r = setup_offline(venv, b)
    assert f'[setup] {venv} was built with Python {va}; PYTHON={b} is Python {vb}: rebuilding {venv}' \
        in r.stdout.splitlines(), r.stdout + r.stderr
    assert venv_version(venv) == vb and r.returncode != 0  # then the offline install fails, as meant
    foreign = tmp_path / 'not-a-venv'
    (foreign / 'bin').mkdir(parents=True)
    (foreign / 'bin' / 'python').symlink_to(a)
    (foreign / 'keep.txt').write_text('mine')
    r = setup_offline(foreign, b)
    assert r.returncode == 1 and f'{foreign} is Python {va}, not {vb}' in r.stderr
    assert (foreign / 'keep.txt').read_text() == 'mine'
