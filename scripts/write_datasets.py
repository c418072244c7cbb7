"""Convert a dataset into FFCV .beton files, once: CIFAR-100, CIFAR-10, or a folder of your images.

    python scripts/write_datasets.py                          # CIFAR-100: download the official archive
    python scripts/write_datasets.py --source cifar-100-python.tar.gz   # or a local copy/folder
    python scripts/write_datasets.py --dataset cifar10        # CIFAR-10 (--source works the same)
    python scripts/write_datasets.py --image-folder photos/ --size 64    # DIR/<class>/* or DIR/{train,val}/<class>/*

Writes data_beton/<dataset>/<dataset>_{train,test}.beton (and .npy arrays, example PNGs,
manifest.json); a second run with the same input does nothing. Train on it with
``python scripts/train.py --config rn18.yaml --data.dataset <dataset>``. Measured: CIFAR-100's
60,000 images in ~10-12 s on 2 cores (docs/BENCHMARKS.md).
"""
import argparse

from _cli import ROOT, run


def main(argv=None) -> int:
    from ffcv_pipeline.datasets import BUILTIN, DEFAULT
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--dataset', choices=sorted(BUILTIN), default=None,
                   help=f'a built-in dataset (default: {DEFAULT})')
    p.add_argument('--source', help='local copy of the official archive (e.g. cifar-100-python.tar.gz) '
                   'or its extracted folder (default: download the official archive)')
    p.add_argument('--image-folder', metavar='DIR', help='your own images instead: DIR/<class>/<images> '
                   '(then --val-fraction of each class is the test split) or DIR/train/<class>/... and '
                   'DIR/val/<class>/...; class names are the folder names')
    p.add_argument('--name', help='--image-folder: the dataset\'s name (folder and file names, '
                   'data.dataset); default: the folder\'s name')
    p.add_argument('--size', type=int, default=32, help='--image-folder: pixels per side the images '
                   'are centre-cropped and resized to (default: %(default)s)')
    p.add_argument('--val-fraction', type=float, default=0.1, help='--image-folder without a val/ folder: '
                   'share of each class held out as the test split (default: %(default)s)')
    p.add_argument('--seed', type=int, default=0, help='--image-folder: seed of that split (default: %(default)s)')
    p.add_argument('--strict', action='store_true', help='--image-folder: stop at the first unreadable '
                   'image (default: name it, skip it, count them at the end)')
    p.add_argument('--out', help='output folder (default: data_beton/<dataset>/)')
    p.add_argument('--force', action='store_true', help='rewrite even if the outputs are up to date')
    p.add_argument('--workers', type=int, default=-1, help='writer processes (default: all cores)')
    p.add_argument('--url', default=None, help='download from this mirror instead of the official '
                   'address (the md5 is still checked)')
    p.add_argument('--quiet', action='store_true', help='no progress bars')
    args = p.parse_args(argv)

    common = dict(force=args.force, num_workers=args.workers, progress=not args.quiet)
    if args.image_folder:
        clash = [o for o, v in (('--dataset', args.dataset), ('--source', args.source), ('--url', args.url)) if v]
        if clash:
            p.error(f'--image-folder reads your images; it takes no {clash[0]}')
        from ffcv_pipeline.folder import write_image_folder
        write_image_folder(args.image_folder, args.out, name=args.name, size=args.size,
                           val_fraction=args.val_fraction, seed=args.seed, strict=args.strict, **common)
        return 0
    ignored = [o for o, v in (('--name', args.name), ('--strict', args.strict)) if v]
    if ignored:
        p.error(f'{ignored[0]} goes with --image-folder')
    from ffcv_pipeline.writer import default_out, write_datasets
    dataset = args.dataset or DEFAULT
    write_datasets(args.source, args.out or default_out(dataset, ROOT), dataset=dataset, url=args.url,
                   **common)
    return 0


if __name__ == '__main__':
    run(main)
