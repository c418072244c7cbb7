"""The project's changes to ffcv's own code (``ffcv_pipeline/ffcv_patches.py``) still fit the
installed ffcv: the version they were written against, and every internal name and line each
patch relies on. An ffcv upgrade that moves any of them fails here, naming the patch, rather
than as a hang or a silently different data order in training."""
import pytest

pytest.importorskip('ffcv.loader')

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
