"""Ship a trained model: an inference-only checkpoint, an ONNX model verified against torch, and
a ready-to-push Hugging Face Space folder. ``scripts/export.py`` is the command line.

    python scripts/export.py runs/<run>/best.pt --out export/             # model.pt (slim)
    python scripts/export.py runs/<run>/best.pt --out export/ --onnx      # + model.onnx, verified
    python scripts/export.py runs/<run>/best.pt --out my-space/ --onnx --space --fp16
    python scripts/export.py runs/<run>/best.pt --out my-space/ --int8 --space   # ~3x faster ONNX

What lands in ``--out``:
  * ``model.pt``: weights and the metadata the app shows, no optimizer/scaler/RNG state
    (``model.checkpoint.slim_checkpoint``); ``--fp16`` stores the weights as float16.
  * ``model.onnx`` (``--onnx``): dynamic batch, NCHW float32 input ``input``, output ``logits``;
    the app's metadata (``app.modelmeta``) rides in its ``metadata_props``. Verified before it is
    kept: the torch model and ONNX Runtime classify the same images (the examples of the
    model's dataset, ``data_beton/<dataset>/examples``, else synthetic ones); max |logit difference| <= :data:`ONNX_TOLERANCE` and every top-1 equal,
    or the export fails. ``--fp16`` stores its weights as float16 too (a Cast per weight, which
    ONNX Runtime folds away at load time: half the file, the same speed).
  * ``--int8`` (implies ``--onnx``): ``model.onnx`` quantized to int8 after the float32 file
    passed the check above, calibrated on training images and kept only if its test top-1 stays
    within a point of float32's (``app.quantize``; needs the converted arrays of the model's
    dataset: ``--data-dir``, else the ``data_beton/<dataset>/`` whose classes are the model's).
  * ``--space``: ``app.py`` and the modules it imports, ``requirements.txt``, ``README.md`` (the
    Space's YAML header), ``examples/``; with ``--onnx`` the folder runs without torch (gradio,
    onnxruntime, numpy, pillow) and ships ``model.onnx`` only, else ``model.pt`` and ``model/``.
  * ``export.json``: what was exported from what, the verification figures, the file list.

Nothing half-written: everything is built in a temporary folder beside ``--out`` and moved into
place at the end (re-exporting into a Space clone replaces our files, removes the ones a
previous export listed and this one no longer makes, and leaves ``.git`` and the rest alone).
A file there that no earlier export wrote (it lists them in ``export.json``), e.g. the user's own
``app.py`` or ``README.md``, stops the export with one line naming it, unless ``--force``.
Measured figures: docs/BENCHMARKS.md "Export / ONNX".
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from model import count_parameters
from model.checkpoint import atomic_save, model_from_checkpoint, slim_checkpoint
from model.modelfile import load_model_file
from model.errors import UserError
from model.fileio import DiskFullError, NotWritableError, atomic_write, atomic_write_text, is_disk_full
from model.project import PROJECT_ROOT as ROOT

from .modelmeta import META_KEY, ModelMeta, dataset_folders
from .predictor import Predictor
from .quantize import INT8_MAX_TOP1_DROP, QuantizeError, load_split, quantize_int8

HERE = Path(__file__).resolve().parent  # app/
ONNX_TOLERANCE = 1e-3  # max |logit difference| ONNX Runtime vs torch; measured ~1e-6 (fp32)
OPSET = 17
SPACE_MODULES = {'common': ('app.py', 'predictor.py', 'images.py', 'modelmeta.py'),
                 'onnx': ('onnx_backend.py',), 'torch': ('torch_backend.py',)}
# What a Space takes from model/: every Space the shared facts (image size, root; standard
# library only), a torch Space the whole package (the network and the checkpoint format).
MODEL_FILES = {'onnx': ('__init__.py', 'errors.py', 'project.py'),
               'torch': tuple(sorted(p.name for p in (ROOT / 'model').glob('*.py')))}
REQUIREMENTS = {'onnx': HERE / 'requirements-onnx.txt', 'torch': HERE / 'requirements.txt'}
MANIFEST = 'export.json'


class ExportError(UserError, ValueError):
    """The export cannot be done as asked (one line; ``scripts/_cli.run`` prints it)."""


@dataclass(frozen=True)
class Verification:
    images: int
    source: str  # where the images came from
    max_abs_logit_diff: float
    top1_agreement: int  # images whose top-1 class is the same
    tolerance: float = ONNX_TOLERANCE

    def line(self) -> str:
        return (f'verified against torch on {self.images} images ({self.source}): max |logit diff| '
                f'{self.max_abs_logit_diff:.2e} (tolerance {self.tolerance:.0e}), top-1 agreement '
                f'{self.top1_agreement}/{self.images}')


# --------------------------------------------------------------------------- ONNX

def onnx_bytes(ckpt: dict, *, fp16: bool = False) -> bytes:
    """The checkpoint's model as ONNX (dynamic batch) with :class:`ModelMeta` in its metadata."""
    import onnx
    model = model_from_checkpoint(ckpt, channels_last=False)
    meta = ModelMeta.from_checkpoint(ckpt, count_parameters(model))
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter('ignore')
        # dynamo=False: the TorchScript exporter needs no onnxscript and matched torch to ~1e-6.
        # Constant folding merges each BatchNorm into its conv; with float16 weights that would
        # round the merged weights a second time (logits off by ~1e-3), so then BatchNorm stays
        # a node and ONNX Runtime merges it in float32 at load time.
        torch.onnx.export(model, torch.zeros(1, 3, meta.image_size, meta.image_size), buf,
                          dynamo=False, opset_version=OPSET, input_names=['input'],
                          output_names=['logits'], do_constant_folding=not fp16,
                          dynamic_axes={'input': {0: 'batch'}, 'logits': {0: 'batch'}})
    proto = onnx.load_from_string(buf.getvalue())
    if fp16:
        _weights_to_fp16(proto)
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, meta.to_json()
    proto.producer_name = 'cifar100-ffcv scripts/export.py'
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _weights_to_fp16(proto) -> None:
    """Store float32 initializers as float16, each behind a Cast back to float32: the graph still
    computes in float32 (ONNX Runtime folds the Casts into float32 constants at load time)."""
    from onnx import TensorProto, helper, numpy_helper
    casts = []
    for init in proto.graph.initializer:
        if init.data_type != TensorProto.FLOAT or np.prod(init.dims) < 16:
            continue  # tiny tensors (shapes, scalars): not worth a Cast
        name = init.name
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16),
                                              f'{name}__fp16'))
        casts.append(helper.make_node('Cast', [f'{name}__fp16'], [name], to=TensorProto.FLOAT))
    nodes = casts + list(proto.graph.node)  # Casts first: the graph stays topologically sorted
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def data_folders(ckpt: dict) -> list[Path]:
    """The converted datasets with the checkpoint's classes (``data_beton/<dataset>/``)."""
    return dataset_folders(ROOT, ckpt['class_names'])


def model_example_dirs(ckpt: dict) -> list[Path]:
    return [d / 'examples' for d in data_folders(ckpt)] + [HERE / 'examples']


def verification_images(dirs, count: int = 16, size: int = 32) -> tuple[list, str]:
    """Real test images of the model's dataset (the converter's ``examples/*.png``) if there are
    any, else ``count`` synthetic ``size`` x ``size`` ones (seeded)."""
    found = next(((f, str(d)) for d in dirs if (f := sorted(Path(d).glob('*.png')))), None)
    if found:
        return found
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)], 'synthetic'


def verify_onnx(onnx_path: Path, ckpt: dict, images: list, source: str) -> Verification:
    """Classify ``images`` with the plain torch model and with ONNX Runtime (as served);
    :class:`ExportError` if they disagree beyond :data:`ONNX_TOLERANCE` or on any top-1."""
    reference = Predictor(ckpt, optimize=False)
    served = Predictor(onnx_path)
    x, _ = reference.preprocess(images)
    want, got = reference.logits(x), served.logits(x)
    v = Verification(images=len(x), source=source,
                     max_abs_logit_diff=float(np.abs(want - got).max()),
                     top1_agreement=int((want.argmax(1) == got.argmax(1)).sum()))
    if v.max_abs_logit_diff > v.tolerance or v.top1_agreement < v.images:
        raise ExportError(f'{onnx_path.name}: ONNX Runtime disagrees with torch: {v.line()}; '
                          f'the ONNX file was not kept')
    return v


# --------------------------------------------------------------------------- the folder

def _copy(src: Path, dst: Path) -> None:
    atomic_write(dst, lambda f: f.write(src.read_bytes()))


def space_readme(ckpt: dict, backend: str, hub_model: str | None = None) -> str:
    """app/README.md's YAML header (it configures the Space) and a short card for this model;
    ``hub_model``: the model repository it was published with (linked from the Space)."""
    header = (HERE / 'README.md').read_text().split('---\n')[1]
    if hub_model:  # the Hub lists the Space on the model's page
        header += f'models:\n- {hub_model}\n'
    m, cfg = ckpt.get('metrics') or {}, ckpt['model_config']
    top1 = f', test top-1 {m["test_top1"]:.2%}' if m.get('test_top1') is not None else ''
    runtime = ('ONNX Runtime (no torch needed)' if backend == 'onnx'
               else 'PyTorch (CPU)')
    title = (ckpt.get('dataset') or {}).get('title') or ''
    n, s = len(ckpt['class_names']), ckpt['image_size']
    sup = ', and the superclass of the first' if ckpt.get('coarse_names') else ''
    return (f'---\n{header}---\n\n# {title or "Image"} classifier\n\n'
            f'A {cfg["arch"]} (width {cfg.get("width", 64)}) trained{" on " + title if title else ""} '
            f'({ckpt.get("epoch")} epochs{top1}, {s}x{s} images), served with {runtime}. Drop in an '
            f'image: the five most likely of the {n} classes{sup}.\n\n'
            f'Run it locally: `pip install -r requirements.txt && python app.py` '
            f'(http://127.0.0.1:7860). Exported with `scripts/export.py` from the '
            f'cifar100-ffcv project.\n'
            + (f'\nThe weights (safetensors, ONNX), their config and a model card: '
               f'[{hub_model}](https://huggingface.co/{hub_model}).\n' if hub_model else ''))


def _stage_space(stage: Path, ckpt: dict, backend: str, examples: list[Path],
                 hub_model: str | None = None) -> None:
    for name in SPACE_MODULES['common'] + SPACE_MODULES[backend]:
        _copy(HERE / name, stage / name)
    for name in MODEL_FILES[backend]:
        _copy(ROOT / 'model' / name, stage / 'model' / name)
    _copy(REQUIREMENTS[backend], stage / 'requirements.txt')
    atomic_write_text(stage / 'README.md', space_readme(ckpt, backend, hub_model))
    for p in examples:
        _copy(p, stage / 'examples' / p.name)


def _previous_files(out: Path) -> set[str]:
    """The files a previous export into ``out`` wrote (its ``export.json``), else none."""
    try:
        return set(json.loads((out / MANIFEST).read_text()).get('files', []))
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, AttributeError) as e:
        raise ExportError(f'{out / MANIFEST}: unreadable ({e}); it says which files an earlier export '
                          f'wrote: fix or delete it, or pass --force') from None


def _publish(stage: Path, out: Path, *, force: bool = False) -> list[str]:
    """Move the staged files into ``out``: one rename if it does not exist, else file by file
    (each an atomic ``os.replace``), removing what the previous export listed and this one
    does not make. A file in ``out`` that no previous export wrote (the user's own ``app.py``,
    ``README.md``) is never replaced without ``force``: :class:`ExportError` naming them, and
    nothing is moved. Returns the file list (relative paths)."""
    files = sorted(str(p.relative_to(stage)) for p in stage.rglob('*') if p.is_file())
    if not out.exists():
        os.rename(stage, out)
        return files
    try:
        previous = _previous_files(out)
    except ExportError:
        if not force:
            raise
        previous = set()  # --force: replace, but remove nothing we cannot vouch for
    theirs = [rel for rel in files if rel not in previous and rel != MANIFEST and os.path.lexists(out / rel)]
    if theirs and not force:
        shown = ', '.join(theirs[:5]) + (f' and {len(theirs) - 5} more' if len(theirs) > 5 else '')
        raise ExportError(f'{out}: would replace files that no earlier export wrote ({shown}); '
                          f'move them away, export into another --out, or pass --force to replace them')
    stale = previous - set(files)
    for rel in files:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / rel, out / rel)
    for rel in stale:
        (out / rel).unlink(missing_ok=True)
        for folder in (out / rel).parents:  # and the folders it leaves empty (model/)
            if folder == out or any(folder.iterdir()):
                break
            folder.rmdir()
    shutil.rmtree(stage, ignore_errors=True)
    return files


def _staging_dir(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise ExportError(f'{out}: exists and is not a folder')
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f'.{out.name}.', suffix='.tmp'))
    except OSError as e:  # read-only, no permission, a file in the way, full
        raise (DiskFullError(out, e) if is_disk_full(e) else NotWritableError(out, e, 'output folder')) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp's 0700 would hide the published folder
    return stage


@contextlib.contextmanager
def _staged(out: Path, manifest: dict, *, force: bool = False):
    """A staging folder for ``out`` (:func:`_staging_dir`). When the block ends without an error,
    ``manifest`` gets the file list and is written as ``export.json`` and the folder is
    published (:func:`_publish`); on any error the staging folder is removed."""
    stage = _staging_dir(out)
    try:
        yield stage
        manifest['files'] = sorted([str(p.relative_to(stage)) for p in stage.rglob('*') if p.is_file()] + [MANIFEST])
        atomic_write_text(stage / MANIFEST, json.dumps(manifest, indent=2) + '\n')
        _publish(stage, out, force=force)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, *, onnx: bool = False,
           fp16: bool = False, space: bool = False, int8: bool = False,
           data_dir: str | os.PathLike | None = None, example_dirs=None,
           log: Callable[[str], None] = print, max_top1_drop: float = INT8_MAX_TOP1_DROP,
           force: bool = False, hub_model: str | None = None) -> dict:
    """Do the export (see the module docstring); returns what ``export.json`` holds.
    ``checkpoint``: a ``.pt`` file or ``model.safetensors`` + ``config.json`` (their folder or
    either file). ``hub_model``: the model repository the Space's README links to."""
    checkpoint, out = Path(checkpoint), Path(out)
    if int8 and fp16:
        raise ExportError('--int8 and --fp16 exclude each other (int8 stores its weights in 8 bits)')
    ckpt = slim_checkpoint(load_model_file(checkpoint), fp16=fp16)
    model_from_checkpoint(ckpt, what=str(checkpoint))  # weights that fit their metadata, before any work
    if data_dir is None:  # the converted dataset with the model's classes
        data_dir = next(iter(data_folders(ckpt)), None) or ROOT / 'data_beton'
    if int8:  # its data, before anything is built
        try:
            for split in ('train', 'test'):
                load_split(Path(data_dir), split)
        except QuantizeError as e:
            raise ExportError(str(e)) from None
    onnx = onnx or int8
    manifest: dict = {'source': str(checkpoint), 'fp16': fp16, 'int8': int8, 'onnx': onnx, 'space': space,
                      'created': _dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}
    with _staged(out, manifest, force=force) as stage:
        if not (space and onnx):  # a torch-free Space never reads model.pt: don't ship 45 MB
            atomic_save(ckpt, stage / 'model.pt')
            log(f'model.pt: inference-only checkpoint, {(stage / "model.pt").stat().st_size / 2**20:.1f} MiB'
                f'{" (float16 weights)" if fp16 else ""}')
        dirs = example_dirs if example_dirs is not None else model_example_dirs(ckpt)
        images, source = verification_images(dirs, size=ckpt['image_size'])
        if onnx:
            atomic_write(stage / 'model.onnx', lambda f: f.write(onnx_bytes(ckpt, fp16=fp16)))
            v = verify_onnx(stage / 'model.onnx', ckpt, images, source)
            # with --int8: the float32 model it was quantized from (int8_check: the shipped one)
            manifest['verification'] = {**asdict(v), 'model': 'float32' + (' (before int8)' if int8 else '')}
            log(f'model.onnx: {(stage / "model.onnx").stat().st_size / 2**20:.1f} MiB, {v.line()}')
        if int8:  # from the float32 file just verified against torch
            float32 = stage / 'model.float32.onnx'
            os.replace(stage / 'model.onnx', float32)
            try:
                check = quantize_int8(float32, stage / 'model.onnx', Path(data_dir), log=log,
                                      max_top1_drop=max_top1_drop)
            except QuantizeError as e:
                raise ExportError(str(e)) from None
            finally:
                float32.unlink(missing_ok=True)
            manifest['int8_check'] = asdict(check)
            log(f'model.onnx (int8): {(stage / "model.onnx").stat().st_size / 2**20:.1f} MiB, {check.line()}')
        if space:
            backend = 'onnx' if onnx else 'torch'
            _stage_space(stage, ckpt, backend, [p for p in images if isinstance(p, Path)][:12], hub_model)
            log(f'Space folder ({backend} backend): run it with `cd {out} && python app.py`')
    top = sorted({f.split('/')[0] + ('/' if '/' in f else '') for f in manifest['files']})
    log(f'wrote {out}/ ({", ".join(top)})')
    return manifest
