"""Time-to-accuracy measured like a record: several seeds per recipe, end to end, averaged.

    python scripts/speedrun.py --config rn18.yaml --runs 3
    python scripts/speedrun.py --config rn18.yaml --sweep training.epochs=12,16,20 --budget-s 500
    python scripts/speedrun.py --config rn18.yaml --sweep data.loader=ffcv,torchvision

Every run is ``scripts/train.py`` in a fresh process (loader start-up and numba JIT included,
as a user pays them; the ``.beton`` conversion is excluded and reported apart from the
manifest). Results: ``speedrun.json`` (written after every run, so a killed sweep keeps what it
finished), a table per recipe (time to the target: mean, min, max and how many runs reached it;
final and best top-1 mean +- std; median training images/s; wall-clock), and
``speedrun.png``: test top-1 against wall-clock seconds for every run, with the target line.
airbench reports its record as a mean over many runs; so do we.
"""
from __future__ import annotations

import itertools
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from model.fileio import atomic_write_text, check_writable_dir

from ffcv_pipeline.data import data_paths
from ffcv_pipeline.writer import read_manifest

from training.budget import format_budget
from training.config import ROOT, ConfigError, load_config
from training.metrics import plot_budgets, read_jsonl, save_figure
from training.runtime import resolve_device

from . import environment


@dataclass
class Plan:
    config: str
    overrides: list[str] = field(default_factory=list)  # ['training.epochs=20', ...] for every run
    sweep: dict[str, list[str]] = field(default_factory=dict)  # key -> values: one recipe per combination
    runs: int = 3  # seeds per recipe
    seed: int = 0  # first seed
    budget_s: float | None = None  # start no run once this much wall-clock has passed or would pass
    out: Path = ROOT / 'speedrun_out'

    def recipes(self) -> list[list[str]]:
        """One override list per combination of the swept values (in the order given)."""
        keys = list(self.sweep)
        return [[f'{k}={v}' for k, v in zip(keys, values)]
                for values in itertools.product(*(self.sweep[k] for k in keys))] or [[]]


def parse_sweep(items: list[str]) -> dict[str, list[str]]:
    """``['training.epochs=12,16', 'data.loader=ffcv,torchvision']`` -> {key: [values]}."""
    sweep = {}
    for item in items:
        key, sep, values = item.partition('=')
        vals = [v.strip() for v in values.split(',') if v.strip()]
        if not sep or not key or not vals:
            raise ConfigError(f'--sweep {item!r}: expected section.key=v1,v2,...')
        sweep[key] = vals
    return sweep


def label(recipe: list[str]) -> str:
    return ', '.join(recipe) or 'as configured'


def slug(recipe: list[str]) -> str:
    return re.sub(r'[^A-Za-z0-9.]+', '-', '_'.join(o.split('.', 1)[-1] for o in recipe)).strip('-') or 'base'


def run_one(plan: Plan, recipe: list[str], seed: int, log=print) -> dict:
    """One ``scripts/train.py`` process; returns its summary plus its per-epoch curve."""
    name = f'{slug(recipe)}-seed{seed}'
    args = [sys.executable, str(ROOT / 'scripts' / 'train.py'), '--config', plan.config,
            *(f'--{o}' for o in [*plan.overrides, *recipe, f'training.seed={seed}',
                                 f'output.dir={plan.out / "runs"}', f'output.name={name}',
                                 'output.progress=false'])]
    t = time.perf_counter()
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    process_s = time.perf_counter() - t
    # the folder the run really wrote: a name holding an earlier speedrun's results gets a suffix
    written = re.findall(r'^done: .*; ([^;]+)/summary\.json$', r.stdout, re.M)
    run_dir = Path(written[-1]) if written else plan.out / 'runs' / name
    summary_path = run_dir / 'summary.json'
    if r.returncode != 0 or not summary_path.is_file():
        err = (r.stderr.strip().splitlines() or ['no output'])[-1]
        log(f'  {name}: failed (exit {r.returncode}): {err}')
        return {'recipe': recipe, 'seed': seed, 'run_dir': str(run_dir), 'failed': err,
                'exit_code': r.returncode, 'process_seconds': round(process_s, 3)}
    s = json.loads(summary_path.read_text())
    curve = [(rec['wallclock_s'], rec['test_top1']) for rec in read_jsonl(run_dir / 'metrics.jsonl')
             if rec.get('test_top1') is not None]
    return {**s, 'recipe': recipe, 'seed': seed, 'process_seconds': round(process_s, 3), 'curve': curve}


def _mean_std(xs: list[float]) -> dict:
    return {'mean': statistics.fmean(xs), 'std': statistics.stdev(xs) if len(xs) > 1 else 0.0,
            'n': len(xs)} if xs else {'mean': None, 'std': None, 'n': 0}


def _span(xs: list[float]) -> dict | None:
    return {'mean': statistics.fmean(xs), 'min': min(xs), 'max': max(xs)} if xs else None


def aggregate(runs: list[dict], target: float) -> list[dict]:
    """Per recipe: the figures of the table."""
    rows = []
    for key, group in itertools.groupby(sorted(runs, key=lambda r: r['recipe']), key=lambda r: r['recipe']):
        group = list(group)
        ok = [r for r in group if 'failed' not in r]
        tt = [r['time_to_target_s'] for r in ok if r.get('time_to_target_s') is not None]
        tt_train = [r['train_seconds_to_target'] for r in ok if r.get('train_seconds_to_target') is not None]
        ips = [r['median_train_images_per_s'] for r in ok if r.get('median_train_images_per_s')]
        budgets = [r['time_budget'] for r in ok if r.get('time_budget')]
        rows.append({
            'recipe': key, 'label': label(key), 'runs': len(group), 'failed': len(group) - len(ok),
            'reached_target': len(tt), 'target_top1': target,
            'time_to_target_s': _span(tt), 'train_seconds_to_target': _span(tt_train),
            'time_budget': ({k: round(statistics.fmean(b[k] for b in budgets), 3) for k in budgets[0]}
                            if budgets else None),  # mean seconds per span
            'final_top1': _mean_std([r['final_top1'] for r in ok if r.get('final_top1') is not None]),
            'best_top1': _mean_std([r['best_top1'] for r in ok if r.get('best_top1') is not None]),
            'median_train_images_per_s': statistics.median(ips) if ips else None,
            'total_seconds': _mean_std([r['total_seconds'] for r in ok]),
            'process_seconds': _mean_std([r['process_seconds'] for r in ok]),
        })
    return rows


def format_table(result: dict) -> str:
    pct = (lambda d: '-' if not d or d['mean'] is None else f'{100 * d["mean"]:.2f} +- {100 * d["std"]:.2f}')
    sec = (lambda d: '-' if not d or d.get('mean') is None else f'{d["mean"]:.1f}')
    head = ('recipe', 'runs', f'time to {result["target_top1"]:.0%} from process start (mean, min-max)',
            'training loops to it', 'final top-1 %', 'best top-1 %', 'images/s', 'wall-clock s')
    rows = [head]
    for a in result['recipes']:
        t, tr = a['time_to_target_s'], a.get('train_seconds_to_target')
        rows.append((a['label'], f'{a["runs"] - a["failed"]}/{a["runs"]}',
                     f'{t["mean"]:.1f} s ({t["min"]:.1f}-{t["max"]:.1f}), {a["reached_target"]}/{a["runs"]} reached'
                     if t else f'not reached (0/{a["runs"]})',
                     f'{tr["mean"]:.1f} s ({tr["min"]:.1f}-{tr["max"]:.1f})' if tr else '-',
                     pct(a['final_top1']), pct(a['best_top1']),
                     f'{a["median_train_images_per_s"]:,.0f}' if a['median_train_images_per_s'] else '-',
                     sec(a['total_seconds'])))
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [' | '.join(c.ljust(x) for c, x in zip(r, w)) for r in rows]
    lines.insert(1, '-+-'.join('-' * x for x in w))
    env = result['environment']
    conv = result.get('conversion_s')
    budgets = [f'  {a["label"]}: {format_budget(a["time_budget"])}' for a in result['recipes']
               if a.get('time_budget')]
    return '\n'.join([f"{env['device']}; torch {env['torch']}, ffcv {env['ffcv']}; config {result['config']}"
                      + (f'; conversion {conv:.1f} s (apart)' if conv is not None else ''), *lines,
                      *(['time budget per run (mean seconds per span):', *budgets] if budgets else [])])


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(17, 5), gridspec_kw={'width_ratios': [3, 2]})
    runs = [r for r in result['runs'] if r.get('time_budget')]
    plot_budgets(bx, [f'{label(r["recipe"])}, seed {r["seed"]}' for r in runs],
                 [r['time_budget'] for r in runs])
    for i, a in enumerate(result['recipes']):
        for r in (r for r in result['runs'] if r['recipe'] == a['recipe'] and r.get('curve')):
            xs, ys = zip(*r['curve'])
            ax.plot(xs, ys, 'o-', color=f'C{i % 10}', alpha=0.7, ms=3,
                    label=a['label'] if r['seed'] == min(x['seed'] for x in result['runs'] if x['recipe'] == a['recipe']) else None)
    ax.axhline(result['target_top1'], color='k', ls='--', lw=1, label=f'target {result["target_top1"]:.0%}')
    ax.set_xlabel('wall-clock seconds from process start')
    ax.set_ylabel('test top-1')
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{result['environment']['device']}: {result['config']}")
    save_figure(fig, path)


def speedrun(plan: Plan, log=print) -> dict:
    """Run every recipe ``plan.runs`` times (seeds ``plan.seed`` ...), within the budget."""
    cfg = load_config(plan.config, plan.overrides)  # bad configs and keys fail here, before any run
    recipes = plan.recipes()
    for recipe in recipes:
        load_config(plan.config, [*plan.overrides, *recipe])
    manifest = read_manifest(data_paths(cfg.data, ROOT)[0][0].parent) or {}
    result = {'config': plan.config, 'overrides': plan.overrides, 'sweep': plan.sweep, 'runs_per_recipe': plan.runs,
              'target_top1': cfg.training.target_top1,
              'environment': environment(resolve_device(cfg.training.device)),
              'conversion_s': manifest.get('write_seconds'),
              'budget_s': plan.budget_s, 'stopped_by_budget': False, 'runs': [], 'recipes': []}
    check_writable_dir(plan.out / 'runs')  # before the first run, not after it
    t0 = time.perf_counter()
    todo = [(recipe, plan.seed + i) for i in range(plan.runs) for recipe in recipes]  # seeds interleaved
    for n, (recipe, seed) in enumerate(todo):
        elapsed = time.perf_counter() - t0
        done = [r['process_seconds'] for r in result['runs']]
        expected = statistics.median(done) if done else 0.0
        if plan.budget_s is not None and n and elapsed + expected > plan.budget_s:
            result['stopped_by_budget'] = True
            log(f'budget: {elapsed:.0f} s used of {plan.budget_s:.0f} s, a run takes ~{expected:.0f} s: '
                f'stopping after {n} of {len(todo)} runs')
            break
        log(f'run {n + 1}/{len(todo)}: {label(recipe)}, seed {seed} ...')
        r = run_one(plan, recipe, seed, log)
        result['runs'].append(r)
        if 'failed' not in r:
            tt = r['time_to_target_s']
            log(f'  final top-1 {r["final_top1"]:.4f}, ' +
                (f'{r["target_top1"]:.0%} at {tt:.1f} s' if tt is not None else f'{r["target_top1"]:.0%} not reached')
                + f', {r["total_seconds"]:.1f} s')
        write_result(result, plan.out / 'speedrun.json', t0)
    write_result(result, plan.out / 'speedrun.json', t0)
    if result['runs']:
        plot(result, plan.out / 'speedrun.png')
    return result


def write_result(result: dict, path: Path, t0: float) -> None:
    """The per-recipe aggregates and the wall-clock so far, then the JSON (after every run: a
    killed speedrun or sweep keeps what it measured)."""
    result['recipes'] = aggregate(result['runs'], result['target_top1'])
    result['wallclock_s'] = round(time.perf_counter() - t0, 3)
    atomic_write_text(path, json.dumps(result, indent=1) + '\n')
