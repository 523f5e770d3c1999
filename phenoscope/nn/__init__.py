"""Network building blocks shared by the SSL and segmentation stacks: the :class:`Backbone` protocol
and the small-input ResNet (:mod:`phenoscope.nn.cnn`)."""

from phenoscope.nn.backbone import Backbone, check_backbone
from phenoscope.nn.cnn import CNN_ARCHS, CellCNN, CNNConfig

__all__ = ["Backbone", "CNN_ARCHS", "CNNConfig", "CellCNN", "check_backbone"]
