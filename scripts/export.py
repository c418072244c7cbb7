"""Export a trained checkpoint for serving: an inference-only checkpoint, an ONNX model verified
against torch, a ready-to-push Hugging Face Space folder.

    python scripts/export.py runs/<run>/best.pt --out export/                    # model.pt
    python scripts/export.py runs/<run>/best.pt --out export/ --onnx             # + model.onnx
    python scripts/export.py runs/<run>/best.pt --out my-space/ --onnx --space   # torch-free Space
    cd my-space && python app.py                                                 # try it

A bad checkpoint, an unwritable --out or an ONNX model that disagrees with torch ends in one
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
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from app.export import export  # after parsing: --help stays instant
    export(args.checkpoint, args.out, onnx=args.onnx, fp16=args.fp16, space=args.space)
    return 0


if __name__ == '__main__':
    run(main)
