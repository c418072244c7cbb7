"""Data side of the project: CIFAR-100 archives -> FFCV ``.beton`` files -> FFCV loaders.

Importing this package is cheap and does not import ffcv, numba or OpenCV (the Gradio app
reads the constants from here). The ffcv-dependent parts live in ``writer``, ``ops`` and
``loaders`` and are imported explicitly.
"""
from .constants import (CIFAR100_MEAN, CIFAR100_STD, COARSE_LABEL_NAMES,
                        FINE_LABEL_NAMES, FINE_TO_COARSE)

__all__ = ['CIFAR100_MEAN', 'CIFAR100_STD', 'FINE_LABEL_NAMES', 'COARSE_LABEL_NAMES',
           'FINE_TO_COARSE']
