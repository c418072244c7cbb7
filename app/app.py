"""The trained classifier (CIFAR-100, CIFAR-10 or your own images: the model file says which) as a
Gradio web app (also a Hugging Face Space; see app/README.md).

    python app/app.py                                   # http://127.0.0.1:7860
    python app/app.py --checkpoint runs/rn18/best.pt --host 0.0.0.0 --port 8080

Model: ``--checkpoint`` (a training or exported ``.pt``, an exported ``.onnx``, or a model
repository's ``model.safetensors`` + ``config.json``), else ``$MODEL_PATH``, else ``model.onnx`` /
``model.safetensors`` / ``model.pt`` beside this file (an exported Space folder),
else the newest ``runs/*/best.pt``. A broken ``--checkpoint`` is an error (exit 2); without any
model the app still starts and the page says how to train one. A torch model is compiled at
start-up (``--no-compile`` / ``COMPILE_MODEL=0`` to skip); an ``.onnx`` one is served by ONNX
Runtime, without torch.

Upload, paste or photograph an image -> top-5 classes (gr.Label), the superclass where the
dataset has them, notes on what
was done to the input; a panel describes the model. Bad input (not an image, corrupt, empty,
> 50 megapixels) gives a message in the page and the app keeps serving.

Load test, 200 requests at concurrency 8 through gradio_client on the 2-core EPYC (idle):
    python scripts/loadtest_app.py --checkpoint export/model.onnx    # or a .pt
    -> 0 errors; ONNX Runtime p50 ~172 ms, p95 ~230 ms, 46-47 req/s; torch 25-36 req/s (one
       prediction at a time, so a request mostly waits for those ahead of it;
       docs/BENCHMARKS.md "Serving" and "Export / ONNX").
"""
from __future__ import annotations

import argparse
import base64
import logging
import os
import sys
from pathlib import Path

try:
    from .predictor import (NO_CHECKPOINT_MESSAGE, BACKENDS, ImageError, ModelFileError, Predictor,
                            format_seconds, resolve_checkpoint)
    from .modelmeta import dataset_folders
except ImportError:  # run as a file: `python app/app.py` (the package is installed, so `model`
    # imports), or `python app.py` in a Space folder; either way this file's folder is sys.path[0]
    from predictor import (NO_CHECKPOINT_MESSAGE, BACKENDS, ImageError, ModelFileError, Predictor,
                           format_seconds, resolve_checkpoint)
    from modelmeta import dataset_folders

import gradio as gr

log = logging.getLogger('app')
logging.getLogger('httpx').setLevel(logging.WARNING)  # one line per request otherwise
TOPK = 5
MAX_FILE_SIZE = '50mb'  # uploads above this are refused by Gradio before reaching us
HERE = Path(__file__).resolve().parent
SPACE_EXAMPLES = HERE / 'examples'  # what scripts/export.py --space ships beside app.py
# System fonts only: the default theme fetches Google Fonts, which an offline machine can't reach.
THEME = gr.themes.Soft(font=['ui-sans-serif', 'system-ui', 'sans-serif'],
                       font_mono=['ui-monospace', 'monospace'])


def uploaded_file(payload) -> tuple[str | bytes | None, str]:
    """The image event's raw payload (``preprocess=False``) -> (path or bytes, display name).

    We skip gr.Image's own preprocessing: it opens the file with Pillow first, so a corrupt
    upload would fail inside Gradio with a bare "Error"; ``Predictor`` decodes it instead and
    says what is wrong. Gradio has already moved the upload into its cache and checked it.
    """
    if payload is None:
        return None, ''
    if isinstance(payload, (str, Path)):
        return str(payload), Path(payload).name
    if isinstance(payload, dict):
        if payload.get('path'):
            return payload['path'], payload.get('orig_name') or Path(payload['path']).name
        url = payload.get('url') or ''
        if url.startswith('data:') and ',' in url:  # an inline (base64) image
            try:
                return base64.b64decode(url.split(',', 1)[1], validate=True), 'pasted image'
            except ValueError:
                raise ImageError('pasted image: invalid base64 data') from None
    raise ImageError('the upload carried no file')


def example_dirs(predictor: Predictor | None, root: Path = HERE.parent) -> list[Path]:
    """Where the served model's example images are: beside app.py (a Space), else the converted
    dataset whose classes are the model's (``data_beton/<dataset>/examples``, the converter's)."""
    folders = dataset_folders(root, predictor.class_names) if predictor is not None else []
    return [SPACE_EXAMPLES] + [d / 'examples' for d in folders]


def find_examples(dirs, limit: int = 12) -> list[str]:
    """The PNGs of the first folder in ``dirs`` that has any."""
    files = next((found for d in dirs if (found := sorted(Path(d).glob('*.png')))), [])
    return [str(f) for f in files[:limit]]


def model_panel(predictor: Predictor | None, problem: str | None = None) -> str:
    if predictor is None:
        return f'### Model\n\n**No model loaded.** {problem or NO_CHECKPOINT_MESSAGE}'
    i = predictor.info()
    pct = (lambda v: f'{v:.2%}' if isinstance(v, (int, float)) else 'n/a')
    epochs = f'{i["epoch"]}' + (f' of {i["epochs_planned"]}' if i['epochs_planned'] else '')
    arch = f'{i["arch"]}' + (f' (width {i["width"]})' if i['width'] else '')
    rows = [('Architecture', arch), ('Parameters', f'{i["parameters"]:,}'),
            ('Test top-1', pct(i['test_top1'])), ('Test top-5', pct(i['test_top5'])),
            ('Epochs', epochs), ('Training time', format_seconds(i['train_seconds'])),
            ('Runtime', i['backend']),
            ('Checkpoint', f'`{Path(i["checkpoint"]).name}`' if i['checkpoint'] else 'in memory'),
            ('Created', i['created'] or 'n/a')]
    return '### Model\n\n' + '\n'.join(f'- **{k}:** {v}' for k, v in rows)


def make_classify(predictor: Predictor | None, problem: str | None = None):
    """The event handler: upload -> (label dict, superclass markdown, status markdown).

    Never raises: every failure becomes a message in the page, so the app keeps serving.
    """
    def classify(payload):
        if predictor is None:
            return None, '', f'**No model loaded.** {problem or NO_CHECKPOINT_MESSAGE}'
        name = 'image'
        try:
            source, name = uploaded_file(payload)
            if source is None:  # the image was cleared
                return None, '', ''
            pred = predictor.predict(source, min(TOPK, len(predictor.class_names)), name=name)
        except ImageError as e:
            gr.Warning(str(e))
            return None, '', f'**Could not classify this image.** {e}'
        except Exception as e:  # a bug, not the user's fault: log it, keep serving
            log.exception('prediction failed for %s', name)
            return None, '', f'**Internal error** ({type(e).__name__}); the app is still running.'
        label = {n: p for n, p in pred.classes}
        sup = (f'**Superclass:** {pred.superclass} ({pred.superclass_prob:.1%})'
               if pred.superclass else '')
        status = ' '.join(f'Note: {n}.' for n in pred.notes)
        return label, sup, status
    return classify


def build_app(predictor: Predictor | None, *, problem: str | None = None,
              examples: list[str] | None = None) -> gr.Blocks:
    """The UI around ``predictor`` (``None``: no model; ``problem`` says why)."""
    examples = find_examples(example_dirs(predictor)) if examples is None else examples
    title = f'{predictor.meta.title} classifier' if predictor and predictor.meta.title else 'Image classifier'
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        if predictor is not None:
            s, n = predictor.image_size, len(predictor.class_names)
            arch = predictor.meta.model_config.get('arch', 'model')
            on = f' on {predictor.meta.title}' if predictor.meta.title else ''
            gr.Markdown(f'# {title}\nA {arch} trained{on} ({n} classes of {s}×{s} images). Your '
                        f'image is centre-cropped to a square and shrunk to {s}×{s}, as the '
                        f'training images were.')
        else:
            gr.Markdown(f'# {title}')
            gr.Markdown(f'> **No trained model found.** {problem or NO_CHECKPOINT_MESSAGE}',
                        elem_id='no-model')
        with gr.Row():
            with gr.Column():
                image = gr.Image(type='filepath', image_mode=None, label='Image',
                                 sources=['upload', 'clipboard', 'webcam'], elem_id='image',
                                 height=320)
                if examples:
                    gr.Examples(examples, inputs=image, cache_examples=False,
                                examples_per_page=12, label='Examples (test images)')
            with gr.Column():
                top = gr.Label(num_top_classes=TOPK, label=f'Top-{TOPK} classes', elem_id='top5')
                superclass = gr.Markdown(elem_id='superclass')
                status = gr.Markdown(elem_id='status')
                gr.Markdown(model_panel(predictor, problem), elem_id='model-info')
        # .change covers upload, paste, webcam, examples and clear; one request at a time
        # (the default concurrency limit of 1): the model uses every core for each image.
        # preprocess=False: the handler gets the uploaded file undecoded (see uploaded_file).
        image.change(make_classify(predictor, problem), inputs=image,
                     outputs=[top, superclass, status], api_name='predict', preprocess=False)
    return demo


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description='Serve the trained classifier with Gradio.')
    ap.add_argument('--checkpoint', help='checkpoint (.pt), exported model (.onnx), or model.safetensors + '
                                         'config.json (their folder or either file); default: $MODEL_PATH, '
                                         'else model.onnx, model.safetensors or model.pt beside app.py, '
                                         'else the newest runs/*/best.pt')
    ap.add_argument('--backend', choices=BACKENDS,
                    help='torch or onnx (default: by the file name, .onnx -> onnx)')
    # Spaces set GRADIO_SERVER_NAME=0.0.0.0; an explicit 127.0.0.1 would override it
    ap.add_argument('--host', default=os.environ.get('GRADIO_SERVER_NAME', '127.0.0.1'),
                    help='address to bind (default 127.0.0.1: this machine only)')
    ap.add_argument('--port', type=int, default=int(os.environ.get('GRADIO_SERVER_PORT', 7860)))
    # A server pays the compile time once and then serves ~1.4x faster (p50 6.4-7 ms instead of
    # 8.4-11 ms per image on 2 cores; docs/BENCHMARKS.md); it falls back to eager on failure.
    ap.add_argument('--compile', action=argparse.BooleanOptionalAction,
                    default=os.environ.get('COMPILE_MODEL', '1') != '0',
                    help='torch.compile the model at start-up (5-30 s, default on): ~1.4x faster '
                         'inference; --no-compile or COMPILE_MODEL=0 starts at once')
    return ap.parse_args(argv)


def load_predictor(checkpoint: str | None, *, compile_model: bool = False,
                   backend: str | None = None) -> tuple[Predictor | None, str | None]:
    """(predictor, None), or (None, why not) when no usable model was found implicitly.
    An explicit ``--checkpoint`` that fails raises :class:`ModelFileError`."""
    path = resolve_checkpoint(checkpoint)
    if path is None:
        return None, None
    try:
        return Predictor(path, compile_model=compile_model, backend=backend), None
    except ModelFileError as e:
        if checkpoint:
            raise
        log.warning('%s', e)
        return None, f'The checkpoint could not be loaded: {e}. {NO_CHECKPOINT_MESSAGE}'


def upload_folder_problem() -> str | None:
    """Why Gradio could not keep uploads in its temporary folder (``$GRADIO_TEMP_DIR``, else
    ``<tmp>/gradio``), or None. Checked at start-up: otherwise every upload fails with a
    traceback in the server log and a bare "Error" in the page. (Standard library only: a
    torch-free Space ships no ``model/``.)"""
    import tempfile
    try:
        folder = Path(os.environ.get('GRADIO_TEMP_DIR') or Path(tempfile.gettempdir()) / 'gradio')
    except OSError as e:  # no usable temporary folder at all
        return f'no temporary folder for uploads ({e.strerror or e}); set GRADIO_TEMP_DIR'
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix='.write-test-'):
            pass
    except OSError as e:
        return (f'{folder}: cannot write the temporary folder for uploads ({e.strerror or e}); '
                f'set GRADIO_TEMP_DIR to a writable folder')
    return None


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    args = parse_args(argv)
    if (problem := upload_folder_problem()) is not None:
        print(f'error: {problem}', file=sys.stderr)
        return 2
    try:
        predictor, problem = load_predictor(args.checkpoint, compile_model=args.compile,
                                            backend=args.backend)
    except ModelFileError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if predictor is None:
        log.warning('%s', problem or NO_CHECKPOINT_MESSAGE)
    else:
        log.info('serving %s with %s', predictor.path, predictor.backend.description)
    demo = build_app(predictor, problem=problem)
    demo.queue(max_size=256).launch(server_name=args.host, server_port=args.port,
                                    max_file_size=MAX_FILE_SIZE, theme=THEME, show_error=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
