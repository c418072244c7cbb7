"""Issue 17's sweep as one prepared GPU call: today's recipe, each lever once, then the best
combination at the fewest epochs predicted to reach the target, on three seeds.

    python scripts/gpu_sweep.py --config rn18.yaml --budget-s 480 --out sweep_out --docs
    python scripts/gpu_sweep.py --config tiny_cpu.yaml --lever-epochs 2 --speed-epochs 2 \\
        --final-epochs 1,2 --seeds 1 --skip compile   # the CPU rehearsal

Stages, in order of what matters most (a budget cut drops the last ones first, but the time
the final stage needs is held back while the levers run):

1. ``baseline``: the config as it is (rn18.yaml: 20 epochs).
2. ``base@E``: the same at ``--lever-epochs`` E (the reference each lever is compared with).
3. accuracy levers at E, one run each (:data:`LEVERS`): gain = top-1 - base@E's.
4. speed levers at ``--speed-epochs`` (fused SGD, CUDA graph, torch.compile; compile first runs
   once untimed to fill its persistent cache, then is measured in a fresh process with the
   warm cache): a lever is kept when its predicted end-to-end time at the final epoch count
   (its fixed cost plus its per-epoch seconds) beats base@E's; same accuracy is assumed (the
   step is the same maths; tests/test_levers.py checks it on the CPU).
5. ``final``: the accuracy levers with gain >= ``--min-gain`` (one per config key, largest gain
   first) plus the paying speed levers, at the fewest of ``--final-epochs`` whose predicted
   top-1 -- base top-1 interpolated linearly in epochs between base@E and the baseline, plus
   the summed gains -- clears the target by ``--margin``; ``--seeds`` seeds. Whether every seed
   reached the target is then measured, not predicted.

Every run is :func:`bench.speedrun.run_one` (``scripts/train.py`` in a fresh process, set-up
and JIT included); the result is written after every run (``sweep.json``: speedrun's format
plus the stages and decisions), with a table and ``sweep.png`` (top-1 against wall-clock for
every run) at the end, and with ``docs``, a copy named ``<date>-<gpu>-sweep.json`` for
``docs/gpu/``.
"""
from __future__ import annotations

import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from model.fileio import check_writable_dir

from training.config import ROOT, ConfigError, load_config
from training.metrics import read_jsonl
from training.runtime import resolve_device

from . import environment
from .speedrun import Plan, format_table, label, plot, run_one, write_result

# name -> overrides. Sources: ../shared/docs/SPEED_NOTES.md (airbench, cifar10-zoo ablations).
LEVERS = {
    # issue 26 (first: never measured, and the record recipes' newest lever): Muon for the conv
    # weights, SGD at training.lr for the head, BatchNorm and biases (airbench94_muon's split);
    # muon_lr 0.02 / momentum 0.95 are Keller Jordan's defaults, not tuned for this ResNet
    'muon': ['training.optimizer=muon'],
    'tta_translate': ['training.tta_translate=1'],  # airbench mirror_translate: +0.2 over flip (RN-18, CIFAR-10)
    'ema': ['training.ema=0.995'],  # window ~200 steps (~2 epochs at batch 512): see training/ema.py
    'label_smoothing_0.2': ['training.label_smoothing=0.2'],  # airbench's default
    'batch_1024': ['data.batch_size=1024', 'training.lr=0.8'],  # linear LR scaling (Goyal et al. 2017)
    'warmup_2': ['training.warmup_epochs=2'],
    'lr_0.5': ['training.lr=0.5'],  # FFCV's CIFAR example: 0.5 at batch 512
    'onecycle': ['training.schedule=onecycle'],  # torch's OneCycleLR shape over the same warm-up
    # AdamW's usual CIFAR ResNet settings (LR ~100x SGD's; decoupled decay 0.05): a guess to measure
    'adamw': ['training.optimizer=adamw', 'training.lr=0.002', 'training.weight_decay=0.05'],
}
SPEED_LEVERS = {
    'fused_sgd': ['training.fused_sgd=true'],
    'cuda_graph': ['training.cuda_graph=true'],  # implies the fused SGD (training/step.py)
    'compile': ['training.compile=true'],
}


@dataclass
class SweepPlan:
    config: str
    overrides: list[str] = field(default_factory=list)  # for every run (e.g. --data.num_workers 16)
    lever_epochs: int = 12
    speed_epochs: int = 3
    final_epochs: list[int] = field(default_factory=lambda: [10, 12, 14, 16])
    seeds: int = 3
    min_gain: float = 0.002  # top-1 (fraction) a lever must add at E epochs to join the final
    margin: float = 0.007  # the final's predicted top-1 must clear the target by this
    budget_s: float = 480.0
    skip: list[str] = field(default_factory=list)  # lever names left out
    out: Path = ROOT / 'sweep_out'


def _epochs(recipe: list[str], default: int) -> int:
    return next((int(o.split('=', 1)[1]) for o in recipe if o.startswith('training.epochs=')), default)


def per_epoch_seconds(run: dict) -> float | None:
    """Median (train + evaluation) seconds of the epochs after the first (JIT and cuDNN tuning)."""
    recs = list(read_jsonl(Path(run['run_dir']) / 'metrics.jsonl'))[1:]
    return statistics.median(r['epoch_seconds'] + r['eval_seconds'] for r in recs) if recs else None


def predicted_seconds(run: dict, epochs: int) -> float | None:
    """The run's end-to-end seconds extrapolated to ``epochs``: its fixed cost (process start,
    set-up, compile) plus ``epochs`` times its per-epoch seconds."""
    pe = per_epoch_seconds(run)
    if pe is None or 'failed' in run:
        return None
    return run['process_seconds'] - run['epochs'] * pe + epochs * pe  # fixed cost + per-epoch seconds


def base_top1(epochs: int, points: list[tuple[int, float]]) -> float:
    """Base top-1 at ``epochs``, linear through the (epochs, top-1) points (or flat from one)."""
    pts = sorted(points)
    if len(pts) == 1:
        return pts[0][1]
    (e0, a0), (e1, a1) = pts[0], pts[-1]
    return a0 + (a1 - a0) * (epochs - e0) / (e1 - e0) if e1 != e0 else a0


def choose_final(result: dict, plan: SweepPlan, target: float) -> dict:
    """The final recipe from the lever measurements (see the module docstring)."""
    by = {r['stage']: r for r in result['runs'] if 'failed' not in r}
    base = by.get('base@E')
    chosen, keys = [], set()
    gains = {n: by[n]['final_top1'] - base['final_top1'] for n in LEVERS
             if base and n in by and by[n].get('final_top1') is not None}
    if base:
        for name in sorted(gains, key=gains.get, reverse=True):
            k = {o.split('=')[0] for o in LEVERS[name]}
            if gains[name] >= plan.min_gain and not k & keys:
                chosen.append(name)
                keys |= k
    points = [(r['epochs'], r['final_top1']) for r in (base, by.get('baseline')) if r and r.get('final_top1') is not None]
    gain = sum(gains[n] for n in chosen)
    predicted = {e: base_top1(e, points) + gain for e in plan.final_epochs} if points else {}
    ok = [e for e in sorted(predicted) if predicted[e] >= target + plan.margin]
    epochs = ok[0] if ok else (by['baseline']['epochs'] if 'baseline' in by else max(plan.final_epochs))
    base_s = predicted_seconds(base, epochs) if base else None
    speed_s = {n: predicted_seconds(by[n], epochs) if n in by else None for n in SPEED_LEVERS}
    speed = [n for n, s in speed_s.items() if s is not None and base_s is not None and s < base_s]
    if 'cuda_graph' in speed and 'compile' in speed:  # the config refuses both: keep the faster
        speed.remove(max(('cuda_graph', 'compile'), key=lambda n: speed_s[n]))
    accuracy = [o for n in chosen for o in LEVERS[n]]
    for name in list(speed):  # e.g. the CUDA graph or the fused SGD with AdamW: refused, so left out
        try:
            load_config(plan.config, [*plan.overrides, *accuracy, *SPEED_LEVERS[name]])
        except ConfigError:
            speed.remove(name)
    recipe = [f'training.epochs={epochs}', *(o for n in chosen + speed for o in {**LEVERS, **SPEED_LEVERS}[n])]
    return {'accuracy_levers': chosen, 'speed_levers': speed, 'gains': gains, 'epochs': epochs,
            'predicted_top1': predicted, 'predicted_seconds': {'base@E': base_s, **speed_s},
            'recipe': recipe}


def sweep(plan: SweepPlan, log=print) -> dict:
    cfg = load_config(plan.config, plan.overrides)  # bad configs fail here, before any run
    target, E = cfg.training.target_top1, plan.lever_epochs
    unknown = set(plan.skip) - set(LEVERS) - set(SPEED_LEVERS)
    if unknown:
        raise ConfigError(f'--skip: unknown lever {sorted(unknown)[0]!r} (known: {", ".join([*LEVERS, *SPEED_LEVERS])})')
    stages = [('baseline', [])] + [('base@E', [f'training.epochs={E}'])]
    stages += [(n, [f'training.epochs={E}', *o]) for n, o in LEVERS.items() if n not in plan.skip]
    stages += [(n, [f'training.epochs={plan.speed_epochs}', *o]) for n, o in SPEED_LEVERS.items()
               if n not in plan.skip]
    for _, recipe in stages:
        load_config(plan.config, [*plan.overrides, *recipe])
    sp = Plan(config=plan.config, overrides=plan.overrides, runs=1, out=plan.out)
    check_writable_dir(plan.out / 'runs')  # before the first run, not after it (as speedrun)
    # torch.compile's caches (inductor's FX graph and kernel caches) in one place: the warm-up run
    # fills them, the measured run reads them, as a user's second run would
    os.environ.setdefault('TORCHINDUCTOR_CACHE_DIR', str(plan.out / 'inductor_cache'))
    result = {'config': plan.config, 'overrides': plan.overrides, 'target_top1': target,
              'environment': environment(resolve_device(cfg.training.device)), 'conversion_s': None,
              'budget_s': plan.budget_s,
              'plan': {k: (str(v) if isinstance(v, Path) else v) for k, v in plan.__dict__.items()},
              'levers': LEVERS, 'speed_levers': SPEED_LEVERS, 'stopped_by_budget': False,
              'runs': [], 'warmup_runs': [], 'recipes': [], 'final': None}
    t0 = time.perf_counter()
    default_epochs = cfg.training.epochs

    def cost(recipe: list[str]) -> float:
        """Seconds a run is expected to take: linear in epochs through the runs so far."""
        done = [(r['epochs'], r['process_seconds']) for r in result['runs'] if 'failed' not in r]
        e = _epochs(recipe, default_epochs)
        if not done:
            return 0.0
        if len({d[0] for d in done}) < 2:
            return statistics.median(s for _, s in done) * max(e, 1) / max(done[0][0], 1)
        (e0, s0), (e1, s1) = min(done), max(done)
        return max(s0 + (s1 - s0) * (e - e0) / (e1 - e0), 1.0)

    def fits(recipe: list[str], reserve: float = 0.0) -> bool:
        return time.perf_counter() - t0 + cost(recipe) + reserve <= plan.budget_s

    def go(stage: str, recipe: list[str], seed: int = 0, warmup: bool = False) -> dict:
        log(f'[{time.perf_counter() - t0:5.0f} s] {stage}{" (cache warm-up)" if warmup else ""}: '
            f'{label(recipe)}, seed {seed}')
        r = {**run_one(sp, recipe, seed, log), 'stage': stage}
        r.setdefault('epochs', _epochs(recipe, default_epochs))
        (result['warmup_runs'] if warmup else result['runs']).append(r)
        if 'failed' not in r:
            log(f'  top-1 {r["final_top1"]:.4f}, {r["process_seconds"]:.1f} s')
        write_result(result, plan.out / 'sweep.json', t0)
        return r

    def reserve() -> float:  # the final stage: seeds x a run at the middle of the final epochs
        mid = sorted(plan.final_epochs)[len(plan.final_epochs) // 2]
        return plan.seeds * cost([f'training.epochs={mid}'])

    for stage, recipe in stages:
        if not fits(recipe, reserve() if result['runs'] else 0.0):
            result['stopped_by_budget'] = True
            log(f'budget: skipping {stage} (would not leave time for the final stage)')
            continue
        if stage == 'compile':  # an untimed run fills the persistent caches; the measured one reads them
            go(stage, recipe, warmup=True)
            if not fits(recipe, reserve()):
                result['stopped_by_budget'] = True
                continue
        go(stage, recipe)
    result['final'] = final = choose_final(result, plan, target)
    log(f'final: {label(final["recipe"])} (predicted top-1 '
        + ', '.join(f'{e}: {p:.4f}' for e, p in final['predicted_top1'].items()) + ')')
    for seed in range(plan.seeds):
        if not fits(final['recipe']):
            result['stopped_by_budget'] = True
            log(f'budget: {time.perf_counter() - t0:.0f} s used of {plan.budget_s:.0f} s; '
                f'final stage stopped after {seed} of {plan.seeds} seeds')
            break
        go('final', final['recipe'], seed)
    finals = [r for r in result['runs'] if r['stage'] == 'final']
    final['every_seed_reached_target'] = bool(finals) and all(
        r.get('time_to_target_s') is not None for r in finals)
    write_result(result, plan.out / 'sweep.json', t0)
    if result['runs']:
        try:
            plot(result, plan.out / 'sweep.png')
        except ImportError as e:  # a host without matplotlib: the figures are in the JSON
            log(f'note: no sweep.png ({e})')
    return result


def docs_name(result: dict) -> str:
    """``<date>-<device>-sweep.json``, e.g. ``2026-12-01-nvidia-h200-sweep.json``."""
    dev = re.sub(r'[^a-z0-9]+', '-', result['environment']['device'].lower()).strip('-')
    return f'{result["environment"]["date"][:10]}-{dev}-sweep.json'


def format_sweep(result: dict) -> str:
    """speedrun's table (per recipe) and one line per decision."""
    f = result.get('final') or {}
    lines = [format_table(result), '']
    for name, g in (f.get('gains') or {}).items():
        lines.append(f'lever {name}: {100 * g:+.2f} points at base@E'
                     + (' -> final' if name in f.get('accuracy_levers', []) else ''))
    for name, s in (f.get('predicted_seconds') or {}).items():
        if s is not None:
            lines.append(f'{name}: predicted {s:.1f} s end to end at {f["epochs"]} epochs'
                         + (' -> final' if name in f.get('speed_levers', []) else ''))
    if f:
        lines.append(f'final recipe: {label(f["recipe"])}; every seed reached the target: '
                     f'{f.get("every_seed_reached_target")}')
    if result.get('stopped_by_budget'):
        lines.append(f'stopped by the {result["budget_s"]:.0f} s budget: some stages did not run')
    return '\n'.join(lines)
