"""Models for 32x32 inputs. Nothing here knows about data: ``num_classes`` is an argument."""
from .resnet import ARCHS, ResNet, build_model, count_parameters

__all__ = ['ARCHS', 'ResNet', 'build_model', 'count_parameters']
