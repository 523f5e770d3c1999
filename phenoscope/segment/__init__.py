"""Cellpose-SAM segmentation: flow fields ↔ masks, networks, tiled inference, classical baseline.

Public names
------------
masks_to_flows(masks)                     label image → unit diffusion flows
compute_masks(dP, cellprob, ...)          network flows + cellprob → label image
MaskOptions                               the dynamics options (thresholds, size filters)
segment_classic(image, ...)               Otsu + distance-transform watershed baseline
load_model(name_or_path, device=None)     a :class:`CellposeSAM` ready for ``.segment(image)``
with_classes(net, k), class_loss, ...     semantic classes (:mod:`phenoscope.segment.semantic`): class maps,
                                          targets, the per-mask vote, per-class metrics

Subpackages: ``preprocess`` (axes, channels, normalisation), ``inference`` (tiled prediction),
``training`` (data, augmentations, objective, :func:`train_segmentation`), ``checkpoint``, ``outputs``.
"""

from phenoscope.segment.classic import segment_classic
from phenoscope.segment.dynamics import compute_masks
from phenoscope.segment.flows import masks_to_flows
from phenoscope.segment.options import MaskOptions

_INFERENCE = ("CellposeSAM", "SegmentResult", "load_model")
_SEMANTIC = ("ClassMetrics", "class_image", "class_loss", "class_metrics", "class_weights", "segment_classes",
             "target_from_class_image", "target_from_table", "vote_classes", "with_classes")

__all__ = ["CellposeSAM", "MaskOptions", "SegmentResult", "compute_masks", "load_model", "masks_to_flows", "segment_classic",
           *_SEMANTIC]


def __getattr__(name: str):
    # The network stack (timm, the checkpoint readers) loads on first use.
    if name in _INFERENCE:
        from phenoscope.segment import inference

        return getattr(inference, name)
    if name in _SEMANTIC:
        from phenoscope.segment import semantic

        return getattr(semantic, name)
    raise AttributeError(f"module 'phenoscope.segment' has no attribute {name!r}")
