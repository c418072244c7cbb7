"""Data side of the project: a dataset (``datasets.py``: CIFAR-100, CIFAR-10, or a folder of the
user's images) -> FFCV ``.beton`` files (and uint8 arrays) -> loaders (FFCV, or a torch
DataLoader where ffcv is missing).

Importing this package is cheap and does not import ffcv, numba or OpenCV (the Gradio app and
the ffcv-free loader read from here). The ffcv-dependent parts live in ``writer`` (``.beton``
part), ``beton``, ``ops`` and ``loaders`` and are imported explicitly.
"""
__all__ = ['ffcv_import_error', 'ffcv_version', 'load_ffcv']


def load_ffcv() -> None:
    """Import ffcv (written against ffcv 1.0.2) as this project needs it: seconds sooner than a
    plain ``import ffcv`` (patch 0 of ``ffcv_patches``: no numba typed-dict compilation at
    import), and leaving torch's thread count alone (patch 5). Every module of ours that imports
    ffcv calls this first."""
    import sys
    import torch
    from .ffcv_patches import import_ffcv_without_typed_dict, keep_torch_threads
    # ffcv's import sets torch's thread count to 1 (ffcv_patches, patch 5): what it is now is
    # torch's own count, unless ffcv was imported before (then it is not known, and left alone)
    torch_threads = None if 'ffcv.pipeline.compiler' in sys.modules else torch.get_num_threads()
    import_ffcv_without_typed_dict()
    import ffcv.loader  # noqa: F401
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
