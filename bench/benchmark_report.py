"""The benchmark's table (stdout, docs/BENCHMARKS.md) and bar chart, from its JSON result."""
from __future__ import annotations

from pathlib import Path

from training.metrics import save_figure

LOADER_LABELS = {'ffcv': 'FFCV (JIT aug + normalize)',
                 'torchvision': 'torchvision path (DataLoader, numpy batch aug)',
                 'classic': 'torchvision classic (per-image PIL transforms)'}


def _rate(d: dict, key: str = 'images_per_s_median') -> str:
    return f'{d[key]:,.0f}' if d[key] >= 100 else f'{d[key]:,.1f}'


def format_table(res: dict) -> str:
    rows = [('what', 'images/s (median)', 'min-max / notes')]
    for kind, d in res['loaders'].items():
        rows.append((f'loader: {LOADER_LABELS[kind]}', _rate(d),
                     f'{d["images_per_s_min"]:,.0f}-{d["images_per_s_max"]:,.0f}; '
                     f'warm-up epoch {d["warmup_epoch_s"]:.1f} s'))
    for pair, x in res.get('loader_speedup', {}).items():
        rows.append((f'loader speed-up {pair}', f'{x:.1f}x', ''))
    if 'augmentation_ops' in res:
        a = res['augmentation_ops']
        rows.append(('aug ops only, uint8 out: ours / FFCV built-in', f'{a["ours"]:,.0f}',
                     f'FFCV built-in {a["ffcv_builtin"]:,.0f}: {a["speedup"]:.1f}x'))
    for key, note in (('model_step', ''), ('model_step_fp32_nchw', 'amp_channels_last_speedup'),
                      ('model_step_compiled', 'compile_speedup')):
        if key in res:
            m = res[key]
            layout = 'channels-last' if m['channels_last'] else 'NCHW'
            what = f'model step ({m["precision"]}, {layout}{", compiled" if m["compiled"] else ""}, batch {m["batch"]})'
            extra = f'speed-up {res[note]:.2f}x; ' if note else ''
            rows.append((what, _rate(m, 'images_per_s'), f'{extra}{m["steps"]} steps, warm-up {m["warmup_s"]:.1f} s'))
    for kind, e in res['full_epoch'].items():
        rows.append((f'full epoch: {kind} loader + step ({e["images_per_epoch"]:,} images, batch {e["batch"]})',
                     _rate(e), f'data wait {100 * e["data_wait_fraction"]:.2f}% of {e["epoch_s"]:.1f} s'))
    if 'verdict' in res:
        rows.append(('verdict', res['verdict'], 'data wait > 5% of an epoch: loader-bound'))
    if 'conversion' in res:
        c = res['conversion']
        rows.append((f'conversion ({c["images"]:,} images)', f'{c["images"] / c["seconds"]:,.0f}',
                     f'{c["seconds"]:.1f} s wall-clock'))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [' | '.join(r[i].ljust(w[i]) for i in range(3)) for r in rows]
    lines.insert(1, '-+-'.join('-' * x for x in w))
    env = res['environment']
    head = (f"{env['cpu']} ({env['cores']} cores), GPU: {env['gpu'] or 'none'}; torch {env['torch']}, "
            f"ffcv {env['ffcv']}, numba {env['numba']}, {env['date']}")
    return head + '\n' + '\n'.join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    bars = [(f'loader: {k}', d['images_per_s_median']) for k, d in res['loaders'].items()]
    bars += [(k.replace('_', ' '), res[k]['images_per_s']) for k in
             ('model_step', 'model_step_fp32_nchw', 'model_step_compiled') if k in res]
    bars += [(f'full epoch: {k}', d['images_per_s_median']) for k, d in res['full_epoch'].items()]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(bars) + 1.5))
    drawn = ax.barh([b[0] for b in bars], [b[1] for b in bars], color=[f'C{i}' for i in range(len(bars))])
    ax.set_xscale('log')
    ax.set_xlabel('images/s (log scale)')
    ax.bar_label(drawn, labels=[f'{v:,.0f}' for _, v in bars], padding=3)
    env = res['environment']
    ax.set_title(f"{env['gpu'] or env['cpu']} ({env['cores']} cores)")
    save_figure(fig, path)
