"""A dataset -> FFCV ``.beton`` files (``python scripts/write_datasets.py``).

For each split, ``<name>_train.beton`` / ``<name>_test.beton`` with the fields ``image`` (raw,
lossless RGB at the dataset's size), ``label`` and, where the dataset has superclasses,
``coarse_label``; the same data as uint8 numpy arrays (``<name>_{train,test}.npy``, read by the
loader for hosts without ffcv; where ffcv does not import, only these are written); a few test
images as PNGs (``examples/``, the app's gallery) and ``manifest.json`` (the dataset value --
classes, image size, mean/std -- counts, file sizes, where it came from). By default into
``data_beton/<name>/``, so two datasets never overwrite each other.

Sources: a built-in dataset's official archive (downloaded, md5 checked) or a local copy
(``write_datasets``), or a folder of the user's own images (``ffcv_pipeline.folder``). Files
are written under temporary names and renamed only once both splits are complete, so a failure
never leaves a half-written file and never touches a previously complete one. A second run
with the same source does nothing; so does a run without a source while a complete conversion
(of any source) is there.
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
from model.project import PROJECT_ROOT

from .watchdog import NamedSharedMemory, WorkerFailed, WorkerWatchdog, remove_stale_segments
from .archive import DatasetError, SourceData, download, read_archive, source_md5
from . import ffcv_import_error, ffcv_version
from .datasets import BUILTIN, DATA_DIR, DEFAULT, LEGACY, SPLITS, Dataset, get_dataset

# bump when the outputs change; older outputs are then rewritten. 3: the dataset value in the
# manifest, a folder per dataset. Format 2 (CIFAR-100 only, same files) is read as CIFAR-100.
FORMAT_VERSION = 3
MANIFEST_NAME = 'manifest.json'
EXAMPLES_DIR = 'examples'


@dataclass
class WriteResult:
    status: str  # 'written' or 'skipped'
    manifest: dict
    seconds: float
    out_dir: Path | None = None


def default_out(dataset: str | Dataset, root: Path = PROJECT_ROOT) -> Path:
    name = dataset if isinstance(dataset, str) else dataset.name
    return root / DATA_DIR / name


def fields(ds: Dataset) -> dict[str, str]:
    """name -> description of the ``.beton`` fields (recorded in the manifest)."""
    s = ds.image_size
    out = {'image': f'RGBImageField(write_mode=raw), {s}x{s}x3 uint8',
           'label': f'IntField, class 0-{ds.num_classes - 1}'}
    if ds.has_superclasses:
        out['coarse_label'] = f'IntField, superclass 0-{len(ds.superclass_names) - 1}'
    return out


class _SplitDataset:
    """Indexable view the FFCV writer's (forked) workers read samples from."""

    def __init__(self, split):
        self.images, self.labels, self.sup = split.images, split.labels, split.superclasses

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        if self.sup is None:
            return self.images[i], int(self.labels[i])
        return self.images[i], int(self.labels[i]), int(self.sup[i])


def _ffcv_fields(ds: Dataset):
    from ffcv.fields import IntField, RGBImageField
    out = {'image': RGBImageField(write_mode='raw'), 'label': IntField()}
    if ds.has_superclasses:
        out['coarse_label'] = IntField()
    return out


def _write_beton(path: Path, split, ds: Dataset, num_workers: int, progress: bool, desc: str) -> None:
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
    writer = ffcv.writer.DatasetWriter(str(path), _ffcv_fields(ds), num_workers=num_workers)
    try:
        with watchdog:
            writer.from_indexed_dataset(_SplitDataset(split), chunksize=1000)
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


def _write_examples(data: SourceData, out_dir: Path, count: int = 12) -> None:
    """A few test images (distinct classes) as PNGs, for the app's example gallery."""
    import shutil
    from PIL import Image

    tmp = out_dir / f'.{EXAMPLES_DIR}.tmp-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    seen: set[int] = set()
    names = data.dataset.class_names
    for i, label in enumerate(data.test.labels):
        if int(label) not in seen:
            seen.add(int(label))
            safe = re.sub(r'[^A-Za-z0-9_.-]+', '_', names[label])  # names come from the source
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


# --- the manifest ---------------------------------------------------------------------------------
def _upgrade(m: dict) -> dict:
    """A format-2 manifest (CIFAR-100 only, before datasets were values) in today's form: the
    files are the same, so they are read, not converted again."""
    if m.get('format_version') != 2 or 'dataset' in m:
        return m
    ds = BUILTIN[LEGACY]
    names = m.get('fine_label_names') or list(ds.class_names)
    sup = m.get('coarse_label_names') or list(ds.superclass_names)
    m = {k: v for k, v in m.items() if k not in ('fine_label_names', 'coarse_label_names', 'fine_to_coarse')}
    m['dataset'] = {**ds.to_dict(), 'class_names': list(names), 'superclass_names': list(sup)}
    m['format_version'] = FORMAT_VERSION
    return m


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
        manifest = _upgrade(manifest)
        if 'dataset' in manifest:
            Dataset.from_dict(manifest['dataset'], 'its "dataset" entry')  # raises ValueError
        return manifest
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        if not strict:
            return None
        raise DatasetError(f'{path}: unreadable ({e}); rewrite it with '
                           f'`python scripts/write_datasets.py --force`') from None


def manifest_dataset(manifest: dict, folder: str | os.PathLike) -> Dataset:
    """The dataset value a manifest (read by :func:`read_manifest`) describes."""
    if 'dataset' not in manifest:
        raise DatasetError(f'{Path(folder) / MANIFEST_NAME}: names no dataset (format version '
                           f'{manifest.get("format_version")}); rewrite it with '
                           f'`python scripts/write_datasets.py --force`')
    return Dataset.from_dict(manifest['dataset'], str(Path(folder) / MANIFEST_NAME))


def split_files(folder: str | os.PathLike) -> dict[str, Path]:
    """{'train': .beton, 'test': .beton} of the conversion in ``folder`` (its manifest's dataset
    names them); :class:`DatasetError` if there is none."""
    m = read_manifest(folder)
    if m is None:
        raise DatasetError(f'{folder}: no {MANIFEST_NAME}: not a folder `python scripts/write_datasets.py` '
                           f'wrote')
    ds = manifest_dataset(m, folder)
    return {split: Path(folder) / ds.file(split) for split in SPLITS}


def is_up_to_date(out_dir: Path, md5: str | None, *, with_beton: bool = True,
                  dataset: str | None = None) -> dict | None:
    """The manifest, if ``out_dir`` holds complete outputs (of ``dataset`` when given) for a
    source with this md5 (any md5 when ``md5`` is None), written by this format version (with
    ``.beton`` files when ``with_beton``); else None."""
    m = read_manifest(out_dir, strict=False)
    if not m or m.get('format_version') != FORMAT_VERSION or set(m.get('splits', {})) != set(SPLITS):
        return None
    if dataset is not None and m.get('dataset', {}).get('name') != dataset:
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


def array_dtype(ds: Dataset) -> np.dtype:
    """One row of a split's ``.npy``: the image, the label (and the superclass label)."""
    label = np.uint8 if ds.num_classes <= 256 else np.int32
    cols = [('image', np.uint8, (ds.image_size, ds.image_size, 3)), ('label', label)]
    if ds.has_superclasses:
        cols.append(('coarse_label', np.uint8 if len(ds.superclass_names) <= 256 else np.int32))
    return np.dtype(cols)


def _write_arrays(path: Path, split, ds: Dataset) -> None:
    """One structured ``.npy`` per split (images, labels): memory-mappable."""
    rows = np.empty(len(split), array_dtype(ds))
    rows['image'], rows['label'] = split.images, split.labels
    if ds.has_superclasses:
        rows['coarse_label'] = split.superclasses
    with open(path, 'wb') as f:
        np.save(f, rows)


def _manifest(data: SourceData, betons: dict[str, Path] | None, arrays: dict[str, Path],
              seconds: float, extra: dict | None) -> dict:
    splits = {}
    for name, path in arrays.items():
        split = getattr(data, name)
        per_class = np.bincount(split.labels, minlength=data.dataset.num_classes)
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
        'dataset': data.dataset.to_dict(),
        'source': {'path': str(Path(data.source).resolve()), 'md5': data.md5, 'official': data.official,
                   **(extra or {})},
        'splits': splits,
        'fields': fields(data.dataset),
        'ffcv_version': ffcv_version() if betons else None,
        'write_seconds': round(seconds, 3),
    }


def write_outputs(data: SourceData, out_dir: Path, *, no_ffcv: str | None, num_workers: int,
                  progress: bool, t0: float, log: Callable[[str], None],
                  source_extra: dict | None = None) -> WriteResult:
    """Write ``data``'s arrays, ``.beton`` files (unless ``no_ffcv``), examples and manifest into
    ``out_dir`` atomically (see the module docstring): the second half of every conversion."""
    ds = data.dataset
    names = {**{('arrays', k): ds.file(k, 'npy') for k in SPLITS},
             **({} if no_ffcv else {('beton', k): ds.file(k) for k in SPLITS})}
    tmp = {key: out_dir / f'.{fname}.tmp-{os.getpid()}' for key, fname in names.items()}
    final = {key: out_dir / fname for key, fname in names.items()}
    try:
        for name in SPLITS:
            _write_arrays(tmp['arrays', name], getattr(data, name), ds)
            if not no_ffcv:
                _write_beton(tmp['beton', name], getattr(data, name), ds, num_workers, progress,
                             desc=f'write {ds.file(name)}')
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # a crash between renames => rewrite
        for key in tmp:
            os.replace(tmp[key], final[key])
        _write_examples(data, out_dir)
        seconds = time.perf_counter() - t0
        betons = None if no_ffcv else {k: final['beton', k] for k in SPLITS}
        manifest = _manifest(data, betons, {k: final['arrays', k] for k in SPLITS}, seconds, source_extra)
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
    return WriteResult('written', manifest, seconds, out_dir)


def prepare_out_dir(out_dir: Path, log: Callable[[str], None]) -> str | None:
    """Check ``out_dir`` is writable, clean up after killed runs; returns why ffcv does not
    import here (then only the arrays are written), or None."""
    check_writable_dir(out_dir)  # read-only, no permission, a file in the way, full: one line
    _remove_temps(out_dir)  # left by killed runs
    remove_stale_segments()  # their shared memory in /dev/shm, too
    no_ffcv = ffcv_import_error()
    if no_ffcv:
        log(f'notice: ffcv does not import here ({no_ffcv}): writing the numpy arrays only '
            f'(training then uses --data.loader torchvision)')
    return no_ffcv


# --- the conversion of a built-in dataset ----------------------------------------------------------
def write_datasets(source: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
                   *, dataset: str | Dataset = DEFAULT, force: bool = False, num_workers: int = -1,
                   progress: bool = True, url: str | None = None,
                   log: Callable[[str], None] = print) -> WriteResult:
    """Convert a built-in ``dataset`` into ``out_dir`` (default ``data_beton/<name>/``); see the
    module docstring.

    ``source``: a local archive or extracted folder; None downloads the official archive
    into ``out_dir`` (reused on later runs). Raises :class:`DatasetError` on bad input.
    """
    t0 = time.perf_counter()
    try:
        ds = get_dataset(dataset) if isinstance(dataset, str) else dataset
    except ValueError as e:
        raise DatasetError(f'--dataset: {e}') from None
    out_dir = Path(out_dir) if out_dir is not None else default_out(ds)
    migrate_legacy(out_dir, log=log)  # <folder>/cifar100 while <folder> holds the old layout
    no_ffcv = prepare_out_dir(out_dir, log)
    official = ds.download

    if source is None:
        # No --source: whatever complete conversion is there (official, or from the local copy
        # an earlier `--source` gave: `make data CIFAR_SOURCE=...` then `make check`), so a
        # second run needs neither the network nor the archive.
        if not force and (m := is_up_to_date(out_dir, None, with_beton=not no_ffcv, dataset=ds.name)):
            src = m.get('source', {})
            origin = ('the official archive' if src.get('official')
                      else f'{src.get("path", "?")}, md5 {src.get("md5", "?")}')
            log(f'{out_dir}: .beton files are up to date (converted from {origin}); nothing to do '
                f'(--force downloads and rewrites them)')
            return WriteResult('skipped', m, time.perf_counter() - t0, out_dir)
        if official is None:
            raise DatasetError(f'{ds.name}: there is no download for it; pass --source PATH')
        archive = out_dir / official.archive_name
        if archive.is_file() and source_md5(archive, ds.layout) == official.md5:
            log(f'using the downloaded {archive}')
        else:
            log(f'downloading {url or official.url}')
            download(archive, url=url or official.url, md5=official.md5, progress=progress)
        source = archive

    source = Path(source)
    if not source.exists():
        raise DatasetError(f'{source}: no such file or folder')
    md5 = source_md5(source, ds.layout)
    if not force and (m := is_up_to_date(out_dir, md5, with_beton=not no_ffcv, dataset=ds.name)):
        log(f'{out_dir}: .beton files are up to date for {source} (md5 {md5}); nothing to do '
            f'(--force rewrites them)')
        return WriteResult('skipped', m, time.perf_counter() - t0, out_dir)

    data = read_archive(ds, source, md5=md5)
    if not data.official:
        log(f'notice: {source} has md5 {md5}, not the official {official.md5 if official else "(none)"}; '
            f'accepted after structural checks ({len(data.train):,} train / {len(data.test):,} test images)')
    return write_outputs(data, out_dir, no_ffcv=no_ffcv, num_workers=num_workers, progress=progress,
                         t0=t0, log=log)


# --- the layout before datasets had folders ----------------------------------------------------------
def migrate_legacy(folder: Path, log: Callable[[str], None] = print) -> bool:
    """Move a CIFAR-100 conversion from ``data_beton/`` (the layout before every dataset had its
    folder) into ``folder`` (``data_beton/cifar100/``), with one line: the files are the same, so
    nothing is converted or downloaded again. A move cut short (Ctrl-C, kill) is finished by the
    next call: the old manifest goes last. Returns whether anything moved."""
    folder = Path(folder)
    parent = folder.parent
    if folder.name != LEGACY:
        return False
    old = read_manifest(parent, strict=False)
    if not old or old.get('dataset', {}).get('name') != LEGACY or (folder / MANIFEST_NAME).is_file():
        return False
    files = [e.get(k) for e in old.get('splits', {}).values() for k in ('file', 'arrays')]
    files += [BUILTIN[LEGACY].download.archive_name, EXAMPLES_DIR]
    try:
        folder.mkdir(exist_ok=True)
        moved = []
        for name in filter(None, files):
            if (parent / name).exists() and not (folder / name).exists():
                os.replace(parent / name, folder / name)
                moved.append(name)
        atomic_write_text(folder / MANIFEST_NAME, json.dumps(old, indent=2) + '\n')
        (parent / MANIFEST_NAME).unlink()
    except OSError as e:
        raise DatasetError(f'{parent}: cannot move its CIFAR-100 conversion into {folder} '
                           f'({e.strerror or e}); move the files yourself, or convert again') from None
    log(f'note: moved the CIFAR-100 conversion in {parent}/ into {folder}/ (one folder per dataset '
        f'now); nothing was converted again')
    return True
