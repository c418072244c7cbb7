"""Re-measure the acceptance figures on this machine and compare each with its bar.

    make check                                  # = python scripts/check_figures.py (after make data)
    CIFAR_LOADER_DELAY_MS=20 make check         # a deliberately slowed FFCV loader: must fail
    python scripts/check_figures.py --loader-delay-ms 20    # the same

Figures (bars from docs/BENCHMARKS.md, measured side by side in one run, a few minutes on 2 cores):

- loader speed-up: FFCV vs torchvision's classic per-image transforms, the 50,000 training
  images, same batch, augmentation and workers: >= 10x;
- data wait: the share of a full epoch (FFCV loader + the trainer's step) spent waiting for the
  next batch: <= 5%;
- conversion of the real archive (write_datasets.py, a subprocess): <= 15 s;
- predictor p50 for one 32x32 image, in process, the served model: the ONNX Runtime export
  (scripts/export.py --onnx) <= 10 ms; torch compiled and eager are printed beside it.

Exits 1 when a figure misses its bar, printing the figure beside the bar; not part of
``make test`` (timings are noisy on shared machines).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _cli import ROOT, run
from model.errors import UserError

SHARED_ARCHIVE = ROOT.parent / 'shared' / 'data' / 'cifar-100-python.tar.gz'
# (name, unit, bar, 'min' | 'max'): a figure passes when >= bar (min) or <= bar (max)
BARS = {'loader_speedup': ('x', 10.0, 'min'), 'data_wait_percent': ('%', 5.0, 'max'),
        'conversion_s': ('s', 15.0, 'max'), 'predictor_onnx_p50_ms': ('ms', 10.0, 'max')}


def predictor_p50(data_dir: Path, tmp: Path, n: int) -> dict:
    """p50 of ``predict.py --benchmark`` for an untrained full-width ResNet-18 (the same compute as
    a trained one): ONNX Runtime export, torch compiled, torch eager."""
    import torch
    from ffcv_pipeline.datasets import get_dataset
    from model import build_model
    from model.checkpoint import atomic_save, make_checkpoint
    torch.manual_seed(0)
    ckpt = tmp / 'rn18.pt'
    ds = get_dataset('cifar100')  # the headline's dataset
    model_config = {'arch': 'resnet18', 'num_classes': ds.num_classes, 'width': 64}
    atomic_save(make_checkpoint(build_model(model_config), model_config=model_config,
                                dataset=ds.to_dict()), ckpt)
    image = next(iter(sorted((data_dir / 'examples').glob('*.png'))), None)
    if image is None:
        raise UserError(f'{data_dir}/examples: no example images; run `make data` first')

    def cli(*args) -> str:
        r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f'{" ".join(map(str, args[:2]))} failed: {r.stderr.strip()[-500:]}')
        return r.stdout
    cli('scripts/export.py', ckpt, '--out', tmp / 'onnx', '--onnx')
    out = {}
    for name, model, extra in (('onnx', tmp / 'onnx' / 'model.onnx', []), ('torch_compiled', ckpt, ['--compile']),
                               ('torch_eager', ckpt, [])):
        res = json.loads(cli('scripts/predict.py', image, '--checkpoint', model, '--benchmark', n, '--json', *extra))
        out[name] = res['p50_ms']
    return out


def measure(args) -> dict:
    from bench.benchmark import Bench, Settings, bench_conversion
    from ffcv_pipeline.writer import split_files
    overrides = [f'data.{k}_path={v}' for k, v in split_files(args.data_dir).items()]
    b = Bench(Settings(config='rn18.yaml', overrides=overrides, device='cpu', epochs=args.epochs,
                       ffcv_delay_s=args.loader_delay_ms / 1000))
    figures = {}
    print('loaders: FFCV and classic torchvision, full training set ...', flush=True)
    ffcv, classic = b.loader('ffcv'), b.loader('classic')
    figures['loader_speedup'] = round(ffcv['images_per_s_median'] / classic['images_per_s_median'], 2)
    print('full epoch: FFCV loader + the trainer\'s step ...', flush=True)
    figures['data_wait_percent'] = round(100 * b.full_epoch('ffcv')['data_wait_fraction'], 3)
    archive = next((Path(a) for a in (args.archive, Path(args.data_dir) / 'cifar-100-python.tar.gz',
                                      SHARED_ARCHIVE) if a and Path(a).is_file()), None)
    if archive is not None:
        print(f'conversion of {archive} ...', flush=True)
        figures['conversion_s'] = bench_conversion(archive)['seconds']
    print('predictor latency: ONNX Runtime, torch compiled, torch eager ...', flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        p50 = predictor_p50(Path(args.data_dir), Path(tmp), args.latency_n)
    figures.update({f'predictor_{k}_p50_ms': v for k, v in p50.items()})
    figures['_details'] = {'ffcv_loader': ffcv, 'classic_loader': classic, 'archive': str(archive)}
    return figures


def verdicts(figures: dict) -> list[tuple[str, str, str, str]]:
    """(figure, measured, bar, verdict) rows; verdict 'ok', 'FAIL', 'not measured' or 'info'."""
    rows = []
    for name, value in figures.items():
        if name.startswith('_'):
            continue
        if name not in BARS:
            rows.append((name, f'{value}{" ms" if name.endswith("_ms") else ""}', '', 'info'))
            continue
        unit, bar, kind = BARS[name]
        ok = value >= bar if kind == 'min' else value <= bar
        rows.append((name, f'{value} {unit}', f'{">=" if kind == "min" else "<="} {bar} {unit}', 'ok' if ok else 'FAIL'))
    rows += [(name, '-', f'{BARS[name][1]} {BARS[name][0]}', 'not measured') for name in BARS if name not in figures]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data-dir', default=str(ROOT / 'data_beton' / 'cifar100'),
                   help='converted data (default: %(default)s)')
    p.add_argument('--archive', help=f'CIFAR-100 archive for the conversion timing (default: the one in '
                   f'--data-dir, else {SHARED_ARCHIVE})')
    p.add_argument('--epochs', type=int, default=2, help='timed loader epochs after the warm-up (default 2)')
    p.add_argument('--latency-n', type=int, default=200, help='predictions per latency figure (default 200)')
    p.add_argument('--json', help='also write the figures here')
    # the slowed loader is this script's option, read from the environment here (the product's
    # loaders carry no such hook) so that `CIFAR_LOADER_DELAY_MS=20 make check` still shows it
    p.add_argument('--loader-delay-ms', type=float, default=float(os.environ.get('CIFAR_LOADER_DELAY_MS') or 0),
                   help='sleep this long per FFCV training batch: a deliberately slow loader that must '
                        'fail the bars (default: $CIFAR_LOADER_DELAY_MS or 0)')
    args = p.parse_args(argv)
    if not (Path(args.data_dir) / 'manifest.json').is_file():
        raise UserError(f'{args.data_dir}/manifest.json: no such file; run `make data` first')
    figures = measure(args)
    rows = verdicts(figures)
    width = [max(len(r[i]) for r in rows + [('figure', 'measured', 'bar', 'verdict')]) for i in range(4)]
    for r in [('figure', 'measured', 'bar', 'verdict')] + rows:
        print('  '.join(c.ljust(w) for c, w in zip(r, width)))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + '\n')
    failed = [r for r in rows if r[3] == 'FAIL']
    for name, value, bar, _ in failed:
        print(f'FAILED: {name} = {value}, bar {bar}', file=sys.stderr)
    missing = [r[0] for r in rows if r[3] == 'not measured']
    if missing:
        print(f'note: not measured here: {", ".join(missing)} (no CIFAR-100 archive found; --archive PATH)')
    return 1 if failed else 0


if __name__ == '__main__':
    run(main)
