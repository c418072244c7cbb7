"""Load-testing the Gradio app (used by ``scripts/loadtest_app.py`` and the end-to-end tests):
start it in a subprocess on a free port (:func:`serve_app`), send N predictions at a given
concurrency through ``gradio_client`` (:func:`run_load`).

    from app.loadtest import serve_app, run_load
    with serve_app('runs/rn18/best.pt') as url:
        print(run_load(url, ['cat.png'], n=200, concurrency=8))

Each of ``concurrency`` threads has its own ``gradio_client.Client`` and sends requests back to
back; latency is measured per request on the client (upload + queue + prediction + result).
Not part of a Space (it needs gradio_client). Measured figures: docs/BENCHMARKS.md "Serving".
"""
from __future__ import annotations

import contextlib
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

from model.project import DATA_DIR, PROJECT_ROOT as ROOT
PORT_TAKEN = ('address already in use', 'Cannot find empty port')  # lost a free_port race
ERROR_MARKERS = ('Could not classify', 'Internal error', 'No model loaded')


def free_port(host: str = '127.0.0.1') -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(checkpoint: str | os.PathLike | None, *, host: str = '127.0.0.1',
              port: int | None = None, timeout: float = 120, env: dict | None = None,
              app_file: str | os.PathLike = ROOT / 'app' / 'app.py', args: tuple = (),
              log: list | None = None):
    """Run ``python app/app.py`` in a subprocess; yields its URL once it answers, stops it after.

    ``checkpoint=None`` runs it without ``--checkpoint`` (it then resolves one itself); ``args``
    are more command-line arguments; ``env`` is added to this process's environment (a value
    of None removes the variable). The app's output goes to a log file whose tail is in the
    error if it fails to start, and into ``log`` (a list, if given) when it stops. A free port
    can be taken by another process between :func:`free_port` and the app binding it: then
    the app is started again on another port (3 tries).
    """
    for attempt in range(3):
        with _app_process(checkpoint, host, port or free_port(host), timeout, env, app_file,
                          args, log) as url:
            if url is None and port is None and attempt < 2:
                continue  # the port was taken meanwhile: try another one
            if url is None:
                raise RuntimeError('app could not bind a port')
            yield url
            return


@contextlib.contextmanager
def _app_process(checkpoint, host, port, timeout, env, app_file, args, log):
    """Yields the app's URL, or None if it exited because its port was taken."""
    cmd = [sys.executable, str(app_file), '--host', host, '--port', str(port), *map(str, args)]
    if checkpoint is not None:
        cmd += ['--checkpoint', str(checkpoint)]
    url = f'http://{host}:{port}'
    with tempfile.TemporaryFile('w+') as logf:
        full_env = {**os.environ, 'GRADIO_ANALYTICS_ENABLED': 'False', **(env or {})}
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                env={k: v for k, v in full_env.items() if v is not None})
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    logf.seek(0)
                    output = logf.read()
                    if any(m in output for m in PORT_TAKEN):
                        yield None
                        return
                    raise RuntimeError(f'app exited with code {proc.returncode}:\n{output[-3000:]}')
                with contextlib.suppress(OSError), urllib.request.urlopen(url + '/', timeout=2) as r:
                    if r.status == 200:
                        break
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
            if log is not None:
                logf.seek(0)
                log.append(logf.read())


def launch_in_thread(demo, host: str = '127.0.0.1') -> str:
    """``demo.launch`` in this process on a free port (retrying if another process takes it
    first); returns the URL. Stop it with ``demo.close()``."""
    for attempt in range(3):
        port = free_port(host)
        try:
            demo.queue().launch(server_name=host, server_port=port, prevent_thread_lock=True,
                                quiet=True)
            return f'http://{host}:{port}'
        except OSError:  # "Cannot find empty port": lost the race, try another
            if attempt == 2:
                raise


def default_images(out_dir: Path, count: int = 8) -> list[str]:
    """A converted dataset's examples (data_beton/*/examples/*.png) when the converter wrote some,
    else synthetic 32x32 PNGs (the app resizes any image to its model's size)."""
    found = next((f for d in sorted((ROOT / DATA_DIR).glob('*/examples'))
                  if (f := sorted(d.glob('*.png')))), [])
    if found:
        return [str(p) for p in found]
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f'synthetic_{i}.png' for i in range(count)]
    for p in paths:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)
    return [str(p) for p in paths]


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
