"""Train ResNet-18 on a dataset's .beton files (CIFAR-100 by default; data.dataset picks another).

    python scripts/train.py --config rn18.yaml                      # configs/rn18.yaml
    python scripts/train.py --config rn18.yaml --training.epochs 2  # dotted overrides
    python scripts/train.py --resume runs/<run>/last.pt             # or interrupted.pt
    torchrun --nproc_per_node 8 scripts/train.py --config rn18.yaml # DDP, FFCV distributed loading

Writes runs/<config>-<time>/: config.yaml, metrics.jsonl (one line per epoch), last.pt,
best.pt, summary.json (incl. time to 73% top-1) and curves.png. Ctrl-C or SIGTERM saves
interrupted.pt (exit code 130); a NaN loss stops with exit code 3; bad input exits with 2.
"""
import argparse
import os
import sys

from _cli import run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description='Train on a dataset\'s .beton files; extra --section.key VALUE arguments '
                    'override the config (e.g. --training.epochs 2 --training.device cpu).',
        epilog=__doc__.split('\n\n')[1])
    p.add_argument('--config', help='config file or bare name in configs/ (e.g. rn18.yaml)')
    p.add_argument('--resume', metavar='CKPT', help='continue a run from its last.pt / interrupted.pt')
    args, rest = p.parse_known_args(argv)
    if not args.config and not args.resume:
        p.error('give --config NAME (e.g. --config rn18.yaml) or --resume CKPT')

    from training.config import parse_overrides
    from training.trainer import TrainingDiverged, TrainingInterrupted, train
    try:
        train(args.config, parse_overrides(rest), resume=args.resume)
    except TrainingDiverged as e:
        print(f'error: {e}', file=sys.stderr)
        return 3
    except TrainingInterrupted as e:
        if os.environ.get('RANK', '0') == '0':  # under torchrun: once, not once per process
            print(f'interrupted; checkpoint saved. Resume with: python scripts/train.py --resume {e}',
                  file=sys.stderr)
        return 130
    return 0


if __name__ == '__main__':
    run(main, fast_exit=True)  # the trainer has joined its writer thread and closed its files
