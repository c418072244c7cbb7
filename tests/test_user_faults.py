"""Faults a user runs into that used to lose work or end in a traceback (issue 18): resumed runs
with overrides, unwritable output folders, two runs in one folder, a killed converter, an export
over the user's own files, bugs dressed up as user errors, the NaN stop's message. Each uses the
real thing: a read-only tmpfs, a process without root's rights, two processes, ``kill -9``."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import PY, ROOT, _tmpfs, as_cli, build_archive, make_split, one_line, run_main, tiny


def children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (from /proc)."""
    out = []
    for d in os.listdir('/proc'):
        if d.isdigit():
            try:
                if int(Path(f'/proc/{d}/stat').read_text().rsplit(')', 1)[1].split()[1]) == pid:
                    out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def alive(pids) -> list[int]:
    """Those of ``pids`` still running (a zombie is not running)."""
    out = []
    for p in pids:
        try:
            if Path(f'/proc/{p}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z':
                out.append(p)
        except OSError:
            pass
    return out


def kill_9_leaves_no_orphans(p: subprocess.Popen, kids: list[int], who: str) -> None:
    """``kill -9`` of ``p``; its children ``kids`` must be gone within 10 s."""
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    left = wait_until(lambda: not alive(kids), 10) or alive(kids)
    assert left is True, f'{who} still running 10 s after their parent was killed: {left}'


def wait_until(cond, timeout: float, step: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (v := cond()):
            return v
        time.sleep(step)
    return cond()


@pytest.fixture
def ro_disk(tmp_path):
    """A read-only tmpfs (root only; skipped elsewhere)."""
    yield from _tmpfs(tmp_path / 'ro', 'ro,size=1m')


@pytest.fixture
def run_copy(baseline_run, tmp_path):
    """A copy of the baseline run's folder (width 8, 2 epochs) to resume from."""
    run = tmp_path / 'copy'
    shutil.copytree(baseline_run[0], run)
    return run


# ---- 1. resuming with overrides ------------------------------------------------------------------
@pytest.mark.parametrize('key, value', [('model.width', 16), ('data.batch_size', 25),
                                        ('output.name', 'other')])
def test_resume_refuses_an_override_that_cannot_work(run_copy, key, value):
    """Today: width 16 ended in a 'size mismatch' traceback; a new batch size was accepted
    silently (its steps per epoch break the saved step counter)."""
    code, out, err = run_main('train', '--resume', run_copy / 'epoch_001.pt', f'--{key}', value)
    line = one_line(err)
    assert code == 2 and f'--resume cannot change {key}' in line, err


def test_resume_config_lists():
    from training.config import RESUME_HARMLESS, RESUME_REFUSED, ConfigError, load_config, resume_config, to_dict
    base = to_dict(load_config('tiny_cpu'))
    logs = []
    resume_config(base, ['output.plot=false', 'data.num_workers=1', 'output.progress=off'], log=logs.append)
    assert logs == []  # harmless keys: quiet
    resume_config(base, ['training.epochs=4', 'training.tta=false', 'output.plot=false'], log=logs.append)
    # a key in no list (added later, like training.tta here) counts as run-changing: noted
    assert logs == ["note: resuming with changed training.epochs (2 -> 4), training.tta (True -> False): "
                    "the result will differ from an uninterrupted run"]
    logs.clear()
    resume_config(base, ['training.epochs=2'], log=logs.append)  # the value it had: no change
    assert logs == []
    with pytest.raises(ConfigError, match=r'^--resume cannot change model.width \(16 -> 8\)'):
        resume_config({**base, 'model': {**base['model'], 'width': 16}}, ['model.width=8'])
    assert not set(RESUME_HARMLESS) & set(RESUME_REFUSED)


def test_resume_with_a_run_changing_override_says_so(run_copy):
    code, out, err = run_main('train', '--resume', run_copy / 'epoch_001.pt', '--training.lr', '0.1',
                              '--output.plot', 'false', '--output.progress', 'off')
    assert code == 0, err
    notes = [ln for ln in out.splitlines() if ln.startswith('note: resuming')]
    assert notes == ['note: resuming with changed training.lr (0.2 -> 0.1): the result will differ '
                     'from an uninterrupted run'], out


# ---- 2. an output folder that cannot be written --------------------------------------------------
def _blocked(kind: str, ro_dir: Path, tmp_path: Path) -> Path:
    if kind == 'read-only':
        return ro_dir / 'out'
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    return blocker / 'out'


WHY = {'read-only': 'Read-only file system', 'a file in the way': 'is a file, not a folder'}


@pytest.fixture(params=['read-only', 'a file in the way'])
def blocked(request, tmp_path):
    ro = tmp_path / 'ro'
    if request.param == 'read-only':
        ro = next(_tmpfs(ro, 'ro,size=1m'))
    yield request.param, _blocked(request.param, ro, tmp_path)
    subprocess.run(['umount', '-l', str(ro)], capture_output=True)


@pytest.mark.parametrize('script', ['train', 'speedrun', 'benchmark', 'export', 'write_datasets'])
def test_unwritable_output_folder_is_one_line(script, blocked, synthetic_data, synthetic_betons,
                                              baseline_run, tmp_path):
    """Today: train and speedrun ended in an OSError traceback (speedrun after its first run had
    failed), benchmark and export in a traceback or a message without the cause."""
    kind, out = blocked
    args = {
        'train': ['--config', 'tiny_cpu', *as_cli(tiny(synthetic_betons, out / 'run'))],
        'speedrun': ['--config', 'tiny_cpu', '--runs', '1', '--out', out,
                     *as_cli(tiny(synthetic_betons, tmp_path / 'unused'))],
        'benchmark': ['--tiny', '--data-dir', synthetic_betons, '--out', out],
        'export': [baseline_run[0] / 'last.pt', '--out', out],
        'write_datasets': ['--source', synthetic_data[0], '--out', out, '--quiet'],
    }[script]
    if script == 'speedrun':  # its runs go below --out: drop the tiny run's own output.dir
        args = [a for a in args if not str(a).startswith(('--output.dir', '--output.name'))]
    code, _, err = run_main(script, *args)
    line = one_line(err)
    assert code == 2 and WHY[kind] in line and str(out.parent if kind == 'a file in the way' else out) in line, err


def _as_nobody(*args, env=None) -> subprocess.CompletedProcess:
    if not shutil.which('setpriv') or os.geteuid() != 0:
        pytest.skip('needs root and setpriv to drop privileges')
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'HOME': '/tmp', 'NUMBA_CACHE_DIR': '/tmp', **(env or {})}
    nobody = ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups', PY]
    probe = subprocess.run([*nobody, '-c', 'import sys, training; open(sys.argv[1]).close()', str(ROOT / args[0])],
                           cwd=ROOT, capture_output=True, env=env)
    if probe.returncode != 0:  # e.g. a checkout in a root-only temporary folder (a CI clone)
        pytest.skip('the unprivileged user cannot read this checkout or its environment')
    return subprocess.run([*nobody, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.fixture
def root_only_dir():
    """A folder that only root may write (as root, chmod stops nothing: the writer drops root)."""
    d = Path(tempfile.mkdtemp(prefix='root-only-'))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_no_permission_is_one_line(root_only_dir, synthetic_data):
    src = root_only_dir / 'src.tar.gz'
    shutil.copy(synthetic_data[0], src)
    src.chmod(0o644)
    r = _as_nobody('scripts/write_datasets.py', '--source', src, '--out', root_only_dir / 'out', '--quiet')
    line = one_line(r.stderr)
    assert r.returncode == 2 and f'{root_only_dir / "out"}: output folder is not writable (Permission denied)' in line


@pytest.mark.parametrize('kind', ['read-only', 'no permission'])
def test_app_with_an_unwritable_temporary_folder(kind, tmp_path, root_only_dir):
    """Gradio keeps uploads in $GRADIO_TEMP_DIR: unwritable, every upload failed with a
    traceback in the log; now the app does not start, with one line."""
    if kind == 'read-only':
        folder = next(_tmpfs(tmp_path / 'ro', 'ro,size=1m')) / 'gradio'
        r = subprocess.run([PY, 'app/app.py', '--no-compile'], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env={**os.environ, 'GRADIO_TEMP_DIR': str(folder)})
        subprocess.run(['umount', '-l', str(tmp_path / 'ro')], capture_output=True)
    else:
        folder = root_only_dir / 'gradio'
        r = _as_nobody('app/app.py', '--no-compile', env={'GRADIO_TEMP_DIR': str(folder)})
    line = one_line(r.stderr.strip().splitlines()[-1] if r.returncode == 2 else r.stderr)
    assert r.returncode == 2 and line.startswith(f'error: {folder}: cannot write the temporary folder'), r.stderr


# ---- 3. one run folder, one owner ------------------------------------------------------------------
HOLD = """
import sys, time
from pathlib import Path
from training.state import RunFolder
RunFolder.claim(Path(sys.argv[1]))
print('locked', flush=True)
time.sleep(120)
"""


def test_a_second_run_in_a_live_run_folder_is_refused(synthetic_betons, tmp_path):
    """Two real processes: one holds runs/<name> (what a trainer does for its whole life), a
    trainer under the same name stops at once with one line; after a kill -9 of the holder the
    lock is free again (the kernel drops it: nothing stuck). Today both trained to the end
    into the same folder."""
    run = tmp_path / 'shared'
    holder = subprocess.Popen([PY, '-c', HOLD, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, 'PYTHONPATH': str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == 'locked'
        code, out, err = run_main('train', '--config', 'tiny_cpu', *as_cli(tiny(synthetic_betons, run)))
        line = one_line(err)
        assert code == 2 and line.startswith(f'error: {run}: another run is writing this folder (pid {holder.pid}')
        assert not (run / 'metrics.jsonl').exists() and not (run / 'config.yaml').exists()
    finally:
        holder.kill()
        holder.wait()
    from training.state import RunFolder
    folder = RunFolder.claim(run)  # free after kill -9 (no training needed to show it: ~20 s)
    assert folder.path == run
    folder.close()


def test_a_new_run_never_replaces_a_finished_one(baseline_run, synthetic_betons, tmp_path):
    """Today a second run under a finished run's name deleted its metrics.jsonl and overwrote
    last.pt/best.pt. Now it writes <name>-1 (timm's convention) and says so."""
    run = tmp_path / 'done'
    shutil.copytree(baseline_run[0], run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code, out, err = run_main('train', '--config', 'tiny_cpu', *as_cli(tiny(synthetic_betons, run, **{
        'training.epochs': 1, 'output.plot': 'false'})))
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert f"note: {run} holds an earlier run's results; this run writes {run}-1" in out
    assert json.loads((tmp_path / 'done-1' / 'summary.json').read_text())['epochs'] == 1


# ---- 4. a killed converter, killed trainer ---------------------------------------------------------
def _shm() -> set[str]:
    return set(os.listdir('/dev/shm')) if os.path.isdir('/dev/shm') else set()


def test_killed_converter_leaves_no_workers_and_the_next_run_cleans_up(tmp_path, synthetic_data):
    """kill -9 of write_datasets.py mid-write, and of its resource tracker (the whole job, as
    an OOM kill or `kill -9 -PGID` does): its ffcv workers exit within seconds, and the next
    run frees the shared-memory segment left in /dev/shm. Today the workers ran on (for minutes,
    ~700 MB each) and the segment stayed."""
    archive = build_archive(tmp_path / 'big', train=make_split(300, seed=3), test=make_split(1, seed=4),
                            folder=True)  # an extracted folder: no 100 MB to compress first
    before = _shm()
    p = subprocess.Popen([PY, 'scripts/write_datasets.py', '--source', archive, '--out', tmp_path / 'out',
                          '--quiet', '--workers', '2'], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        kids = wait_until(lambda: (k := children(p.pid)) and len(k) >= 3 and k, 90)  # 2 workers + tracker
        assert kids, 'the converter never started its workers'
        time.sleep(0.2)
        for k in kids:  # the resource tracker too: else it might free the segment itself
            try:
                if b'resource_tracker' in Path(f'/proc/{k}/cmdline').read_bytes():
                    os.kill(k, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):  # a worker that had finished its share
                pass
        kill_9_leaves_no_orphans(p, kids, 'the converter\'s workers')
    finally:
        for k in alive(kids or []):
            os.kill(k, signal.SIGKILL)
    from ffcv_pipeline.writer import write_datasets
    write_datasets(synthetic_data[0], tmp_path / 'next', progress=False, num_workers=1, log=lambda *_: None)
    stale = wait_until(lambda: not (_shm() - before), 3) or (_shm() - before)
    assert stale is True, f'left in /dev/shm: {stale}'


def test_killed_trainer_leaves_no_loader_workers(synthetic_betons, tmp_path):
    """The torchvision loader's DataLoader workers watch their parent (torch checks every 5 s):
    after kill -9 of the trainer mid-epoch they are gone within 10 s, and the run folder's lock
    is free."""
    run = tmp_path / 'killed'
    p = subprocess.Popen([PY, 'scripts/train.py', '--config', 'tiny_cpu',
                          *as_cli(tiny(synthetic_betons, run, **{'data.loader': 'torchvision', 'training.epochs': 200,
                                                                 'data.batch_size': 10}))],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kids = []
    try:
        assert wait_until(lambda: (run / 'metrics.jsonl').is_file(), 120), 'no epoch finished'
        kids = wait_until(lambda: (k := children(p.pid)) and len(k) >= 2 and k, 10)
        assert kids, children(p.pid)  # the train loader's workers (persistent; the test split is resident)
        kill_9_leaves_no_orphans(p, kids, 'the trainer\'s loader workers')
    finally:
        for k in alive(kids or []):
            os.kill(k, signal.SIGKILL)
        if p.poll() is None:
            p.kill()

    def lock_free():  # a POSIX lock: the killed trainer's, not shared with its workers
        with open(run / '.lock', 'r+') as f:
            try:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError:
                return False
    assert lock_free(), 'the run folder is still locked after its trainer was killed'


# ---- 5. export over a user's files -------------------------------------------------------------------
def test_export_never_replaces_the_users_files(baseline_run, tmp_path):
    """Today `export.py --space --out DIR` replaced the user's own app.py and README.md silently."""
    out = tmp_path / 'space'
    out.mkdir()
    (out / 'app.py').write_text('# mine\n')
    (out / 'README.md').write_text('# my notes\n')
    (out / 'keep.txt').write_text('other')
    code, _, err = run_main('export', baseline_run[0] / 'last.pt', '--out', out, '--space')
    line = one_line(err)
    assert code == 2 and f'{out}: would replace files that no earlier export wrote (README.md, app.py)' in line
    assert (out / 'app.py').read_text() == '# mine\n' and (out / 'README.md').read_text() == '# my notes\n'
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'app.py', 'keep.txt']  # nothing else either
    code, _, err = run_main('export', baseline_run[0] / 'last.pt', '--out', out, '--space', '--force')
    assert code == 0, err
    assert (out / 'app.py').read_text() != '# mine\n' and (out / 'keep.txt').read_text() == 'other'
    code, _, err = run_main('export', baseline_run[0] / 'last.pt', '--out', out, '--space')  # its own files
    assert code == 0, err


# ---- 6. bugs are not user errors ------------------------------------------------------------------------
def test_a_bug_keeps_its_traceback(monkeypatch, synthetic_betons, tmp_path):
    """A plain ValueError from inside (numpy, torch, our own code) used to become one
    `error:` line and exit 2, hiding the bug; now it propagates (a traceback, exit 1)."""
    import training.trainer as T

    def broken(*a, **k):
        raise ValueError('operands could not be broadcast together')
    monkeypatch.setattr(T.Trainer, 'run', broken)
    with pytest.raises(ValueError, match='broadcast'):
        run_main('train', '--config', 'tiny_cpu', *as_cli(tiny(synthetic_betons, tmp_path / 'r')))
    # ... while the user's own mistakes stay one line
    code, _, err = run_main('train', '--config', 'tiny_cpu', '--training.nope', '1')
    assert code == 2 and one_line(err) == "error: unknown key 'training.nope' (sections: data, augment, model, training, output)"
    code, _, err = run_main('export', tmp_path / 'missing.pt', '--out', tmp_path / 'e')
    assert code == 2 and str(tmp_path / 'missing.pt') in one_line(err)


def test_a_bug_in_a_subprocess_shows_a_traceback(tmp_path):
    """The same through a real process: exit code 1 and Python's traceback."""
    code = ("import sys; sys.argv[1:] = []; sys.path.insert(0, 'scripts'); import _cli\n"
            "def main(argv):\n    import numpy as np; np.zeros(2) + np.zeros(3)\n_cli.run(main)\n")
    r = subprocess.run([PY, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and 'Traceback' in r.stderr and 'ValueError: operands' in r.stderr, r.stderr


# ---- 7. the NaN stop says what is on disk --------------------------------------------------------------
def test_nan_before_any_checkpoint_says_there_is_none(synthetic_betons, tmp_path):
    run = tmp_path / 'nan'
    code, out, err = run_main('train', '--config', 'tiny_cpu', *as_cli(tiny(synthetic_betons, run, **{
        'training.lr': 1e30, 'training.warmup_epochs': 0})))
    assert code == 3, err
    line = err.strip().splitlines()[-1]
    assert line.startswith('error: training diverged') and 'no checkpoint was written' in line, err
    assert 'last good checkpoint' not in line and not (run / 'last.pt').exists()
