"""CIFAR-100 -> FFCV ``.beton`` files (``python scripts/write_datasets.py``).

Writes ``cifar100_train.beton`` (50,000) and ``cifar100_test.beton`` (10,000) with three
fields -- ``image`` (raw, lossless 32x32 RGB), ``label`` (fine, 0-99) and ``coarse_label``
(0-19) -- plus ``manifest.json``. Files are written under temporary names and renamed only
once both splits are complete, so a failure never leaves a half-written file and never
touches a previously complete one. A second run with the same source does nothing.
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import multiprocessing
import os
import re
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .archive import Cifar100, DatasetError, download, read_cifar100, source_md5
from .constants import (ARCHIVE_NAME, BETON_NAMES, CIFAR100_MD5, CIFAR100_URL,
                        FINE_TO_COARSE, MANIFEST_NAME)

FORMAT_VERSION = 1  # bump when the field layout changes; old outputs are then rewritten
FIELDS = {  # name -> description, recorded in the manifest
    'image': 'RGBImageField(write_mode=raw), 32x32x3 uint8',
    'label': 'IntField, fine label 0-99',
    'coarse_label': 'IntField, coarse label 0-19',
}


@dataclass
class WriteResult:
    status: str  # 'written' or 'skipped'
    manifest: dict
    seconds: float


class _SplitDataset:
    """Indexable view the FFCV writer's (forked) workers read samples from."""

    def __init__(self, images: np.ndarray, fine: np.ndarray, coarse: np.ndarray):
        self.images, self.fine, self.coarse = images, fine, coarse

    def __len__(self) -> int:
        return len(self.fine)

    def __getitem__(self, i):
        return self.images[i], int(self.fine[i]), int(self.coarse[i])


def _ffcv_fields():
    from ffcv.fields import IntField, RGBImageField
    return {'image': RGBImageField(write_mode='raw'), 'label': IntField(),
            'coarse_label': IntField()}


class _WorkerWatchdog:
    """ffcv's writer waits forever for its counter (or its allocation queue) when a worker
    process dies (disk full, killed). This thread notices a child that exited with an error and
    sends the main thread a real SIGINT (which also breaks a blocking wait, unlike
    ``_thread.interrupt_main``); that turns into a clear error instead of a hang."""

    def __init__(self):
        self.failed: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.2):
            for p in multiprocessing.active_children():
                if p.exitcode not in (None, 0):
                    self.failed = p.exitcode
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                    return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _write_beton(path: Path, split, num_workers: int, progress: bool, desc: str) -> None:
    import ffcv.writer
    from tqdm import tqdm

    # ffcv's writer shows a bare tqdm bar; give it a name and make it switchable.
    ffcv.writer.tqdm = functools.partial(tqdm, desc=desc, unit='img', disable=not progress)
    writer = ffcv.writer.DatasetWriter(str(path), _ffcv_fields(), num_workers=num_workers)
    watchdog = _WorkerWatchdog()
    try:
        with watchdog:
            writer.from_indexed_dataset(_SplitDataset(split.images, split.fine, split.coarse),
                                        chunksize=1000)
    except KeyboardInterrupt:
        for p in multiprocessing.active_children():
            p.terminate()
        if watchdog.failed is not None:
            raise DatasetError(f'{path}: a writer process failed (exit code {watchdog.failed}); '
                               f'is the disk full?') from None
        raise


EXAMPLES_DIR = 'examples'


def _write_examples(data: Cifar100, out_dir: Path, count: int = 12) -> None:
    """A few test images (distinct classes) as PNGs, for the app's example gallery."""
    import shutil
    from PIL import Image

    tmp = out_dir / f'.{EXAMPLES_DIR}.tmp-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    seen: set[int] = set()
    for i, label in enumerate(data.test.fine):
        if int(label) not in seen:
            seen.add(int(label))
            safe = re.sub(r'[^A-Za-z0-9_.-]+', '_', data.fine_names[label])  # names come from the archive
            Image.fromarray(data.test.images[i]).save(tmp / f'{i:05d}_{safe}.png')
            if len(seen) == count:
                break
    shutil.rmtree(out_dir / EXAMPLES_DIR, ignore_errors=True)
    os.replace(tmp, out_dir / EXAMPLES_DIR)


_TEMP = re.compile(r'^\.(.+)\.tmp-(\d+)$')  # .<name>.tmp-<pid>: this module's temporary outputs


def _remove_temps(out_dir: Path, pid: int | None = None) -> None:
    """Remove temporary outputs of process ``pid``, or (None) of earlier runs that were killed
    (SIGKILL, out of memory) and could not clean up: up to 170 MB each."""
    import shutil
    for p in out_dir.iterdir():
        m = _TEMP.match(p.name)
        if not m:
            continue
        owner = int(m.group(2))
        if pid is None:
            if owner == os.getpid():
                continue
            try:
                os.kill(owner, 0)
                continue  # that process still runs: leave its files alone
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        elif owner != pid:
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _load_manifest(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_up_to_date(out_dir: Path, md5: str | None) -> dict | None:
    """The manifest, if ``out_dir`` holds complete outputs for a source with this md5
    (any md5 when ``md5`` is None), written by this format version; else None."""
    m = _load_manifest(out_dir)
    if not m or m.get('format_version') != FORMAT_VERSION:
        return None
    if md5 is not None and m.get('source', {}).get('md5') != md5:
        return None
    for split, info in m.get('splits', {}).items():
        f = out_dir / info.get('file', '')
        if not f.is_file() or f.stat().st_size != info.get('bytes'):
            return None
    return m if set(m.get('splits', {})) == set(BETON_NAMES) else None


def _check_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix='.write-test-'):
            pass
    except OSError as e:
        raise DatasetError(f'{out_dir}: output folder is not writable ({e.strerror or e})') from None


def _manifest(data: Cifar100, files: dict[str, Path], seconds: float) -> dict:
    from importlib.metadata import version
    splits = {}
    for name, path in files.items():
        split = getattr(data, name)
        per_class = np.bincount(split.fine, minlength=100)
        splits[name] = {
            'file': path.name,
            'count': len(split),
            'bytes': path.stat().st_size,
            'per_class_min': int(per_class.min()),
            'per_class_max': int(per_class.max()),
        }
    return {
        'format_version': FORMAT_VERSION,
        'created': _dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds'),
        'source': {'path': str(Path(data.source).resolve()), 'md5': data.md5, 'official': data.official},
        'splits': splits,
        'fields': FIELDS,
        'fine_label_names': data.fine_names,
        'coarse_label_names': data.coarse_names,
        'fine_to_coarse': list(FINE_TO_COARSE),
        'ffcv_version': version('ffcv'),
        'write_seconds': round(seconds, 3),
    }


def write_datasets(source: str | os.PathLike | None = None, out_dir: str | os.PathLike = 'data_beton',
                   *, force: bool = False, num_workers: int = -1, progress: bool = True,
                   url: str = CIFAR100_URL, log: Callable[[str], None] = print) -> WriteResult:
    """Convert CIFAR-100 into ``out_dir``; see the module docstring.

    ``source``: a local archive or extracted folder; None downloads the official archive
    into ``out_dir`` (reused on later runs). Raises :class:`DatasetError` on bad input.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    _remove_temps(out_dir)  # left by killed runs

    if source is None:
        # Official data: up to date if the manifest says it came from the official archive,
        # so a second run needs neither the network nor the archive.
        if not force and (m := is_up_to_date(out_dir, CIFAR100_MD5)):
            log(f'{out_dir}: .beton files are up to date (official archive); nothing to do '
                f'(--force rewrites them)')
            return WriteResult('skipped', m, time.perf_counter() - t0)
        archive = out_dir / ARCHIVE_NAME
        if archive.is_file() and source_md5(archive) == CIFAR100_MD5:
            log(f'using the downloaded {archive}')
        else:
            log(f'downloading {url}')
            download(archive, url=url, md5=CIFAR100_MD5, progress=progress)
        source = archive

    source = Path(source)
    if not source.exists():
        raise DatasetError(f'{source}: no such file or folder')
    md5 = source_md5(source)
    if not force and (m := is_up_to_date(out_dir, md5)):
        log(f'{out_dir}: .beton files are up to date for {source} (md5 {md5}); nothing to do '
            f'(--force rewrites them)')
        return WriteResult('skipped', m, time.perf_counter() - t0)

    data = read_cifar100(source, md5=md5)
    if not data.official:
        log(f'notice: {source} has md5 {md5}, not the official {CIFAR100_MD5}; accepted after '
            f'structural checks ({len(data.train):,} train / {len(data.test):,} test images)')

    tmp = {name: out_dir / f'.{fname}.tmp-{os.getpid()}' for name, fname in BETON_NAMES.items()}
    final = {name: out_dir / fname for name, fname in BETON_NAMES.items()}
    try:
        for name in ('train', 'test'):
            _write_beton(tmp[name], getattr(data, name), num_workers, progress,
                         desc=f'write {BETON_NAMES[name]}')
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # a crash between renames => rewrite
        for name in tmp:
            os.replace(tmp[name], final[name])
        _write_examples(data, out_dir)
        seconds = time.perf_counter() - t0
        manifest = _manifest(data, final, seconds)
        mtmp = out_dir / f'.{MANIFEST_NAME}.tmp-{os.getpid()}'
        mtmp.write_text(json.dumps(manifest, indent=2) + '\n')
        os.replace(mtmp, out_dir / MANIFEST_NAME)
    except OSError as e:
        raise DatasetError(f'{out_dir}: writing failed ({e.strerror or e})') from None
    finally:
        _remove_temps(out_dir, os.getpid())  # .beton/examples/manifest temps of this run
    log(f'wrote {final["train"]} ({len(data.train):,}) and {final["test"]} ({len(data.test):,}) '
        f'in {seconds:.1f} s')
    return WriteResult('written', manifest, seconds)
