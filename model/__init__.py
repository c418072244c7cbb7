"""Models for 32x32 inputs. Nothing here knows about data: ``num_classes`` is an argument.

Importing the package is free: ``model.project``, ``model.errors`` and ``model.fileio`` (standard library only)
serve the data side and the torch-free app; the names below import torch when first used.
"""
from importlib import import_module

_EXPORTS = {'ARCHS': 'registry', 'build_model': 'registry', 'use_channels_last': 'registry',
            'ResNet': 'resnet', 'count_parameters': 'resnet'}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(import_module(f'.{_EXPORTS[name]}', __name__), name)
