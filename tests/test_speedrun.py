"""scripts/speedrun.py on the CPU: real (tiny) training runs through the real trainer, in their
own processes; the table and speedrun.json hold the figures those runs wrote."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from conftest import as_cli, run_main, tiny


def fast(betons, out, **extra):
    """Overrides for every speedrun run (output.dir/name are the speedrun's own)."""
    return [o for o in as_cli(tiny(betons, out, **{'data.loader': 'torchvision', 'training.target_top1': 0.02,
                                                   'data.train_per_class': 2, 'data.test_per_class': 1,
                                                   **extra}))
            if not o.startswith(('--output.dir', '--output.name'))]


def test_speedrun_runs_seeds_per_recipe_and_averages_them(synthetic_betons, tmp_path):
    """2 recipes x 2 seeds: four real runs; every aggregate is recomputed here from the runs'
    own summary.json files. Catches a sweep that runs one recipe, seeds that are not applied,
    or a table whose figures do not come from the runs."""
    out = tmp_path / 'sr'
    code, stdout, err = run_main('speedrun', '--config', 'tiny_cpu', '--runs', 2,
                                 '--sweep', 'training.epochs=1,2', '--out', out,
                                 *fast(synthetic_betons, tmp_path / 'x', **{'data.num_workers': 1}))
    assert code == 0, err
    res = json.loads((out / 'speedrun.json').read_text())
    runs = res['runs']
    assert not [r for r in runs if 'failed' in r], stdout  # a failed run's last error line is in the table's log
    assert [(r['recipe'], r['seed']) for r in runs] == [
        (['training.epochs=1'], 0), (['training.epochs=2'], 0), (['training.epochs=1'], 1), (['training.epochs=2'], 1)]
    for r in runs:
        own = json.loads((Path(r['run_dir']) / 'summary.json').read_text())
        assert {k: r[k] for k in own} == own
        assert r['epochs'] == int(r['recipe'][0].split('=')[1]) and r['loader'] == 'torchvision'
        assert r['process_seconds'] >= r['total_seconds'] > 0
        assert len(r['curve']) == r['epochs'] and r['curve'][-1][1] == r['final_top1']
    # four distinct runs, each trained with its own seed (the run's saved config says so)
    assert len({r['run_dir'] for r in runs}) == 4
    for r in runs:
        saved = (Path(r['run_dir']) / 'config.yaml').read_text()
        assert f"seed: {r['seed']}" in saved and f"epochs: {r['epochs']}" in saved
    for agg in res['recipes']:
        mine = [r for r in runs if r['recipe'] == agg['recipe']]
        assert agg['runs'] == 2 and agg['failed'] == 0
        assert agg['final_top1']['mean'] == pytest.approx(statistics.fmean(r['final_top1'] for r in mine))
        assert agg['best_top1']['std'] == pytest.approx(statistics.stdev(r['best_top1'] for r in mine))
        tt = [r['time_to_target_s'] for r in mine if r['time_to_target_s'] is not None]
        assert agg['reached_target'] == len(tt)
        assert agg['time_to_target_s'] == (None if not tt else {'mean': pytest.approx(statistics.fmean(tt)),
                                                                 'min': min(tt), 'max': max(tt)})
        assert agg['median_train_images_per_s'] == statistics.median(r['median_train_images_per_s'] for r in mine)
        tr = [r['train_seconds_to_target'] for r in mine if r['train_seconds_to_target'] is not None]
        assert (agg['train_seconds_to_target'] is None) == (not tr)
        if tr:
            assert agg['train_seconds_to_target']['mean'] == pytest.approx(statistics.fmean(tr))
        for span in ('startup', 'loader_warmup', 'train_steps', 'evaluation', 'total'):  # the budget per run
            assert agg['time_budget'][span] == pytest.approx(statistics.fmean(r['time_budget'][span] for r in mine), abs=2e-3)
        assert f'{agg["label"]}: {agg["time_budget"]["total"]:.1f} s = startup' in stdout
        assert agg['label'] in stdout and f'{len(tt)}/2 reached' in stdout if tt else 'not reached (0/2)' in stdout
    assert res['target_top1'] == 0.02 and res['environment']['device'].startswith('cpu')
    assert not res['stopped_by_budget']
    assert (out / 'speedrun.png').read_bytes()[:4] == b'\x89PNG'


def test_budget_stops_before_a_run_that_would_not_fit(tmp_path, monkeypatch):
    """The budget logic alone (the runs themselves are real in the test above): a run is
    started only while the time used plus the median run so far fits the budget; the table and
    speedrun.json still cover what finished. Catches a budget that is ignored, or checked
    against the time used alone (it would start a run that cannot finish in time)."""
    import bench.speedrun as S
    clock = {'t': 0.0}
    monkeypatch.setattr(S.time, 'perf_counter', lambda: clock['t'])

    def fake_run(plan, recipe, seed, log):  # each run "takes" 40 s of the clock
        clock['t'] += 40.0
        return {'recipe': recipe, 'seed': seed, 'process_seconds': 40.0, 'total_seconds': 39.0,
                'final_top1': 0.5, 'best_top1': 0.5, 'time_to_target_s': None, 'target_top1': 0.73,
                'median_train_images_per_s': 100.0, 'curve': [(39.0, 0.5)]}
    monkeypatch.setattr(S, 'run_one', fake_run)
    logs = []
    res = S.speedrun(S.Plan(config='tiny_cpu', runs=5, budget_s=100, out=tmp_path), log=logs.append)
    assert len(res['runs']) == 2 and res['stopped_by_budget']  # 80 s used + 40 s > 100 s
    assert json.loads((tmp_path / 'speedrun.json').read_text())['recipes'][0]['runs'] == 2
    assert any('stopping after 2 of 5 runs' in line for line in logs)
    clock['t'] = 0.0
    assert len(S.speedrun(S.Plan(config='tiny_cpu', runs=3, budget_s=None, out=tmp_path), log=logs.append)['runs']) == 3


def test_bad_sweep_fails_before_any_run(tmp_path):
    code, _, err = run_main('speedrun', '--config', 'tiny_cpu', '--sweep', 'training.epoch=1,2', '--out', tmp_path)
    assert code == 2 and "unknown key 'training.epoch'" in err and not (tmp_path / 'speedrun.json').exists()
    code, _, err = run_main('speedrun', '--config', 'tiny_cpu', '--sweep', 'training.epochs', '--out', tmp_path)
    assert code == 2 and 'expected section.key=v1,v2' in err
