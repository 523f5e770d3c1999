"""BYOL (Grill et al. 2020): online backbone → projector → predictor regresses the EMA target network's
projection of the other view; symmetrised, no negatives.

Batch: ``global`` (2B, C, H, W), view-major (``phenoscope.ssl.data.MultiCropCollate``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from phenoscope.nn.backbone import Backbone
from phenoscope.ssl.heads import mlp
from phenoscope.ssl.registry import Method, Objective, register
from phenoscope.train.loop import Progress
from phenoscope.train.schedules import cosine_schedule, ema_update


@dataclass
class BYOLConfig:
    """BYOL options (the paper's 4096 → 256 heads; target EMA from ``momentum`` to ``final_momentum``)."""

    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    pred_hidden_dim: int = 4096
    momentum: float = 0.99
    final_momentum: float = 1.0


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean of ``2 - 2 cos(p, z)`` over the batch; ``z`` (the target) carries no gradient. (B, D), (B, D) → ()."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


class BYOL(Objective):
    """Online network (backbone, 2-layer BN projector, 2-layer BN predictor) and its EMA target."""

    def __init__(self, backbone: Backbone, cfg: BYOLConfig) -> None:
        super().__init__()
        self.backbone, self.cfg = backbone, cfg
        self._freeze_mask_token()
        self.projector = mlp(backbone.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, 2, batch_norm=True)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, 2, batch_norm=True)
        self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def forward(self, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        g = batch["global"]
        p1, p2 = self.predictor(self.projector(self.backbone.forward_tokens(g)["cls"])).chunk(2)
        with torch.no_grad():
            z1, z2 = self.target_projector(self.target_backbone.forward_tokens(g)["cls"]).chunk(2)
        return {"loss": byol_loss(p1, z2) + byol_loss(p2, z1)}

    def on_step_end(self, progress: Progress) -> None:
        m = cosine_schedule(progress.step, progress.total_steps, self.cfg.momentum, self.cfg.final_momentum)
        ema_update(self.target_backbone, self.backbone, m)
        ema_update(self.target_projector, self.projector, m)


METHOD = register(Method("byol", BYOLConfig, lambda backbone, cfg, global_size: BYOL(backbone, cfg)))
