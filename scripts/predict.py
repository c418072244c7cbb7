"""Classify images with a trained checkpoint or an exported model, from the command line.

    python scripts/predict.py cat.jpg dog.png --checkpoint runs/rn18/best.pt --topk 5
    python scripts/predict.py cat.jpg --checkpoint export/model.onnx     # ONNX Runtime, no torch
    python scripts/predict.py cat.jpg --checkpoint model-repo/           # model.safetensors + config.json
    python scripts/predict.py cat.jpg --json                             # machine-readable
    python scripts/predict.py cat.png --benchmark 200 [--compile]        # in-process latency

Without ``--checkpoint`` the model is found as the app finds it: ``$MODEL_PATH``, else the
newest ``runs/*/best.pt``. ``.onnx`` files run on ONNX Runtime, others on torch (``--backend``
overrides). Any size and mode of image works (``app/images.py`` says how it is prepared).

Errors: a bad or missing checkpoint is one ``error: ...`` line and exit code 2. With several
images, each good one is classified and printed, each bad one gets its own ``error: ...`` line
on stderr (and an entry under ``errors`` with ``--json``), and the exit code is 2 if any failed.
The logic lives in ``app/predictor.py``; this file only parses and prints.
"""
from __future__ import annotations

import argparse
import json
import sys

from _cli import run
from model.errors import UserError

from app.predictor import (BACKENDS, NO_CHECKPOINT_MESSAGE, ImageError, ModelFileError, Predictor,
                           format_seconds, latency, resolve_checkpoint)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('images', nargs='+', metavar='IMG', help='image files (any format Pillow reads)')
    ap.add_argument('--checkpoint', help='checkpoint (.pt), exported model (.onnx), or model.safetensors + '
                                         'config.json (their folder or either file); default: '
                                         '$MODEL_PATH, else the newest runs/*/best.pt')
    ap.add_argument('--backend', choices=BACKENDS,
                    help='torch or onnx (default: by the file name, .onnx -> onnx)')
    ap.add_argument('--topk', type=int, default=None,
                    help='classes to show per image (default 5, or all of a dataset with fewer)')
    ap.add_argument('--json', action='store_true', help='print JSON instead of a table')
    # Off here (a one-shot command would pay 5-30 s to save ~2 ms); on by default in the app.
    ap.add_argument('--compile', action=argparse.BooleanOptionalAction, default=False,
                    help='torch.compile the model first (~1.4x faster per image; 5-30 s to '
                         'start; default off)')
    ap.add_argument('--threads', type=int, metavar='N',
                    help='intra-op threads for the model (default: one per core)')
    ap.add_argument('--benchmark', type=int, metavar='N', default=0,
                    help='time N single-image predictions of the first IMG and print p50/p95')
    return ap.parse_args(argv)


def print_table(preds) -> None:
    width = max(len(n) for p in preds for n, _ in p.classes)
    for p in preds:
        sup = f'   superclass: {p.superclass} ({p.superclass_prob:.1%})' if p.superclass else ''
        print(f'{p.source}{sup}')
        for rank, (name, prob) in enumerate(p.classes, 1):
            print(f'  {rank:>2}. {name:<{width}}  {prob:7.2%}')
        for note in p.notes:
            print(f'  note: {note}')


def main(argv=None) -> int:
    args = parse_args(argv)
    path = resolve_checkpoint(args.checkpoint)
    if path is None:
        raise ModelFileError(NO_CHECKPOINT_MESSAGE)
    predictor = Predictor(path, backend=args.backend, compile_model=args.compile,
                          num_threads=args.threads)
    if args.topk is None:
        args.topk = min(5, len(predictor.class_names))
    if not 1 <= args.topk <= len(predictor.class_names):  # the user's option: one line
        raise UserError(f'--topk must be between 1 and {len(predictor.class_names)}, got {args.topk}')
    if args.benchmark:
        result = latency(predictor, args.images[0], args.benchmark)
        print(json.dumps(result) if args.json else
              f'{args.images[0]}: {result["n"]} predictions, p50 {result["p50_ms"]} ms, '
              f'p95 {result["p95_ms"]} ms, min {result["min_ms"]} ms')
        return 0
    preds, errors = [], []
    for image in args.images:  # one at a time: a bad image must not hide the good ones
        try:
            preds.append(predictor.predict(image, args.topk))
        except ImageError as e:
            errors.append({'image': image, 'error': str(e)})
            print(f'error: {e}', file=sys.stderr)
    if args.json:
        print(json.dumps({'checkpoint': str(path), 'backend': predictor.backend.name,
                          'predictions': [p.to_dict() for p in preds], 'errors': errors}, indent=2))
    elif preds:
        info = predictor.info()
        top1 = f'test top-1 {info["test_top1"]:.2%}, ' if info['test_top1'] is not None else ''
        print(f'# {path} ({info["arch"]}, {top1}{info["epoch"]} epochs, '
              f'trained {format_seconds(info["train_seconds"])}; {info["backend"]})\n')
        print_table(preds)
    return 2 if errors else 0


if __name__ == '__main__':
    run(main)
