"""Load-test the Gradio app through gradio_client: N predictions at a given concurrency.

    python scripts/loadtest_app.py --checkpoint runs/rn18/best.pt      # starts app/app.py itself
    python scripts/loadtest_app.py --url http://127.0.0.1:7860 -n 200 --concurrency 8 --out lt.json

Each of ``--concurrency`` threads has its own ``gradio_client.Client`` and sends requests
back to back; latency is measured per request on the client (upload + queue + prediction +
result). Prints errors, p50/p95 and throughput; ``--out`` writes them as JSON. Exit code 1 if
any request failed. Images: ``--images``, else data_beton/examples/*.png, else synthetic
32x32 PNGs. Measured on the 2-core CPU, idle, ResNet-18 width 64, 200 requests at concurrency 8:
0 errors, p50 ~215 ms, p95 ~300-330 ms, ~35 req/s (docs/BENCHMARKS.md "Serving").
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ERROR_MARKERS = ('Could not classify', 'Internal error', 'No model loaded')


def free_port(host: str = '127.0.0.1') -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(checkpoint: str | os.PathLike | None, *, host: str = '127.0.0.1',
              port: int | None = None, timeout: float = 120, env: dict | None = None,
              app_file: str | os.PathLike = ROOT / 'app' / 'app.py'):
    """Run ``python app/app.py`` in a subprocess; yields its URL once it answers, stops it after.

    ``checkpoint=None`` runs it without ``--checkpoint`` (it then resolves one itself).
    The app's output goes to a log file whose tail is in the error if it fails to start.
    """
    port = port or free_port(host)
    app_file = Path(app_file)
    cmd = [sys.executable, str(app_file), '--host', host, '--port', str(port)]
    if checkpoint is not None:
        cmd += ['--checkpoint', str(checkpoint)]
    url = f'http://{host}:{port}'
    with tempfile.TemporaryFile('w+') as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                env={**os.environ, 'GRADIO_ANALYTICS_ENABLED': 'False',
                                     **(env or {})})
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    logf.seek(0)
                    raise RuntimeError(f'app exited with code {proc.returncode}:\n'
                                       f'{logf.read()[-3000:]}')
                try:
                    with urllib.request.urlopen(url + '/', timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f'app did not answer at {url} within {timeout:.0f} s')
                time.sleep(0.25)
            yield url
        finally:
            proc.terminate()  # our own child, by its handle
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def default_images(out_dir: Path, count: int = 8) -> list[str]:
    """data_beton/examples/*.png when the converter wrote them, else synthetic 32x32 PNGs."""
    found = sorted((ROOT / 'data_beton' / 'examples').glob('*.png'))
    if found:
        return [str(p) for p in found]
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        p = out_dir / f'synthetic_{i}.png'
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _failure(result) -> str | None:
    """None if ``result`` (label, superclass, status) is a successful prediction."""
    label, _sup, status = result
    if any(m in (status or '') for m in ERROR_MARKERS):
        return status
    if not isinstance(label, dict) or len(label.get('confidences') or []) == 0:
        return f'no classes in the result: {label!r}'
    return None


def run_load(url: str, images: list[str], n: int = 200, concurrency: int = 8,
             warmup: int = 8) -> dict:
    """Send ``n`` predictions (cycling through ``images``) from ``concurrency`` threads."""
    from gradio_client import Client, handle_file

    # gradio_client makes a new httpx client per HTTP call, and each one loads the CA bundle
    # into a fresh SSL context: ~140 ms of CPU per prediction, 15x what the server spends, on
    # the same 2 cores. A shared, ready SSLContext (still verifying) takes that to ~7 ms.
    ssl_ctx = ssl.create_default_context()
    clients: queue.Queue = queue.Queue()
    for _ in range(concurrency):  # connect first: Client() fetches the app's config
        clients.put(Client(url, verbose=False, download_files=False, analytics_enabled=False,
                           ssl_verify=ssl_ctx))
    local = threading.local()

    def init():
        local.client = clients.get()

    def one(i: int):
        t = time.perf_counter()
        try:
            res = local.client.predict(handle_file(images[i % len(images)]), api_name='/predict')
            err = _failure(res)
        except Exception as e:  # a failed request is a result here, not a crash
            err = f'{type(e).__name__}: {e}'
        return (time.perf_counter() - t) * 1e3, err

    with ThreadPoolExecutor(concurrency, initializer=init) as pool:
        list(pool.map(one, range(warmup)))  # uploads, queue and model warm-up, not timed
        t0 = time.perf_counter()
        results = list(pool.map(one, range(n)))
        wall = time.perf_counter() - t0
    while not clients.empty():
        clients.get().close()
    lat = sorted(ms for ms, _ in results)
    errors = [e for _, e in results if e]
    pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 1))
    return {'url': url, 'n': n, 'concurrency': concurrency, 'errors': len(errors),
            'error_examples': errors[:5], 'p50_ms': pct(0.50), 'p95_ms': pct(0.95),
            'max_ms': round(lat[-1], 1), 'mean_ms': round(sum(lat) / len(lat), 1),
            'throughput_rps': round(n / wall, 1), 'wall_s': round(wall, 2),
            'images': [Path(p).name for p in images]}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--url', help='a running app; default: start app/app.py on a free port')
    ap.add_argument('--checkpoint', help='checkpoint for the app this script starts')
    ap.add_argument('-n', type=int, default=200, help='timed requests (default 200)')
    ap.add_argument('--concurrency', type=int, default=8, help='client threads (default 8)')
    ap.add_argument('--images', nargs='+', help='image files to send (cycled)')
    ap.add_argument('--out', help='write the result as JSON here')
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.n < 1 or args.concurrency < 1:
        raise ValueError('-n and --concurrency must be at least 1')
    with tempfile.TemporaryDirectory() as tmp:
        images = args.images or default_images(Path(tmp))
        for p in images:
            if not Path(p).is_file():
                raise FileNotFoundError(f'{p}: no such image')
        with (contextlib.nullcontext(args.url) if args.url else serve_app(args.checkpoint)) as url:
            result = run_load(url, images, args.n, args.concurrency)
    print(f'{result["n"]} requests at concurrency {result["concurrency"]}: '
          f'{result["errors"]} errors, p50 {result["p50_ms"]} ms, p95 {result["p95_ms"]} ms, '
          f'max {result["max_ms"]} ms, {result["throughput_rps"]} req/s')
    for e in result['error_examples']:
        print(f'  error: {e}', file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + '\n')
    return 1 if result['errors'] else 0


if __name__ == '__main__':
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _cli import run
    run(main)
