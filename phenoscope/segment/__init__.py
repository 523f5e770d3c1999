"""Cellpose-SAM segmentation: flow fields ↔ masks, networks, tiled inference, classical baseline.

Public names
------------
masks_to_flows(masks)                     label image → unit diffusion flows
compute_masks(dP, cellprob, ...)          network flows + cellprob → label image
segment_classic(image, ...)               Otsu + distance-transform watershed baseline
load_model(name_or_path, device=None)     a Cellpose-SAM network ready for ``.segment(image)``
"""

from phenoscope.segment.classic import segment_classic
from phenoscope.segment.dynamics import compute_masks
from phenoscope.segment.flows import masks_to_flows

__all__ = ["compute_masks", "load_model", "masks_to_flows", "segment_classic"]


def __getattr__(name: str):
    # The network stack imports torch/timm; keep ``import phenoscope.segment`` light.
    if name == "load_model":
        from phenoscope.segment.inference import load_model

        return load_model
    raise AttributeError(f"module 'phenoscope.segment' has no attribute {name!r}")
