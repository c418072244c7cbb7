"""Time to 73%, measured like a record: the trainer run several times (seeds) per recipe, end to
end, averaged; a table, speedrun.json and speedrun.png (test top-1 against wall-clock seconds).

    python scripts/speedrun.py --config rn18.yaml --runs 3
    python scripts/speedrun.py --config rn18.yaml --sweep training.epochs=12,16,20 --budget-s 500
    python scripts/speedrun.py --config rn18.yaml --sweep data.loader=ffcv,torchvision --runs 2

Extra ``--section.key VALUE`` arguments apply to every run. ``--budget-s`` starts no run that
would end past the budget, and the table covers what finished. Measured figures:
docs/BENCHMARKS.md.
"""
import argparse
from pathlib import Path

from _cli import ROOT, run
from model.errors import UserError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                epilog='extra --section.key VALUE arguments override the config for every run')
    p.add_argument('--config', required=True, help='training config (e.g. rn18.yaml)')
    p.add_argument('--runs', type=int, default=3, help='seeds per recipe (default 3)')
    p.add_argument('--seed', type=int, default=0, help='first seed (default 0)')
    p.add_argument('--sweep', action='append', default=[], metavar='KEY=V1,V2',
                   help='one recipe per value (repeat for a grid), e.g. training.epochs=12,16,20')
    p.add_argument('--budget-s', type=float, help='wall-clock budget in seconds for the whole speedrun')
    p.add_argument('--out', default=str(ROOT / 'speedrun_out'), help='output folder (default: %(default)s)')
    args, rest = p.parse_known_args(argv)
    if args.runs < 1:
        raise UserError(f'--runs must be at least 1, got {args.runs}')

    from training.config import parse_overrides
    from bench.speedrun import Plan, format_table, parse_sweep, speedrun
    plan = Plan(config=args.config, overrides=parse_overrides(rest), sweep=parse_sweep(args.sweep),
                runs=args.runs, seed=args.seed, budget_s=args.budget_s, out=Path(args.out).resolve())
    result = speedrun(plan)
    if not result['runs']:
        raise UserError('no run fitted in the budget')
    print(format_table(result))
    print(f'wrote {plan.out / "speedrun.json"} and {plan.out / "speedrun.png"}')
    return 1 if any('failed' in r for r in result['runs']) else 0


if __name__ == '__main__':
    run(main)
