"""scripts/gpu_sweep.py (issue 17's one prepared GPU call), rehearsed on the CPU: real (tiny)
training runs in their own processes, the stages in order, the levers applied, the JSON, table
and plot; the decision rules and the budget on made-up measurements."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_main
from test_speedrun import fast


def test_sweep_rehearsal_runs_every_stage_with_its_lever(synthetic_betons, tmp_path):
    """baseline -> base@E -> one accuracy lever -> one speed lever -> final, each a real
    ``train.py`` process whose saved config carries that stage's overrides; sweep.json (plus the
    docs copy named by date and device), sweep.txt and sweep.png are written. Catches a stage
    whose overrides are not passed to its run, a lost stage, and a final that is not run."""
    from bench.sweep import LEVERS, SPEED_LEVERS
    out, docs = tmp_path / 'sweep', tmp_path / 'docs'
    skip = ','.join(n for n in [*LEVERS, *SPEED_LEVERS] if n not in ('label_smoothing_0.2', 'fused_sgd'))
    code, stdout, err = run_main('gpu_sweep', '--config', 'tiny_cpu', '--lever-epochs', 2, '--speed-epochs', 2,
                                 '--final-epochs', '1,2', '--seeds', 1, '--skip', skip, '--budget-s', 900,
                                 '--out', out, '--docs', docs,
                                 *fast(synthetic_betons, tmp_path / 'x', **{'data.num_workers': 1, 'output.plot': 'false'}))
    assert code == 0, err + stdout
    res = json.loads((out / 'sweep.json').read_text())
    assert [r['stage'] for r in res['runs']] == ['baseline', 'base@E', 'label_smoothing_0.2', 'fused_sgd', 'final']
    assert not [r for r in res['runs'] if 'failed' in r], stdout
    saved = {r['stage']: (Path(r['run_dir']) / 'config.yaml').read_text() for r in res['runs']}
    assert 'label_smoothing: 0.2' in saved['label_smoothing_0.2'] and 'label_smoothing: 0.1' in saved['base@E']
    assert 'fused_sgd: true' in saved['fused_sgd'] and 'fused_sgd: false' in saved['base@E']
    assert [r['epochs'] for r in res['runs']] == [2, 2, 2, 2, res['final']['epochs']]
    assert res['final']['recipe'][0] == f'training.epochs={res["final"]["epochs"]}'
    assert f'epochs: {res["final"]["epochs"]}' in saved['final']
    assert set(res['final']['gains']) == {'label_smoothing_0.2'}
    assert 'final recipe:' in stdout and (out / 'sweep.txt').read_text().strip() in stdout
    assert (out / 'sweep.png').read_bytes()[:4] == b'\x89PNG'
    name = [p.name for p in docs.iterdir()]
    assert len(name) == 1 and name[0] == f'{res["environment"]["date"][:10]}-cpu-sweep.json' or \
        name[0].startswith(res['environment']['date'][:10] + '-cpu-') and name[0].endswith('-sweep.json')
    assert json.loads((docs / name[0]).read_text())['environment']['torch'] == res['environment']['torch']
    assert (out / name[0]).is_file()


def _run(tmp_path: Path, stage: str, top1: float, epochs: int, process_s: float, epoch_s: float, **extra):
    """A made-up finished run with its metrics.jsonl (per-epoch seconds)."""
    d = tmp_path / stage
    d.mkdir()
    d.joinpath('metrics.jsonl').write_text(''.join(
        json.dumps({'epoch': e + 1, 'epoch_seconds': epoch_s, 'eval_seconds': 0.0}) + '\n' for e in range(epochs)))
    return {'stage': stage, 'final_top1': top1, 'epochs': epochs, 'process_seconds': process_s,
            'run_dir': str(d), 'time_to_target_s': 1.0, **extra}


def test_final_recipe_rules(tmp_path):
    """Gains over base@E above min_gain join (largest first, one lever per config key: lr_0.5
    loses to batch_1024, which also sets the LR); the epochs are the fewest whose interpolated
    base top-1 plus the gains clears target + margin; a speed lever joins only if its fixed
    cost plus per-epoch time beats base@E's at those epochs. Catches a lever with a clashing key
    let in, a loss counted as a gain, and compile's start-up cost ignored."""
    from bench.sweep import SweepPlan, choose_final
    runs = [_run(tmp_path, 'baseline', 0.752, 20, 60.0, 1.9),
            _run(tmp_path, 'base@E', 0.712, 12, 44.0, 1.9),
            _run(tmp_path, 'tta_translate', 0.717, 12, 46.0, 2.0),
            _run(tmp_path, 'ema', 0.710, 12, 44.0, 1.9),           # a loss: stays out
            _run(tmp_path, 'batch_1024', 0.722, 12, 40.0, 1.6),     # +1.0
            _run(tmp_path, 'lr_0.5', 0.716, 12, 44.0, 1.9),         # +0.4, but training.lr is taken
            _run(tmp_path, 'fused_sgd', 0.1, 3, 24.0, 1.7),          # fixed 18.9 s, faster epochs
            _run(tmp_path, 'compile', 0.1, 3, 60.0, 1.5)]            # fixed 55.5 s: does not pay
    plan = SweepPlan(config='tiny_cpu', final_epochs=[10, 12, 14, 16], margin=0.007)
    f = choose_final({'runs': runs}, plan, target=0.73)
    assert f['accuracy_levers'] == ['batch_1024', 'tta_translate']
    # base at 12 = 0.712 (+0.005 per epoch) + gains 0.015: 12 -> 0.727, 14 -> 0.737 >= 0.737
    assert f['predicted_top1'][14] == pytest.approx(0.737) and f['epochs'] == 14
    assert f['speed_levers'] == ['fused_sgd']
    assert f['predicted_seconds']['base@E'] == pytest.approx(44.0 - 12 * 1.9 + 14 * 1.9)
    assert f['recipe'] == ['training.epochs=14', 'data.batch_size=1024', 'training.lr=0.8',
                           'training.tta_translate=1', 'training.fused_sgd=true']


def test_the_final_leaves_out_speed_levers_its_optimizer_refuses(tmp_path):
    """Muon pays and so do the fused SGD and the CUDA graph: the final takes Muon and the fused
    SGD (Muon's SGD groups fuse) but not the CUDA graph, which the config refuses with Muon (a
    final stage of failed runs otherwise). Catches the speed levers chosen without the final's
    optimizer."""
    from bench.sweep import SweepPlan, choose_final
    runs = [_run(tmp_path, 'baseline', 0.752, 20, 60.0, 1.9), _run(tmp_path, 'base@E', 0.712, 12, 44.0, 1.9),
            _run(tmp_path, 'muon', 0.74, 12, 44.0, 1.9), _run(tmp_path, 'fused_sgd', 0.1, 3, 24.0, 1.7),
            _run(tmp_path, 'cuda_graph', 0.1, 3, 22.0, 1.2)]
    f = choose_final({'runs': runs}, SweepPlan(config='tiny_cpu', final_epochs=[10, 12]), target=0.73)
    assert f['accuracy_levers'] == ['muon'] and f['speed_levers'] == ['fused_sgd']
    assert 'training.optimizer=muon' in f['recipe'] and 'training.cuda_graph=true' not in f['recipe']


def test_budget_holds_time_back_for_the_final_stage(tmp_path, monkeypatch):
    """Every run "takes" 40 s: with 300 s, the levers run while the final's 3 x 40 s still fit
    after them (40 + 40 + 40 + 40 + 120 = 280), the rest are skipped,
    and the final runs its seeds; the JSON says the budget cut it. Catches a budget that lets
    the levers eat the final stage's time, and one that is ignored."""
    import bench.sweep as S
    clock = {'t': 0.0}
    monkeypatch.setattr(S.time, 'perf_counter', lambda: clock['t'])
    monkeypatch.setattr(S, 'environment', lambda device: {'device': 'cpu', 'torch': 'x', 'ffcv': 'y', 'date': '2026-12-01 10:00'})

    def fake_run(plan, recipe, seed, log):
        clock['t'] += 40.0
        ep = S._epochs(recipe, 2)
        d = tmp_path / f'r{clock["t"]:.0f}'
        d.mkdir()
        (d / 'metrics.jsonl').write_text(json.dumps({'epoch_seconds': 1.0, 'eval_seconds': 0.0}) + '\n')
        return {'recipe': recipe, 'seed': seed, 'process_seconds': 40.0, 'total_seconds': 39.0, 'epochs': ep,
                'final_top1': 0.5, 'best_top1': 0.5, 'time_to_target_s': None, 'target_top1': 0.73,
                'median_train_images_per_s': 100.0, 'curve': [(39.0, 0.5)], 'run_dir': str(d)}
    monkeypatch.setattr(S, 'run_one', fake_run)
    monkeypatch.setattr(S, 'plot', lambda *a: None)
    res = S.sweep(S.SweepPlan(config='tiny_cpu', lever_epochs=2, speed_epochs=2, final_epochs=[2],
                              seeds=3, budget_s=300, out=tmp_path / 'o'), log=lambda *_: None)
    stages = [r['stage'] for r in res['runs']]
    assert stages == ['baseline', 'base@E', 'muon', 'tta_translate', 'final', 'final', 'final']
    assert res['stopped_by_budget'] and clock['t'] == 280
    assert json.loads((tmp_path / 'o' / 'sweep.json').read_text())['runs'][-1]['stage'] == 'final'
