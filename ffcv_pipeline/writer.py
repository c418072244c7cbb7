"""CIFAR-100 -> FFCV ``.beton`` files (``python scripts/write_datasets.py``).

Writes ``cifar100_train.beton`` (50,000) and ``cifar100_test.beton`` (10,000) with three
fields -- ``image`` (raw, lossless 32x32 RGB), ``label`` (fine, 0-99) and ``coarse_label``
(0-19) --, the same data as uint8 numpy arrays (``cifar100_{train,test}.npy``, read by the
loader for hosts without ffcv; where ffcv does not import, only these are written), plus
``manifest.json``. Files are written under temporary names and renamed only once both splits
are complete, so a failure never leaves a half-written file and never touches a previously
complete one. A second run with the same source does nothing; so does a run without a
source while a complete conversion (of any source) is there.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import os
import re
import time
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Callable

import numpy as np

from model.fileio import atomic_write_text, check_writable_dir, is_disk_full

from .watchdog import NamedSharedMemory, WorkerFailed, WorkerWatchdog, remove_stale_segments
from .archive import Cifar100, DatasetError, download, read_cifar100, source_md5
from . import ffcv_import_error, ffcv_version
from .constants import (ARCHIVE_NAME, ARRAY_NAMES, BETON_NAMES, CIFAR100_MD5, CIFAR100_URL,
                        FINE_TO_COARSE, IMAGE_SHAPE, MANIFEST_NAME)

FORMAT_VERSION = 2  # bump when the outputs change (2: + .npy arrays); old outputs are then rewritten
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


def _write_beton(path: Path, split, num_workers: int, progress: bool, desc: str) -> None:
    from . import load_ffcv
    load_ffcv()
    import ffcv.writer
    from tqdm import tqdm

    from .ffcv_patches import writer_hooks
    watchdog = WorkerWatchdog()
    # ffcv's bare tqdm bar gets a name and a switch; its worker processes go to the watchdog (and
    # die with this process); its shared memory gets a name a later run can find and free
    writer_hooks(progress_bar=functools.partial(tqdm, desc=desc, unit='img', disable=not progress),
                 process_class=watchdog.process_class, shared_memory=NamedSharedMemory)
    writer = ffcv.writer.DatasetWriter(str(path), _ffcv_fields(), num_workers=num_workers)
    try:
        with watchdog:
            writer.from_indexed_dataset(_SplitDataset(split.images, split.fine, split.coarse),
                                        chunksize=1000)
    except (KeyboardInterrupt, WorkerFailed) as e:
        watchdog.abandon()
        sm = getattr(writer, 'metadata_sm', None)  # ffcv frees its shared memory only on success
        if isinstance(sm, SharedMemory):  # (a placeholder before ffcv's prepare())
            sm.close()
            with contextlib.suppress(FileNotFoundError):  # freed already
                sm.unlink()
        # Ctrl-C kills the workers too: then it is a Ctrl-C, not a failed write
        ctrl_c = isinstance(e, KeyboardInterrupt) or isinstance(e.__context__, KeyboardInterrupt)
        if ctrl_c:
            raise KeyboardInterrupt from None
        if watchdog.failed is not None:
            import shutil
            free, need = shutil.disk_usage(path.parent).free, len(split) * (split.images[0].nbytes + 128)
            why = (f'the disk is full ({free / 2**20:,.1f} MiB free, about {need / 2**20:,.0f} MiB '
                   f'needed); free some space and run again' if free < need else
                   f'a writer process failed (exit code {watchdog.failed})')
            raise DatasetError(f'{path.parent}: writing {path.name.split(".tmp-")[0].lstrip(".")} '
                               f'failed: {why}') from None
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


def read_manifest(folder: str | os.PathLike, *, strict: bool = True) -> dict | None:
    """``manifest.json`` in ``folder`` (beside the ``.beton`` files): the one reader.

    None if there is none (files written by other tools). An unreadable or corrupt one raises
    :class:`DatasetError` naming it (``strict``: training and the tools that read it), or gives
    None (``strict=False``: the converter, for which it only means "convert again")."""
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError(f'a JSON {type(manifest).__name__}, not an object')
        return manifest
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        if not strict:
            return None
        raise DatasetError(f'{path}: unreadable ({e}); rewrite it with '
                           f'`python scripts/write_datasets.py --force`') from None


def is_up_to_date(out_dir: Path, md5: str | None, *, with_beton: bool = True) -> dict | None:
    """The manifest, if ``out_dir`` holds complete outputs for a source with this md5
    (any md5 when ``md5`` is None), written by this format version (with ``.beton`` files
    when ``with_beton``); else None."""
    m = read_manifest(out_dir, strict=False)
    if not m or m.get('format_version') != FORMAT_VERSION or set(m.get('splits', {})) != set(BETON_NAMES):
        return None
    if md5 is not None and m.get('source', {}).get('md5') != md5:
        return None
    for info in m['splits'].values():
        files = [(info.get('arrays'), info.get('arrays_bytes'))]
        if with_beton:
            files.append((info.get('file'), info.get('bytes')))
        for name, size in files:
            f = out_dir / (name or '?')
            if not name or not f.is_file() or f.stat().st_size != size:
                return None
    return m


ARRAY_DTYPE = np.dtype([('image', np.uint8, IMAGE_SHAPE), ('label', np.uint8), ('coarse_label', np.uint8)])


def _write_arrays(path: Path, split) -> None:
    """One structured ``.npy`` per split (images, fine and coarse labels): memory-mappable."""
    rows = np.empty(len(split), ARRAY_DTYPE)
    rows['image'], rows['label'], rows['coarse_label'] = split.images, split.fine, split.coarse
    with open(path, 'wb') as f:
        np.save(f, rows)


def _manifest(data: Cifar100, betons: dict[str, Path] | None, arrays: dict[str, Path],
              seconds: float) -> dict:
    splits = {}
    for name, path in arrays.items():
        split = getattr(data, name)
        per_class = np.bincount(split.fine, minlength=100)
        beton = betons[name] if betons else None
        splits[name] = {
            'file': beton and beton.name, 'bytes': beton and beton.stat().st_size,
            'arrays': path.name, 'arrays_bytes': path.stat().st_size,
            'count': len(split),
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
        'ffcv_version': ffcv_version() if betons else None,
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
    check_writable_dir(out_dir)  # read-only, no permission, a file in the way, full: one line
    _remove_temps(out_dir)  # left by killed runs
    remove_stale_segments()  # their shared memory in /dev/shm, too
    no_ffcv = ffcv_import_error()
    if no_ffcv:
        log(f'notice: ffcv does not import here ({no_ffcv}): writing the numpy arrays only '
            f'(training then uses --data.loader torchvision)')

    if source is None:
        # No --source: whatever complete conversion is there (official, or from the local copy
        # an earlier `--source` gave: `make data CIFAR_SOURCE=...` then `make check`), so a
        # second run needs neither the network nor the archive.
        if not force and (m := is_up_to_date(out_dir, None, with_beton=not no_ffcv)):
            src = m.get('source', {})
            origin = ('the official archive' if src.get('official')
                      else f'{src.get("path", "?")}, md5 {src.get("md5", "?")}')
            log(f'{out_dir}: .beton files are up to date (converted from {origin}); nothing to do '
                f'(--force downloads and rewrites them)')
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
    if not force and (m := is_up_to_date(out_dir, md5, with_beton=not no_ffcv)):
        log(f'{out_dir}: .beton files are up to date for {source} (md5 {md5}); nothing to do '
            f'(--force rewrites them)')
        return WriteResult('skipped', m, time.perf_counter() - t0)

    data = read_cifar100(source, md5=md5)
    if not data.official:
        log(f'notice: {source} has md5 {md5}, not the official {CIFAR100_MD5}; accepted after '
            f'structural checks ({len(data.train):,} train / {len(data.test):,} test images)')

    names = {**{('arrays', k): v for k, v in ARRAY_NAMES.items()},
             **({} if no_ffcv else {('beton', k): v for k, v in BETON_NAMES.items()})}
    tmp = {key: out_dir / f'.{fname}.tmp-{os.getpid()}' for key, fname in names.items()}
    final = {key: out_dir / fname for key, fname in names.items()}
    try:
        for name in ('train', 'test'):
            _write_arrays(tmp['arrays', name], getattr(data, name))
            if not no_ffcv:
                _write_beton(tmp['beton', name], getattr(data, name), num_workers, progress,
                             desc=f'write {BETON_NAMES[name]}')
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # a crash between renames => rewrite
        for key in tmp:
            os.replace(tmp[key], final[key])
        _write_examples(data, out_dir)
        seconds = time.perf_counter() - t0
        betons = None if no_ffcv else {k: final['beton', k] for k in BETON_NAMES}
        manifest = _manifest(data, betons, {k: final['arrays', k] for k in ARRAY_NAMES}, seconds)
        atomic_write_text(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + '\n')
    except OSError as e:
        if is_disk_full(e):
            raise DatasetError(f'{out_dir}: the disk is full ({e.strerror or e}); free some space '
                               f'and run again (earlier outputs are intact)') from None
        raise DatasetError(f'{out_dir}: writing failed ({e.strerror or e})') from None
    finally:
        _remove_temps(out_dir, os.getpid())  # .beton/.npy/examples/manifest temps of this run
    kind = 'arrays' if no_ffcv else 'beton'
    log(f'wrote {final[kind, "train"]} ({len(data.train):,}) and {final[kind, "test"]} '
        f'({len(data.test):,}) in {seconds:.1f} s')
    return WriteResult('written', manifest, seconds)
