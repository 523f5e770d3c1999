"""SimCLR: backbone CLS → 2-layer BN projector → NT-Xent between the two global views.

Batch: ``global`` (2B, C, H, W), view-major (``phenoscope.ssl.data.MultiCropCollate``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from phenoscope.nn.backbone import Backbone
from phenoscope.ssl.heads import mlp
from phenoscope.ssl.losses import nt_xent_loss
from phenoscope.ssl.registry import Method, Objective, register
from phenoscope.train.loop import Progress


@dataclass
class SimCLRConfig:
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    temperature: float = 0.1


class SimCLR(Objective):
    """Backbone CLS → 2-layer BN projector → NT-Xent between the two views."""

    def __init__(self, backbone: Backbone, cfg: SimCLRConfig) -> None:
        super().__init__()
        self.backbone, self.cfg = backbone, cfg
        self.projector = mlp(backbone.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, 2, batch_norm=True)
        self._freeze_mask_token()

    def forward(self, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        z = self.projector(self.backbone.forward_tokens(batch["global"])["cls"])
        z1, z2 = z.chunk(2)
        return {"loss": nt_xent_loss(z1, z2, self.cfg.temperature)}


METHOD = register(Method("simclr", SimCLRConfig, lambda backbone, cfg, global_size: SimCLR(backbone, cfg)))
