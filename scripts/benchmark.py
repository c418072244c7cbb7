"""Throughput, side by side on this machine: loaders (FFCV, the ffcv-free torchvision path, the
classic per-image torchvision transforms), the trainer's step, full epochs, conversion. Prints a
table, writes JSON + a PNG bar chart.

    python scripts/benchmark.py                      # needs data_beton/ (scripts/write_datasets.py)
    python scripts/benchmark.py --loaders ffcv,torchvision --epochs 1
    python scripts/benchmark.py --tiny --out /tmp/b  # seconds, for tests

Measured figures and the command live in docs/BENCHMARKS.md.
"""
import argparse
import json

from _cli import ROOT, run
from model.errors import UserError

SHARED_ARCHIVE = ROOT.parent / 'shared' / 'data' / 'cifar-100-python.tar.gz'


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--config', default='rn18.yaml', help='training config giving the batch size, '
                   'augmentation and model (default: %(default)s)')
    p.add_argument('--data-dir', help="folder with the .beton files and .npy arrays (default: the "
                   "config's, data_beton/)")
    p.add_argument('--archive', default=None, help='CIFAR-100 archive to time the conversion '
                   f'(default: data_beton/cifar-100-python.tar.gz or {SHARED_ARCHIVE} if present)')
    p.add_argument('--loaders', default='ffcv,torchvision,classic',
                   help='which loaders to compare (default: %(default)s)')
    p.add_argument('--batch-size', type=int, help="default: the config's")
    p.add_argument('--workers', type=int, default=-1, help='loader workers (default -1: all cores)')
    p.add_argument('--epochs', type=int, default=3, help='steady-state loader epochs (default 3)')
    p.add_argument('--device', default='auto', help='auto | cuda | mps | cpu')
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                   help='also time the torch.compile\'d step (default: on a GPU)')
    p.add_argument('--tiny', action='store_true', help='a few batches of everything (for tests)')
    p.add_argument('--out', default=str(ROOT / 'bench_out'), help='folder for benchmark.json/.png')
    args = p.parse_args(argv)

    from model.fileio import atomic_write_text, check_writable_dir
    from bench.benchmark import LOADERS, Settings, run_benchmark
    from bench.benchmark_report import format_table, plot
    loaders = tuple(k.strip() for k in args.loaders.split(',') if k.strip())
    if not loaders or set(loaders) - set(LOADERS):
        raise UserError(f'--loaders: {args.loaders!r}; choose from {list(LOADERS)}')
    overrides = []
    if args.data_dir:
        from ffcv_pipeline.writer import split_files
        overrides += [f'data.{k}_path={v}' for k, v in split_files(args.data_dir).items()]
    if args.batch_size:
        overrides.append(f'data.batch_size={args.batch_size}')
    archive = args.archive
    if archive is None and not args.tiny:
        archive = next((c for c in (ROOT / 'data_beton' / 'cifar100' / 'cifar-100-python.tar.gz', SHARED_ARCHIVE)
                        if c.is_file()), None)
    s = Settings(config=args.config, overrides=overrides, device=args.device, workers=args.workers,
                 loaders=loaders, epochs=args.epochs, compile=args.compile, archive=archive)
    if args.tiny:  # every section, on a few hundred images and a narrow model
        s.overrides += ['data.batch_size=64', 'model.width=8']
        if 'torchvision' in s.loaders:  # its full epoch: no second numba compilation
            s.loaders = ('torchvision', *[k for k in s.loaders if k != 'torchvision'])
        s.epochs, s.per_class, s.model_batch, s.model_steps, s.epoch_per_class = 1, 4, 16, 2, 1
    out = check_writable_dir(args.out)  # before minutes of measuring
    # written after every section: a time limit (the GPU runbook's) keeps what was measured
    res = run_benchmark(s, save=lambda r: atomic_write_text(out / 'benchmark.json', json.dumps(r, indent=2) + '\n'))
    plot(res, out / 'benchmark.png')
    print(format_table(res))
    print(f'wrote {out / "benchmark.json"} and {out / "benchmark.png"}')
    return 0


if __name__ == '__main__':
    run(main)
