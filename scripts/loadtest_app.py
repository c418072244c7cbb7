"""Load-test the Gradio app through gradio_client: N predictions at a given concurrency.

    python scripts/loadtest_app.py --checkpoint runs/rn18/best.pt      # starts app/app.py itself
    python scripts/loadtest_app.py --checkpoint export/model.onnx      # the ONNX Runtime app
    python scripts/loadtest_app.py --url http://127.0.0.1:7860 -n 200 --concurrency 8 --out lt.json

Prints errors, p50/p95 and throughput; ``--out`` writes them as JSON. Exit code 1 if any
request failed. Images: ``--images``, else data_beton/examples/*.png, else synthetic 32x32 PNGs.
The logic lives in ``app/loadtest.py``. Measured on the 2-core CPU, idle, ResNet-18 width 64,
200 requests at concurrency 8: 0 errors, ~35 req/s with torch eager (docs/BENCHMARKS.md
"Serving" has torch and ONNX Runtime side by side).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

from _cli import run
from model.errors import UserError

from app.loadtest import default_images, run_load, serve_app
from model.fileio import atomic_write_text


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--url', help='a running app; default: start app/app.py on a free port')
    ap.add_argument('--checkpoint', help='checkpoint (.pt) or model (.onnx) for the app this '
                                         'script starts')
    ap.add_argument('--compile', action=argparse.BooleanOptionalAction,
                    help="passed on to the app it starts (default: the app's own, compiled "
                         "unless COMPILE_MODEL=0)")
    ap.add_argument('-n', type=int, default=200, help='timed requests (default 200)')
    ap.add_argument('--concurrency', type=int, default=8, help='client threads (default 8)')
    ap.add_argument('--images', nargs='+', help='image files to send (cycled)')
    ap.add_argument('--out', help='write the result as JSON here')
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.n < 1 or args.concurrency < 1:
        raise UserError('-n and --concurrency must be at least 1')
    with tempfile.TemporaryDirectory() as tmp:
        images = args.images or default_images(Path(tmp))
        for p in images:
            if not Path(p).is_file():
                raise UserError(f'{p}: no such image')
        flags = () if args.compile is None else ('--compile',) if args.compile else ('--no-compile',)
        with (contextlib.nullcontext(args.url) if args.url
              else serve_app(args.checkpoint, args=flags)) as url:
            result = run_load(url, images, args.n, args.concurrency)
    print(f'{result["n"]} requests at concurrency {result["concurrency"]}: '
          f'{result["errors"]} errors, p50 {result["p50_ms"]} ms, p95 {result["p95_ms"]} ms, '
          f'max {result["max_ms"]} ms, {result["throughput_rps"]} req/s')
    for e in result['error_examples']:
        print(f'  error: {e}', file=sys.stderr)
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2) + '\n')
    return 1 if result['errors'] else 0


if __name__ == '__main__':
    run(main)
