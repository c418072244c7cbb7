"""Issue 17's sweep in one call: today's recipe, each lever once, the best combination at the
fewest epochs on three seeds, within a time budget (logic: bench/sweep.py).

    python scripts/gpu_sweep.py --config rn18.yaml --budget-s 480 --out sweep_out --docs
    # on the offline GPU host, after the runbook's conversion (../shared/gpu/README.md):
    OUT=/tmp/out TRAIN_S=1 BENCH_S=1 EXTRA='python3 scripts/gpu_sweep.py --budget-s 480 \
        --out "$OUT/sweep" --docs --data.num_workers $(nproc)' bash .gpu/run.sh
    # the CPU rehearsal (tiny: minutes)
    python scripts/gpu_sweep.py --config tiny_cpu.yaml --lever-epochs 2 --speed-epochs 2 \
        --final-epochs 1,2 --seeds 2 --skip compile --budget-s 600 --out /tmp/sweep

Extra ``--section.key VALUE`` arguments apply to every run. Writes ``sweep.json`` after every
run, ``sweep.png`` and the table at the end; ``--docs`` also writes the JSON as
``<date>-<gpu>-sweep.json`` into the output folder and ``docs/gpu/``.
"""
import argparse
from pathlib import Path

from _cli import ROOT, run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                epilog='extra --section.key VALUE arguments override the config for every run')
    p.add_argument('--config', default='rn18.yaml', help='training config (default: %(default)s)')
    p.add_argument('--lever-epochs', type=int, default=12, help='epochs of base@E and each accuracy lever (>= 2)')
    p.add_argument('--speed-epochs', type=int, default=3, help='epochs of each speed lever run (>= 2)')
    p.add_argument('--final-epochs', default='10,12,14,16', help='candidate epochs of the final recipe')
    p.add_argument('--seeds', type=int, default=3, help='seeds of the final recipe (default 3)')
    p.add_argument('--min-gain', type=float, default=0.002, help='top-1 a lever must add (fraction)')
    p.add_argument('--margin', type=float, default=0.007, help='predicted top-1 over the target (fraction)')
    p.add_argument('--budget-s', type=float, default=480.0, help='wall-clock budget in seconds')
    p.add_argument('--skip', default='', help='levers to leave out, comma-separated (e.g. compile,cuda_graph)')
    p.add_argument('--out', default=str(ROOT / 'sweep_out'), help='output folder (default: %(default)s)')
    p.add_argument('--docs', nargs='?', const=str(ROOT / 'docs' / 'gpu'), metavar='DIR',
                   help='also write <date>-<gpu>-sweep.json into the output folder and DIR (default docs/gpu/)')
    args, rest = p.parse_known_args(argv)
    from model.errors import UserError
    try:
        finals = [int(e) for e in args.final_epochs.split(',') if e.strip()]
    except ValueError:
        raise UserError(f'--final-epochs: expected integers like 10,12,14, got {args.final_epochs!r}') from None
    if args.seeds < 1 or not finals or min(finals) < 1:
        raise UserError('--seeds and --final-epochs must be positive')
    if args.lever_epochs < 2 or args.speed_epochs < 2:  # epoch seconds are timed after the first epoch
        raise UserError('--lever-epochs and --speed-epochs must be >= 2 (the first epoch is not timed)')

    import json
    from model.fileio import atomic_write_text
    from training.config import parse_overrides
    from bench.sweep import SweepPlan, docs_name, format_sweep, sweep
    plan = SweepPlan(config=args.config, overrides=parse_overrides(rest), lever_epochs=args.lever_epochs,
                     speed_epochs=args.speed_epochs, final_epochs=finals, seeds=args.seeds,
                     min_gain=args.min_gain, margin=args.margin, budget_s=args.budget_s,
                     skip=[s.strip() for s in args.skip.split(',') if s.strip()], out=Path(args.out).resolve())
    result = sweep(plan)
    table = format_sweep(result)
    atomic_write_text(plan.out / 'sweep.txt', table + '\n')
    print(table)
    print(f'wrote {plan.out / "sweep.json"}, sweep.txt and sweep.png')
    if args.docs:
        text = json.dumps(result, indent=1) + '\n'
        for folder in (plan.out, Path(args.docs)):
            atomic_write_text(folder / docs_name(result), text)
        print(f'wrote {docs_name(result)} into {plan.out} and {args.docs}')
    return 1 if not result['runs'] or any('failed' in r for r in result['runs'] if r['stage'] == 'final') else 0


if __name__ == '__main__':
    run(main)
