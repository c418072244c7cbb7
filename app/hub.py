"""From a trained run to the Hugging Face Hub: a Gradio Space and/or a model repository, written
in full to local folders first, then uploaded with ``huggingface_hub``. ``scripts/export.py
--push-to-hub`` / ``--hub-model`` is the command line.

    publish('runs/<run>/best.pt', space='user/cifar100', model='user/cifar100')
    # dist/hub/spaces/user/cifar100/  the --space folder (torch-free ONNX app by default)
    # dist/hub/models/user/cifar100/  model.safetensors, config.json, model.onnx, README.md (card)
    # -> https://huggingface.co/user/cifar100, https://huggingface.co/spaces/user/cifar100

What goes where:
  * the **model repository** (:func:`export_model_repo`): ``model.safetensors`` (weights),
    ``config.json`` (what rebuilds the model: ``model.modelfile``), ``model.onnx`` (verified
    against torch; the Space's own float file when both are published), ``README.md`` (the card:
    ``app.modelcard``), ``export.json``. Before it is kept, the safetensors + config.json pair is
    loaded back and must give the checkpoint's logits exactly.
  * the **Space**: what ``app.export.export(space=True)`` writes, its README linking the model.
  * the **upload** (:func:`push`): ``create_repo(exist_ok=True)`` (``space_sdk='gradio'`` for the
    Space), then one ``upload_folder`` commit of exactly the files the export listed in its
    ``export.json`` (other files in the folder, a ``.git``, stay local). Files an earlier upload
    put on the Hub and this export no longer writes are not deleted there.

Local first: the folders are complete before the first request, and a failed upload leaves them
as they are. The token is ``HF_TOKEN``'s, else the one ``hf auth login`` saved; the Hub is
``HF_ENDPOINT`` (default https://huggingface.co), read when the upload starts. No token, a
rejected token, an unreachable Hub, a connection lost mid-upload or a refusal by the Hub each end
in one line (``HubError``, exit 2 through ``scripts/_cli``) naming the repository and endpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from model import count_parameters
from model.checkpoint import model_from_checkpoint, slim_checkpoint
from model.errors import UserError
from model.fileio import atomic_write, atomic_write_text
from model.modelfile import CONFIG_NAME, WEIGHTS_NAME, load_model_folder, load_model_file, save_model_folder
from model.project import PROJECT_ROOT as ROOT

from .export import (MANIFEST, ExportError, _staged, export, model_example_dirs, onnx_bytes, verification_images,
                     verify_onnx)
from .modelcard import model_card, read_run
from .predictor import Predictor

LOGIN_HINT = ('log in with `hf auth login` (it saves a token) or set HF_TOKEN to a token with write access '
              '(https://huggingface.co/settings/tokens)')
KINDS = {'space': 'Space', 'model': 'model repository'}
MODEL_REPO_FILES = {WEIGHTS_NAME: 'the weights (safetensors)',
                    CONFIG_NAME: 'what rebuilds the model: architecture, width, classes, normalization, image size',
                    'model.onnx': 'the same model for ONNX Runtime (no torch needed), verified against torch',
                    'README.md': 'this card', MANIFEST: 'what was exported from what'}


class HubError(UserError, RuntimeError):
    """Publishing failed: no token, a rejected one, the Hub unreachable or refusing (one line)."""


def default_folder(kind: str, repo_id: str) -> Path:
    """Where a repository's files are written unless ``--out`` / ``--model-out`` say otherwise."""
    return ROOT / 'dist' / 'hub' / f'{kind}s' / repo_id


def check_repo_id(repo_id: str, option: str) -> str:
    """``USER/NAME`` as the Hub accepts it; :class:`HubError` naming ``option`` otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    if repo_id.count('/') != 1:
        raise HubError(f'{option} {repo_id!r}: give USER/NAME (your Hub user or organization, then the repository name)')
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f'{option} {repo_id!r}: not a valid repository id ({str(e).splitlines()[0]})') from None
    return repo_id


# --------------------------------------------------------------------------- the model repository

def export_model_repo(checkpoint: str | os.PathLike, out: str | os.PathLike, *, repo_id: str,
                      fp16: bool = False, onnx_file: str | os.PathLike | None = None,
                      example_dirs=None, log: Callable[[str], None] = print,
                      force: bool = False) -> dict:
    """Write the model repository's files into ``out`` (staged, then moved into place like
    ``app.export.export``; see the module docstring); returns what ``export.json`` holds.
    ``onnx_file``: an already verified ``model.onnx`` to ship (else one is made and verified)."""
    import datetime as _dt
    checkpoint, out = Path(checkpoint), Path(out)
    ckpt = slim_checkpoint(load_model_file(checkpoint), fp16=fp16)
    model = model_from_checkpoint(ckpt, what=str(checkpoint))  # fits its metadata, before any work
    manifest: dict = {}  # filled once the files are checked, written and published by _staged
    with _staged(out, manifest, force=force) as stage:
        save_model_folder(ckpt, stage)
        images, source = verification_images(model_example_dirs(ckpt) if example_dirs is None else example_dirs,
                                             size=ckpt['image_size'])
        # The pair must rebuild the very model: same logits, bit for bit (same weights, same code).
        reference = Predictor(ckpt, optimize=False)
        x, _ = reference.preprocess(images)
        reloaded = Predictor(load_model_folder(stage), optimize=False)
        diff = float(np.abs(reference.logits(x) - reloaded.logits(x)).max())
        if diff != 0.0:
            raise ExportError(f'{WEIGHTS_NAME} + {CONFIG_NAME}: reloaded, they give other logits than '
                              f'{checkpoint} (max |diff| {diff:.2e}); nothing was written')
        log(f'{WEIGHTS_NAME}: {(stage / WEIGHTS_NAME).stat().st_size / 2**20:.1f} MiB'
            f'{" (float16 weights)" if fp16 else ""}; with {CONFIG_NAME}, the same logits as the checkpoint '
            f'on {len(x)} images')
        manifest.update({'source': str(checkpoint), 'fp16': fp16, 'repo_id': repo_id,
                         'created': _dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')})
        if onnx_file is not None:
            atomic_write(stage / 'model.onnx', lambda f: f.write(Path(onnx_file).read_bytes()))
            manifest['onnx'] = f'copied from {onnx_file} (verified there)'
        else:
            atomic_write(stage / 'model.onnx', lambda f: f.write(onnx_bytes(ckpt, fp16=fp16)))
            v = verify_onnx(stage / 'model.onnx', ckpt, images, source)
            manifest['onnx'] = v.line()
            log(f'model.onnx: {(stage / "model.onnx").stat().st_size / 2**20:.1f} MiB, {v.line()}')
        run = read_run(checkpoint, ckpt)
        card = model_card(ckpt, run, repo_id, files=MODEL_REPO_FILES, parameters=count_parameters(model))
        atomic_write_text(stage / 'README.md', card)
        manifest['run'] = str(run.folder) if run.folder is not None else None
    log(f'wrote {out}/ ({", ".join(manifest["files"])})')
    return manifest


# --------------------------------------------------------------------------- the upload

def _endpoint(endpoint: str | None) -> str:
    """The Hub's address: ``endpoint``, else ``HF_ENDPOINT`` as it is now (huggingface_hub reads it
    once, at import), else huggingface_hub's default."""
    if not endpoint:
        from huggingface_hub import constants
        endpoint = os.environ.get('HF_ENDPOINT') or constants.ENDPOINT
    return endpoint.rstrip('/')


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _is_transport_error(e: BaseException) -> bool:
    """A connection that failed or broke: refused, reset, timed out, a name that does not resolve,
    a server that hung up mid-request (httpx's errors are no OSError)."""
    root = type(e).__module__.split('.')[0]
    return (root in ('httpx', 'httpx2', 'httpcore', 'httpcore2', 'h11', 'ssl', 'socket')
            and 'Status' not in type(e).__name__) or isinstance(e, (ConnectionError, TimeoutError))


def _status(e: BaseException) -> tuple[int, str] | None:
    """(HTTP status, the Hub's message) of an answered request that failed, else None."""
    from huggingface_hub.errors import HfHubHTTPError
    if not isinstance(e, HfHubHTTPError) or e.response is None:
        return None
    message = getattr(e, 'server_message', None) or ''
    if not message:
        with contextlib.suppress(Exception):  # a body that is not JSON: the status line says enough
            message = str(e.response.json().get('error', ''))
    return e.response.status_code, ' '.join(message.split())[:300]


def explain(e: BaseException, *, doing: str, endpoint: str, where: str) -> HubError | None:
    """The one line for a failed Hub call, or None when it is none of ours to explain (a bug)."""
    for x in _chain(e):
        if (answered := _status(x)) is not None:
            code, message = answered
            said = f' ({message})' if message else ''
            if code == 401:
                return HubError(f'{endpoint} rejected the token{said} while trying to {doing}: {LOGIN_HINT}; {where}')
            hint = ' (does your token have write access to that namespace?)' if code in (403, 404) else ''
            return HubError(f'{endpoint} answered {code}{said} while trying to {doing}{hint}; {where}')
        if _is_transport_error(x):
            first = str(x).strip().splitlines()[0][:200] if str(x).strip() else ''
            # never connected (refused, no route, a name that does not resolve) or lost on the way
            lost = 'Connect' not in type(x).__name__ and not isinstance(x, ConnectionRefusedError)
            what = f'lost the connection to the Hub at {endpoint} while trying' if lost else \
                f'cannot reach the Hub at {endpoint}'
            return HubError(f'{what} to {doing} ({type(x).__name__}{": " + first if first else ""}); {where}')
    return None


@contextlib.contextmanager
def _explained(doing: str, endpoint: str, where: str):
    """A failed Hub call in the block becomes its one line (:func:`explain`); a bug stays as it is."""
    try:
        yield
    except Exception as e:
        line = explain(e, doing=doing, endpoint=endpoint, where=where)
        if line is None:
            raise
        raise line from None


def _token_source() -> str:
    if os.environ.get('HF_TOKEN') or os.environ.get('HUGGING_FACE_HUB_TOKEN'):
        return 'HF_TOKEN'
    return 'the login saved by `hf auth login`'


def login(endpoint: str, where: str, token: str | None = None, *, publishing: str = ''):
    """An ``HfApi`` for ``endpoint`` with a token the Hub accepts (checked with ``whoami``), and
    the account's name; :class:`HubError` in one line otherwise (``publishing``: what for)."""
    from huggingface_hub import HfApi, get_token
    token = token or get_token()
    if not token:
        raise HubError(f'no Hugging Face token to publish {publishing} on {endpoint}: {LOGIN_HINT}, then run '
                       f'the command again; {where}')
    api = HfApi(endpoint=endpoint, token=token)
    with _explained(f'check the token (from {_token_source()}) for {publishing}', endpoint, where):
        me = api.whoami()
    return api, me.get('name')


def push(api, folder: Path, repo_id: str, repo_type: str, files: list[str], *, endpoint: str,
         private: bool = False, where: str = '', message: str = 'Upload from scripts/export.py') -> str:
    """Create (or reuse) ``repo_id`` and upload ``files`` (paths relative to ``folder``) in one
    commit; returns the repository's URL."""
    kind = KINDS[repo_type]
    extra = {'space_sdk': 'gradio'} if repo_type == 'space' else {}
    with _explained(f'create the {kind} {repo_id}', endpoint, where):
        # private=None, not False: without --private the namespace's default visibility applies
        api.create_repo(repo_id, repo_type=repo_type, exist_ok=True, private=private or None, **extra)
    with _explained(f'upload {len(files)} files to the {kind} {repo_id}', endpoint, where):
        api.upload_folder(repo_id=repo_id, repo_type=repo_type, folder_path=str(folder),
                          allow_patterns=list(files), commit_message=message)
    return f'{endpoint}/{"spaces/" if repo_type == "space" else ""}{repo_id}'  # the repository's URL


def publish(checkpoint: str | os.PathLike, *, space: str | None = None, model: str | None = None,
            out: str | os.PathLike | None = None, model_out: str | os.PathLike | None = None,
            onnx: bool = True, fp16: bool = False, int8: bool = False, private: bool = False,
            force: bool = False, log: Callable[[str], None] = print, endpoint: str | None = None,
            token: str | None = None, **export_options) -> dict[str, str]:
    """Write, then upload: the Space ``space`` from ``out`` (an ONNX app unless ``onnx=False``)
    and/or the model repository ``model`` from ``model_out``; returns {'space'/'model': URL}.
    ``export_options`` go to ``app.export.export`` (``data_dir``, ``example_dirs``, ...)."""
    if not (space or model):
        raise HubError('nothing to publish: give --push-to-hub USER/NAME (a Space) and/or --hub-model USER/NAME')
    if int8 and not space:
        raise HubError('--int8 quantizes the Space\'s model: give --push-to-hub too (a model repository '
                       'ships the float weights and a float model.onnx)')
    if space:
        check_repo_id(space, '--push-to-hub')
    if model:
        check_repo_id(model, '--hub-model')
    folders: dict[str, Path] = {}
    if model:  # its files first: the Space's README links to them
        folders['model'] = Path(model_out) if model_out else default_folder('model', model)
    if space:
        folders['space'] = Path(out) if out else default_folder('space', space)
        export(checkpoint, folders['space'], onnx=onnx or int8, fp16=fp16, int8=int8, space=True, log=log,
               force=force, hub_model=model, **export_options)
    if model:
        # the Space's verified float ONNX file when it has one; an int8 Space's is not the model's weights
        shipped = folders['space'] / 'model.onnx' if space and onnx and not int8 else None
        export_model_repo(checkpoint, folders['model'], repo_id=model, fp16=fp16, onnx_file=shipped,
                          log=log, force=force, **{k: v for k, v in export_options.items() if k == 'example_dirs'})
    where = 'nothing was uploaded; the files are in ' + ' and '.join(str(f) for f in folders.values())
    endpoint = _endpoint(endpoint)
    if not sys.stderr.isatty():  # progress bars in a log or a pipe are noise around the one error line
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    publishing = ' and '.join(f'the {KINDS[k]} {r}' for k, r in (('model', model), ('space', space)) if r)
    api, user = login(endpoint, where, token, publishing=publishing)
    log(f'logged in to {endpoint} as {user}')
    urls = {}
    for repo_type, repo_id in (('model', model), ('space', space)):
        if not repo_id:
            continue
        folder = folders[repo_type]
        files = json.loads((folder / MANIFEST).read_text())['files']  # what the export wrote
        size = sum((folder / f).stat().st_size for f in files if (folder / f).is_file())
        log(f'uploading {len(files)} files ({size / 2**20:.1f} MiB) from {folder} to the {KINDS[repo_type]} {repo_id}')
        uploaded = ' and '.join(f'the {KINDS[k]} {urls[k]}' for k in urls)
        here = (f'{uploaded} is up to date; ' if urls else '') + f'the files are in {folder}: run the command again'
        urls[repo_type] = push(api, folder, repo_id, repo_type, files, endpoint=endpoint, private=private,
                               where=here, message=f'Upload from scripts/export.py ({Path(checkpoint).name})')
        log(f'{KINDS[repo_type]}: {urls[repo_type]}')
    return urls
