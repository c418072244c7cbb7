"""Models for 32x32 inputs. Nothing here knows about data: ``num_classes`` is an argument.

The names below import on first use (PEP 562): ``model.errors`` and ``model.fileio`` are
standard library only, and the app imports them without pulling in torch."""

__all__ = ['ARCHS', 'ResNet', 'build_model', 'count_parameters']


def __getattr__(name):
    if name in __all__:
        from . import resnet
        return getattr(resnet, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
