"""Export a trained checkpoint for serving: an inference-only checkpoint, an ONNX model verified
against torch, a ready-to-push Hugging Face Space folder.

    python scripts/export.py runs/<run>/best.pt --out export/                    # model.pt
    python scripts/export.py runs/<run>/best.pt --out export/ --onnx             # + model.onnx
    python scripts/export.py runs/<run>/best.pt --out my-space/ --onnx --space   # torch-free Space
    python scripts/export.py runs/<run>/best.pt --out my-space/ --int8 --space   # ~3x faster, checked
    cd my-space && python app.py                                                 # try it

A bad checkpoint, an unwritable --out, an ONNX model that disagrees with torch or an int8 model
that loses more than a point of test top-1 ends in one
``error: ...`` line and exit code 2, with nothing written. The logic lives in ``app/export.py``.
"""
from __future__ import annotations

import argparse

from _cli import run


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('checkpoint', help='a checkpoint written by scripts/train.py (e.g. runs/<run>/best.pt)')
    ap.add_argument('--out', required=True, help='output folder (made, or updated file by file)')
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
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from app.export import export  # after parsing: --help stays instant
    export(args.checkpoint, args.out, onnx=args.onnx, fp16=args.fp16, space=args.space,
           int8=args.int8, force=args.force, **({'data_dir': args.data_dir} if args.data_dir else {}))
    return 0


if __name__ == '__main__':
    run(main)
