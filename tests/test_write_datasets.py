"""The converter: CIFAR-100 archive -> .beton files (round trip, real data, bad inputs, idempotence)."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from types import SimpleNamespace

from conftest import PY, REAL_ARCHIVE, ROOT, build_archive, images_of, make_split, run_main
from ffcv_pipeline.archive import DatasetError, read_archive
from conftest import ARRAY_NAMES, BETON_NAMES, CIFAR100, FINE_TO_COARSE, MANIFEST_NAME


def read_cifar100(src):
    return read_archive(CIFAR100, src)


def read_beton(path, indices=None):
    """All three fields of a .beton, sequentially, no augmentation."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    loader = Loader(str(path), batch_size=100, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False, indices=indices,
                    pipelines={'image': [SimpleRGBImageDecoder()], 'label': [IntDecoder()],
                               'coarse_label': [IntDecoder()]})
    xs, ys, cs = [], [], []
    for x, y, c in loader:
        xs.append(np.array(x)), ys.append(np.array(y).ravel()), cs.append(np.array(c).ravel())
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(cs)


def convert(*args) -> SimpleNamespace:
    """``python scripts/write_datasets.py ARGS``, in-process (a subprocess adds nothing here)."""
    code, out, err = run_main('write_datasets', *args)
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def digest(folder: Path) -> dict:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# --- round trip -----------------------------------------------------------------------------------
def test_round_trip_synthetic(synthetic_data, synthetic_betons):
    _, train, test = synthetic_data
    for name, split in (('train', train), ('test', test)):
        x, y, c = read_beton(synthetic_betons / BETON_NAMES[name])
        np.testing.assert_array_equal(x, images_of(split))  # exact pixels, same order
        np.testing.assert_array_equal(y, split['fine_labels'])
        np.testing.assert_array_equal(c, split['coarse_labels'])
        arrays = np.load(synthetic_betons / ARRAY_NAMES[name])  # the torchvision loader's copy
        np.testing.assert_array_equal(arrays['image'], images_of(split))
        np.testing.assert_array_equal(arrays['label'], split['fine_labels'])
        np.testing.assert_array_equal(arrays['coarse_label'], split['coarse_labels'])
    m = json.loads((synthetic_betons / MANIFEST_NAME).read_text())
    assert m['splits']['train']['count'] == 400 and m['splits']['test']['count'] == 200
    assert m['splits']['train']['arrays'] == 'cifar100_train.npy'
    assert m['splits']['train']['arrays_bytes'] == (synthetic_betons / 'cifar100_train.npy').stat().st_size
    ds = m['dataset']
    assert ds['name'] == 'cifar100' and ds['image_size'] == 32 and ds['mean'] == list(CIFAR100.mean)
    assert len(ds['class_names']) == 100 and len(ds['superclass_names']) == 20
    assert m['source']['official'] is False and len(m['source']['md5']) == 32
    assert m['format_version'] == 3 and ds['superclass_of'] == list(FINE_TO_COARSE)
    assert m['ffcv_version'] == '1.0.2'
    assert len(list((synthetic_betons / 'examples').glob('*.png'))) == 12


@pytest.mark.parametrize('bytes_keys', [False, True])
@pytest.mark.parametrize('folder', [False, True])
def test_reader_accepts_str_or_bytes_keys_archive_or_folder(tmp_path, bytes_keys, folder):
    train, test = make_split(1, seed=5), make_split(1, seed=6)
    src = build_archive(tmp_path / ('src' if folder else 'a.tar.gz'), train=train, test=test,
                        bytes_keys=bytes_keys, folder=folder)
    data = read_cifar100(src)
    np.testing.assert_array_equal(data.train.images, images_of(train))
    np.testing.assert_array_equal(data.test.labels, test['fine_labels'])
    np.testing.assert_array_equal(data.test.superclasses, test['coarse_labels'])
    assert data.dataset.class_names[0] == 'apple' and data.dataset.superclass_names[-1] == 'vehicles_2'


def test_folder_source_via_cli(tmp_path):
    src = build_archive(tmp_path / 'src', folder=True)
    r = convert('--source', src / 'cifar-100-python',
                   '--out', tmp_path / 'out', '--quiet')
    assert r.returncode == 0, r.stderr
    assert (tmp_path / 'out' / BETON_NAMES['train']).is_file()


# --- the real archive -------------------------------------------------------------------------------
def test_real_archive(real_betons):
    out, result = real_betons
    m = result.manifest
    assert m['splits']['train']['count'] == 50_000 and m['splits']['test']['count'] == 10_000
    assert m['splits']['train']['per_class_min'] == m['splits']['train']['per_class_max'] == 500
    assert m['splits']['test']['per_class_min'] == m['splits']['test']['per_class_max'] == 100
    src = read_cifar100(REAL_ARCHIVE)
    rng = np.random.default_rng(0)
    for name, n in (('train', 50_000), ('test', 10_000)):
        idx = np.sort(rng.choice(n, 300, replace=False))
        x, y, c = read_beton(out / BETON_NAMES[name], indices=idx)
        split = getattr(src, name)
        np.testing.assert_array_equal(x, split.images[idx])
        np.testing.assert_array_equal(y, split.labels[idx])
        np.testing.assert_array_equal(c, split.superclasses[idx])
        assert np.bincount(split.labels, minlength=100).tolist() == [n // 100] * 100
    # the fixed class -> superclass hierarchy in datasets.py agrees with the real labels
    assert np.array_equal(np.asarray(FINE_TO_COARSE)[src.train.labels], src.train.superclasses)


# --- idempotence and --force ---------------------------------------------------------------------------
def test_second_run_does_nothing_and_force_rewrites(tmp_path, synthetic_data):
    src, out = synthetic_data[0], tmp_path / 'out'
    r1 = convert('--source', src, '--out', out, '--quiet')
    assert r1.returncode == 0, r1.stderr
    assert 'not the official' in r1.stdout  # one-line notice for a non-official md5
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r2 = convert('--source', src, '--out', out, '--quiet')
    assert r2.returncode == 0 and 'nothing to do' in r2.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    # no --source afterwards (`make data CIFAR_SOURCE=...`, then `make check`): the conversion
    # there is used, no download (the URL is unreachable)
    r2b = convert('--out', out, '--quiet', '--url', 'http://127.0.0.1:9/cifar-100-python.tar.gz')
    assert r2b.returncode == 0 and f'converted from {src}, md5' in r2b.stdout, r2b.stdout + r2b.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    r3 = convert('--source', src, '--out', out, '--quiet', '--force')
    assert r3.returncode == 0 and 'wrote' in r3.stdout
    assert all(p.stat().st_mtime_ns != mtimes[p.name] for p in [*out.glob('*.beton'), *out.glob('*.npy')])
    # a different source is not "up to date"
    other = build_archive(tmp_path / 'other.tar.gz', train=make_split(1, seed=9))
    r4 = convert('--source', other, '--out', out, '--quiet')
    assert r4.returncode == 0 and 'wrote' in r4.stdout


# --- bad inputs: one clear line, exit != 0, previous outputs untouched ------------------------------
def _bad_sources(tmp_path: Path, good: Path) -> dict:
    raw = good.read_bytes()
    (tmp_path / 'truncated.tar.gz').write_bytes(raw[: len(raw) // 2])
    (tmp_path / 'corrupt.tar.gz').write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / 'corrupt.tar.xz').write_bytes(b'\xfd7zXZ\x00' + np.random.default_rng(1).bytes(4096))
    bad_shape = make_split(1, seed=3)
    bad_shape['data'] = bad_shape['data'][:, :3000]
    bad_label = make_split(1, seed=3)
    bad_label['fine_labels'][7] = 100
    bad_coarse = make_split(1, seed=3)
    bad_coarse['coarse_labels'][3] = -1
    short_labels = make_split(1, seed=3)
    short_labels['fine_labels'] = short_labels['fine_labels'][:-1]
    return {
        'truncated': (tmp_path / 'truncated.tar.gz', 'corrupt or truncated'),
        'corrupt': (tmp_path / 'corrupt.tar.gz', 'corrupt or truncated'),
        'missing_member': (build_archive(tmp_path / 'nometa.tar.gz', drop=('meta',)), 'missing member'),
        'not_a_pickle': (build_archive(tmp_path / 'badpickle.tar.gz', test=b'not a pickle'),
                         'not a readable CIFAR pickle'),
        'wrong_shape': (build_archive(tmp_path / 'shape.tar.gz', train=bad_shape), 'N x 3072'),
        'fine_out_of_range': (build_archive(tmp_path / 'label.tar.gz', test=bad_label), 'out of range'),
        'coarse_out_of_range': (build_archive(tmp_path / 'coarse.tar.gz', train=bad_coarse), 'out of range'),
        'label_count': (build_archive(tmp_path / 'count.tar.gz', train=short_labels), "'fine_labels' must be"),
        'no_such_file': (tmp_path / 'nope.tar.gz', 'no such file'),
        'corrupt_xz': (tmp_path / 'corrupt.tar.xz', 'corrupt or truncated'),
    }


def test_bad_inputs_fail_cleanly_and_keep_previous_outputs(tmp_path, synthetic_data):
    good, out = synthetic_data[0], tmp_path / 'out'
    assert convert('--source', good, '--out', out, '--quiet').returncode == 0
    before = digest(out)
    for name, (src, expected) in _bad_sources(tmp_path, good).items():
        r = convert('--source', src, '--out', out, '--quiet', '--force')
        assert r.returncode != 0, name
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith('error: '), (name, r.stderr)
        assert expected in err[0] and 'Traceback' not in r.stderr, (name, err)
        assert str(Path(src).name) in err[0], (name, err)  # names the file
        assert digest(out) == before, name  # previous complete outputs untouched
        assert not [p for p in out.iterdir() if p.name.startswith('.')], name  # no temp files left


def test_unwritable_output_folder(tmp_path, synthetic_data):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    r = convert('--source', synthetic_data[0], '--out', blocker / 'out')
    assert r.returncode != 0
    assert r.stderr.startswith('error: ') and 'not writable' in r.stderr and len(r.stderr.splitlines()) == 1


def test_download_failure_is_one_line(tmp_path):
    r = convert('--out', tmp_path / 'out', '--quiet',
                   '--url', 'http://127.0.0.1:9/cifar-100-python.tar.gz')
    assert r.returncode != 0
    assert r.stderr.startswith('error: download of http://127.0.0.1:9/') and len(r.stderr.splitlines()) == 1
    assert not list((tmp_path / 'out').glob('*.part'))


def _serve(folder: Path):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def test_download_path_checks_md5_and_is_reused(tmp_path, synthetic_data, monkeypatch):
    import ffcv_pipeline.writer as W
    from ffcv_pipeline.archive import md5sum
    src = synthetic_data[0]
    httpd = _serve(src.parent)
    url = f'http://127.0.0.1:{httpd.server_port}/{src.name}'
    try:
        out = tmp_path / 'out'
        with pytest.raises(DatasetError, match='md5'):  # not the official archive: rejected
            W.write_datasets(None, out, url=url, progress=False, log=lambda *_: None)
        assert not list(out.glob('*.part')) and not list(out.glob('*.beton'))
        from dataclasses import replace
        from ffcv_pipeline.datasets import Download
        official = replace(CIFAR100, download=Download(url, md5sum(src)))  # pretend it is official
        logs = []
        res = W.write_datasets(None, out, dataset=official, progress=False, log=logs.append)
        assert res.status == 'written' and (out / 'cifar-100-python.tar.gz').is_file()
        assert any(line == f'downloading {url}' for line in logs)
        assert res.manifest['source']['official'] is True
        res2 = W.write_datasets(None, out, dataset=official, url='http://127.0.0.1:9/unreachable',
                                progress=False, log=logs.append)
        assert res2.status == 'skipped'  # no network needed the second time
    finally:
        httpd.shutdown()


def test_temporary_files_of_killed_runs_are_removed(tmp_path, synthetic_data):
    out = tmp_path / 'out'
    out.mkdir()
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    (out / f'.cifar100_train.beton.tmp-{dead}').write_bytes(b'x' * 1000)
    (out / f'.examples.tmp-{dead}').mkdir()
    alive = out / f'.cifar100_test.beton.tmp-{os.getppid()}'  # a running process (ours is the writer): kept
    alive.write_bytes(b'y')
    r = convert('--source', synthetic_data[0], '--out', out, '--quiet')
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir() if p.name.startswith('.')) == [alive.name]


def _convert_onto_a_full_disk(archive, out: Path) -> None:
    r = subprocess.run(['sh', '-c', 'trap "" INT; exec "$0" "$@"', PY, 'scripts/write_datasets.py',
                        '--source', archive, '--out', out, '--quiet', '--workers', '1'],
                       cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f'error: {out}') and 'disk is full' in r.stderr, r.stderr
    assert not [p for p in out.iterdir() if p.name.startswith('.')]


def test_full_disk_is_one_line_and_keeps_earlier_outputs(small_disk, synthetic_data, tmp_path):
    """A real full disk (a 2.5 MB tmpfs; each synthetic .beton is 16 MB): one line saying so,
    exit code != 0, no temporary file left. Run as a background job of a script runs (`cmd &`,
    nohup: SIGINT inherited as ignored). Catches a writer that waits forever on its dead workers
    (it hung so when the watchdog woke the main thread with SIGINT)."""
    _convert_onto_a_full_disk(synthetic_data[0], small_disk / 'out')


def test_full_disk_with_work_still_queued_exits(disk_40m, tmp_path):
    """10,000 training images (10 chunks for ffcv's work queue, more than its pipe holds) on a
    40 MB tmpfs: the arrays fit, the .beton does not. Catches an exit that waits forever for the
    queue's feeder thread (it hung so on the real archive after printing the error)."""
    archive = build_archive(tmp_path / 'c.tar.gz', train=make_split(100, seed=3), test=make_split(1, seed=4))
    _convert_onto_a_full_disk(archive, disk_40m / 'out')
