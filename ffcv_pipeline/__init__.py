"""Data side of the project: a dataset (``datasets.py``: CIFAR-100, CIFAR-10, or a folder of the
user's images) -> FFCV ``.beton`` files (and uint8 arrays) -> loaders (FFCV, or a torch
DataLoader where ffcv is missing).

Importing this package is cheap and does not import ffcv, numba or OpenCV (the Gradio app and
the ffcv-free loader read from here). The ffcv-dependent parts live in ``writer`` (``.beton``
part), ``beton``, ``ops`` and ``loaders`` and are imported explicitly.
"""
__all__ = ['ffcv_import_error', 'ffcv_version', 'load_ffcv']


def load_ffcv() -> None:
    """Import ffcv (written against ffcv 1.0.2) ~2.5 s sooner than a plain ``import ffcv``.

    ``ffcv/fields/rgb_image.py`` builds ``IMAGE_MODES = numba.typed.Dict()`` at import, which
    compiles numba's typed-dict machinery: 2.3-2.8 s on our 2-core machine, in every process that
    imports ffcv (ffcv's own modules all import it). The table maps 'jpg'/'raw' to 0/1 and is only
    read from Python (``generate_code`` captures the ints; ``encode`` runs in Python), so a plain
    dict behaves the same: ``numba.typed.Dict`` is ``dict`` for the duration of that one import.
    Every module of ours that imports ffcv calls this first; tests/test_loaders.py checks the
    assumption (a plain dict with those two entries, numba's Dict restored). It also applies
    patch 5 of ``ffcv_patches`` (ffcv leaves torch's thread count alone)."""
    import sys
    import torch
    # ffcv's import sets torch's thread count to 1 (ffcv_patches, patch 5): what it is now is
    # torch's own count, unless ffcv was imported before (then it is not known, and left alone)
    torch_threads = None if 'ffcv.pipeline.compiler' in sys.modules else torch.get_num_threads()
    if 'ffcv.fields.rgb_image' not in sys.modules:
        import numba.typed
        saved = vars(numba.typed).get('Dict')  # numba loads its Dict lazily: maybe not yet there
        numba.typed.Dict = dict
        try:
            import ffcv.fields.rgb_image  # noqa: F401
        finally:
            if saved is None:
                del numba.typed.Dict
            else:
                numba.typed.Dict = saved
    import ffcv.loader  # noqa: F401
    from .ffcv_patches import keep_torch_threads
    keep_torch_threads(torch_threads)


def ffcv_import_error() -> str | None:
    """None if ffcv (and its compiled helper, numba, OpenCV) imports here, else why not."""
    try:
        load_ffcv()
    except Exception as e:  # ImportError, or a broken build's OSError/AttributeError
        return f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
    return None


def ffcv_version() -> str:
    """ffcv's version from its package metadata, else ``ffcv.__version__`` (marked: ffcv 1.0.2's
    says 0.0.3rc1), else 'unknown' (a copied-in ffcv may lack the metadata)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version('ffcv')
    except PackageNotFoundError:
        try:
            import ffcv
        except Exception:
            return 'not installed'
        v = getattr(ffcv, '__version__', None)
        return f'{v} (ffcv.__version__)' if v else 'unknown'
