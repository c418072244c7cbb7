"""Speed of `write_datasets.py --image-folder` (issue 24): images/s on N generated JPEGs, beside a
single-process Pillow loop over the same files, in one run (ratios; absolute times drift).

    python docs/bench/image_folder_speed.py [--images 10000] [--size 64] [--rounds 2]

Prints one JSON object per round and a summary: the converter as a user runs it (a subprocess:
imports, decoding with the default workers, .npy + .beton files, examples, manifest), its decode
stage alone (``ffcv_pipeline.folder.decode_images``, default workers and 1 worker), and a plain
Pillow loop (``Image.open(p).convert('RGB')``, resized when not already that size, to a numpy
array) in this process. The generated folder is kept in /tmp between runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def generate(folder: Path, n: int, size: int, classes: int = 10) -> list[Path]:
    from PIL import Image
    files = sorted(folder.rglob('*.jpg'))
    if len(files) == n:
        return files
    rng = np.random.default_rng(0)
    for c in range(classes):
        (folder / f'class_{c:02d}').mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % classes
        img = np.clip(rng.normal(40 + 20 * c, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f'class_{c:02d}' / f'{i:06d}.jpg', quality=90)
    return sorted(folder.rglob('*.jpg'))


def pillow_loop(files: list[Path], size: int) -> float:
    from PIL import Image
    t = time.perf_counter()
    for p in files:
        with Image.open(p) as img:
            img = img.convert('RGB')
            if img.size != (size, size):
                img = img.resize((size, size))
            np.asarray(img)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument('--images', type=int, default=10_000)
    ap.add_argument('--size', type=int, default=64)
    ap.add_argument('--rounds', type=int, default=2)
    ap.add_argument('--folder', default=f'/tmp/image_folder_bench_{os.getuid()}')
    args = ap.parse_args()
    from ffcv_pipeline.folder import decode_images, usable_cores
    folder = Path(args.folder) / 'src'
    files = generate(folder, args.images, args.size)
    n = len(files)
    rows = []
    for r in range(args.rounds):
        row = {'round': r + 1, 'images': n, 'cores': usable_cores()}
        t = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / 'scripts' / 'write_datasets.py'), '--image-folder', str(folder),
                        '--size', str(args.size), '--out', str(Path(args.folder) / 'out'), '--force', '--quiet'],
                       check=True, capture_output=True)
        row['converter_s'] = round(time.perf_counter() - t, 2)
        for workers in (usable_cores(), 1):
            t = time.perf_counter()
            decode_images(files, args.size, workers=workers, progress=False, desc='', on_failure=print)
            row[f'decode_{workers}w_s'] = round(time.perf_counter() - t, 2)
        row['pillow_loop_s'] = round(pillow_loop(files, args.size), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    best = {k: min(r[k] for r in rows) for k in rows[0] if k.endswith('_s')}
    rate = {k.replace('_s', '_img_per_s'): round(n / v) for k, v in best.items()}
    print(json.dumps({'best_of': args.rounds, **best, **rate,
                      'converter_vs_pillow_loop': round(best['pillow_loop_s'] / best['converter_s'], 2),
                      'decode_vs_pillow_loop': round(best['pillow_loop_s'] / best[f'decode_{usable_cores()}w_s'], 2)}))


if __name__ == '__main__':
    main()
