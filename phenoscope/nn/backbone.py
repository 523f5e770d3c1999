"""The backbone seam: what a self-supervised objective may use of the network it trains.

Any ``nn.Module`` with these members is a :class:`Backbone`: the SSL ViT
(:class:`phenoscope.ssl.backbone.CellViT`) and the Cellpose-SAM encoder
(:class:`phenoscope.segment.net.Encoder`, every variant from ``nano`` to ``large``). The objectives in
:mod:`phenoscope.ssl` use nothing else, so every SSL method can pretrain either network.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Backbone(Protocol):
    """A token-producing image encoder.

    Attributes:
        embed_dim: width D of the ``cls`` and ``patches`` outputs.
        patch_size: side of one patch in pixels; an (H, W) input gives N = (H // p) · (W // p) patches.
        in_chans: number of input channels C.
        depth: number of transformer blocks (for layer-wise learning-rate decay).
        mask_token: learnable (1, W) token (W: the width of the patch embedding) that replaces masked
            patches before the position embedding (iBOT / SimMIM semantics).
    """

    embed_dim: int
    patch_size: int
    in_chans: int
    depth: int
    mask_token: nn.Parameter

    def forward_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Images (B, C, H, W) → ``{"cls": (B, D), "patches": (B, N, D)}`` (patches in row-major order).

        ``masks``: optional bool (B, N); True patches are replaced by ``mask_token``. A backbone may also
        take ``keep`` (long (B, K): encode only these patches, ``patches`` is then (B, K, D)), which MAE needs.
        """
        ...


def check_backbone(module: object) -> Backbone:
    """``module`` itself if it implements :class:`Backbone`; ``TypeError`` naming what it lacks otherwise."""
    if not isinstance(module, Backbone):
        missing = [name for name in ("embed_dim", "patch_size", "in_chans", "depth", "mask_token", "forward_tokens")
                   if not hasattr(module, name)]
        raise TypeError(f"{type(module).__name__} is not a Backbone: it lacks {missing}")
    return module
