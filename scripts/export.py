"""Export a trained checkpoint for serving: an inference-only checkpoint, an ONNX model verified
against torch, a ready-to-push Hugging Face Space folder.

    python scripts/export.py runs/<run>/best.pt --out export/                    # model.pt
    python scripts/export.py runs/<run>/best.pt --out export/ --onnx             # + model.onnx
    python scripts/export.py runs/<run>/best.pt --out my-space/ --onnx --space   # torch-free Space
    python scripts/export.py runs/<run>/best.pt --out my-space/ --int8 --space   # ~3x faster, checked
    cd my-space && python app.py                                                 # try it
    python scripts/export.py runs/<run>/best.pt --push-to-hub USER/NAME          # the Space, on the Hub
    python scripts/export.py runs/<run>/best.pt --hub-model USER/NAME            # a model repository
    python scripts/export.py export/model-repo --out export/ --onnx              # from safetensors + config.json

--push-to-hub writes the Space folder (--out, default dist/hub/spaces/USER/NAME; a torch-free
ONNX app unless --space-backend torch) and uploads it; --hub-model writes model.safetensors,
config.json, model.onnx and a model card (--model-out, default dist/hub/models/USER/NAME) and
uploads them (app/hub.py). Log in first (`hf auth login`, or HF_TOKEN); HF_ENDPOINT names
another Hub.

A bad checkpoint (or one whose weights do not fit its metadata), an unwritable --out, an ONNX
model that disagrees with torch or an int8 model that loses more than a point of test top-1 ends
in one ``error: ...`` line and exit code 2, with nothing written; no token, a rejected one or an
unreachable Hub ends in one line too, the written folders left in place. The logic lives in
``app/export.py`` and ``app/hub.py``.
"""
from __future__ import annotations

import argparse

from _cli import run


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('checkpoint', help='a checkpoint written by scripts/train.py (e.g. runs/<run>/best.pt), '
                                       'or model.safetensors + config.json (their folder or either file)')
    ap.add_argument('--out', help='output folder (made, or updated file by file); with --push-to-hub the '
                                  'Space folder (default dist/hub/spaces/USER/NAME)')
    ap.add_argument('--onnx', action='store_true',
                    help='also write model.onnx, verified against torch on real test images')
    ap.add_argument('--fp16', action='store_true', help='store the weights as float16 (half the size)')
    ap.add_argument('--space', action='store_true',
                    help='make --out a Hugging Face Space folder (runs with `python app.py`; '
                         'with --onnx it needs no torch)')
    ap.add_argument('--int8', action='store_true',
                    help='model.onnx quantized to int8 (implies --onnx): ~3x faster on a CPU; calibrated '
                         'on training images, kept only if test top-1 drops by at most 1 point')
    ap.add_argument('--force', action='store_true',
                    help='replace files in --out that no earlier export wrote (default: refuse, naming them)')
    ap.add_argument('--data-dir', help="converted data for --int8 (the model's dataset's .npy arrays; "
                                       "default: the data_beton/<dataset>/ with the model's classes)")
    hub = ap.add_argument_group('Hugging Face Hub (log in first: `hf auth login`, or set HF_TOKEN)')
    hub.add_argument('--push-to-hub', metavar='USER/NAME',
                     help='write the Space folder (--out), then create or update the Gradio Space USER/NAME')
    hub.add_argument('--hub-model', metavar='USER/NAME',
                     help='write a model repository (model.safetensors, config.json, model.onnx, model card) '
                          'to --model-out, then create or update USER/NAME')
    hub.add_argument('--model-out', help='the model repository folder (default dist/hub/models/USER/NAME)')
    hub.add_argument('--space-backend', choices=('onnx', 'torch'), default='onnx',
                     help='what the pushed Space runs on (default onnx: no torch in the Space)')
    hub.add_argument('--private', action='store_true', help='create the repositories private (if they are new)')
    args = ap.parse_args(argv)
    if not args.out and not (args.push_to_hub or args.hub_model):
        ap.error('--out is required (unless --push-to-hub or --hub-model)')
    if args.out and args.hub_model and not args.push_to_hub:
        ap.error('--out is the Space folder of --push-to-hub; the model repository goes to --model-out')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    options = {'data_dir': args.data_dir} if args.data_dir else {}
    if args.push_to_hub or args.hub_model:
        from app.hub import publish  # after parsing: --help stays instant
        publish(args.checkpoint, space=args.push_to_hub, model=args.hub_model, out=args.out,
                model_out=args.model_out, onnx=args.space_backend == 'onnx' or args.onnx, fp16=args.fp16,
                int8=args.int8, private=args.private, force=args.force, **options)
        return 0
    from app.export import export
    export(args.checkpoint, args.out, onnx=args.onnx, fp16=args.fp16, space=args.space,
           int8=args.int8, force=args.force, **options)
    return 0


if __name__ == '__main__':
    run(main)
