"""The project's changes to ffcv's own code (``ffcv_pipeline/ffcv_patches.py``) still fit the
installed ffcv: the version they were written against, and every internal name and line each
patch relies on. An ffcv upgrade that moves any of them fails here, naming the patch, rather
than as a hang or a silently different data order in training."""
import pytest

from ffcv_pipeline import ffcv_import_error

# ffcv imported as the project imports it (load_ffcv): a plain `import ffcv` here, at collection,
# would set torch's thread count for every test in the session (patch 5)
if ffcv_import_error():
    pytest.skip(f'ffcv not importable: {ffcv_import_error()}', allow_module_level=True)

from ffcv_pipeline import ffcv_patches  # noqa: E402


def test_every_patch_still_fits_the_installed_ffcv():
    problems = ffcv_patches.check()
    assert not problems, 'ffcv changed under ffcv_pipeline/ffcv_patches.py:\n' + '\n'.join(problems)


def test_loader_patches_are_applied_once_and_keep_ffcvs_own_run():
    """Applying twice (or reloading the module) wraps ffcv's own ``run``, never a wrapper."""
    import importlib

    import ffcv.loader.epoch_iterator as ei
    import ffcv_pipeline.loaders  # noqa: F401  (applies them)
    original = ei.EpochIterator.run.ffcv_run
    assert original.__module__ == 'ffcv.loader.epoch_iterator'
    ffcv_patches.apply_loader_patches()
    importlib.reload(ffcv_patches).apply_loader_patches()
    assert ei.EpochIterator.run.ffcv_run is original
    assert ei.Queue.__module__ == 'ffcv_pipeline.ffcv_patches'
    assert ffcv_patches.check() == []


def test_check_names_a_moved_internal(monkeypatch):
    """The check reads ffcv's source: a changed line is reported, with the patch it breaks."""
    import ffcv.writer
    monkeypatch.delattr(ffcv.writer, 'Process')
    assert any(p.startswith('3: ') and 'Process' in p for p in ffcv_patches.check())



def test_ffcv_leaves_torchs_thread_count_alone(synthetic_betons):
    """Patch 5: building an FFCV loader with 1 worker and running into its epoch leave torch's
    intra-op thread count as it was; numba's follows the loader. (ffcv set torch's to the
    loader's workers, and to 1 on import: a run in a process that had imported ffcv trained on
    1 thread, and to other weights than the same run in a fresh process.)"""
    import numba
    import torch

    from ffcv_pipeline.data import build_data
    from training.config import load_config
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = load_config('tiny_cpu', [f'data.train_path={synthetic_betons / "cifar100_train.beton"}',
                                       f'data.test_path={synthetic_betons / "cifar100_test.beton"}',
                                       'data.loader=ffcv', 'data.num_workers=1'])
        data = build_data(cfg, device=torch.device('cpu'), dtype=torch.float32, root=synthetic_betons, workers=1)
        try:
            data.warm_up()
        finally:
            data.close()
        assert (torch.get_num_threads(), numba.get_num_threads()) == (2, 1)
    finally:
        torch.set_num_threads(before)
