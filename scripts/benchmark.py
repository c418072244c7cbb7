"""Throughput, side by side on this machine: FFCV vs torchvision loader, model step, full epoch,
conversion. Prints a table, writes JSON + a PNG bar chart.

    python scripts/benchmark.py                      # needs data_beton/ (scripts/write_datasets.py)
    python scripts/benchmark.py --tiny --out /tmp/b  # seconds, for tests

Measured figures and the command live in docs/BENCHMARKS.md.
"""
import argparse
import json
from pathlib import Path

from _cli import ROOT, run

SHARED_ARCHIVE = ROOT.parent / 'shared' / 'data' / 'cifar-100-python.tar.gz'


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--train-beton', default=str(ROOT / 'data_beton' / 'cifar100_train.beton'))
    p.add_argument('--archive', default=None, help='CIFAR-100 archive to time the conversion '
                   f'(default: data_beton/cifar-100-python.tar.gz or {SHARED_ARCHIVE} if present)')
    p.add_argument('--batch-size', type=int, default=512)
    p.add_argument('--workers', type=int, default=0, help='loader workers (default: all cores)')
    p.add_argument('--epochs', type=int, default=3, help='steady-state loader epochs')
    p.add_argument('--device', default='auto')
    p.add_argument('--tiny', action='store_true', help='a few batches of everything (for tests)')
    p.add_argument('--out', default=str(ROOT / 'bench_out'), help='folder for benchmark.json/.png')
    args = p.parse_args()

    from training.benchmark import Settings, format_table, plot, run_benchmark
    beton = Path(args.train_beton)
    if not beton.is_file():
        raise FileNotFoundError(f'{beton}: no such .beton file; run `python scripts/write_datasets.py` first')
    archive = args.archive
    if archive is None:
        for cand in (ROOT / 'data_beton' / 'cifar-100-python.tar.gz', SHARED_ARCHIVE):
            if cand.is_file():
                archive = cand
                break
    s = Settings(train_beton=beton, batch_size=args.batch_size, workers=args.workers,
                 loader_epochs=args.epochs, archive=None if args.tiny else archive, device=args.device)
    if args.tiny:
        s.batch_size, s.loader_epochs, s.loader_images = 64, 2, 512
        s.model_batch, s.model_steps, s.model_width, s.epoch_images = 16, 2, 8, 64
    res = run_benchmark(s, compare_ops=not args.tiny)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'benchmark.json').write_text(json.dumps(res, indent=2) + '\n')
    plot(res, out / 'benchmark.png')
    print(format_table(res))
    print(f'wrote {out / "benchmark.json"} and {out / "benchmark.png"}')
    return 0


if __name__ == '__main__':
    run(main)
