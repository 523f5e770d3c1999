"""Network building blocks shared by the SSL and segmentation stacks: the :class:`Backbone` protocol."""

from phenoscope.nn.backbone import Backbone, check_backbone

__all__ = ["Backbone", "check_backbone"]
