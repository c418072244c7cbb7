"""Convert CIFAR-100 into FFCV .beton files, once.

    python scripts/write_datasets.py                          # download the official archive
    python scripts/write_datasets.py --source cifar-100-python.tar.gz   # or a local copy/folder

Writes data_beton/cifar100_{train,test}.beton and manifest.json; a second run with the same
input does nothing. Measured: 60,000 images in ~4 s on 2 cores (docs/BENCHMARKS.md).
"""
import argparse

from _cli import ROOT, run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--source', help='local cifar-100-python.tar.gz or extracted cifar-100-python/ '
                   'folder (default: download the official archive)')
    p.add_argument('--out', default=str(ROOT / 'data_beton'), help='output folder (default: %(default)s)')
    p.add_argument('--force', action='store_true', help='rewrite even if the outputs are up to date')
    p.add_argument('--workers', type=int, default=-1, help='writer processes (default: all cores)')
    p.add_argument('--url', default=None, help='download from this mirror instead of the official '
                   'address (the md5 is still checked)')
    p.add_argument('--quiet', action='store_true', help='no progress bars')
    args = p.parse_args(argv)

    from ffcv_pipeline.writer import write_datasets
    from ffcv_pipeline.constants import CIFAR100_URL
    write_datasets(args.source, args.out, force=args.force, num_workers=args.workers,
                   progress=not args.quiet, url=args.url or CIFAR100_URL)
    return 0


if __name__ == '__main__':
    run(main)
