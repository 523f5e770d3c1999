"""MoCo v3 (query encoder + predictor vs EMA key encoder, symmetrised InfoNCE), with MoCo v2-style
negatives from a key queue when ``queue_size`` > 0.

Batch: ``global`` (2B, C, H, W), view-major (``phenoscope.ssl.data.MultiCropCollate``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from phenoscope.nn.backbone import Backbone
from phenoscope.ssl.heads import mlp
from phenoscope.ssl.losses import gather_keys, info_nce_loss
from phenoscope.ssl.registry import Method, Objective, register
from phenoscope.train.loop import Progress
from phenoscope.train.schedules import cosine_schedule, ema_update


@dataclass
class MoCoConfig:
    """MoCo v3; ``queue_size`` > 0 switches to MoCo v2-style negatives from a key queue."""

    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    pred_hidden_dim: int = 4096
    temperature: float = 0.2
    momentum: float = 0.99
    final_momentum: float = 1.0
    queue_size: int = 0


class MoCo(Objective):
    """MoCo v3: query encoder + predictor vs EMA key encoder, symmetrised InfoNCE."""

    def __init__(self, backbone: Backbone, cfg: MoCoConfig) -> None:
        super().__init__()
        self.backbone, self.cfg = backbone, cfg
        self._freeze_mask_token()
        self.projector = mlp(backbone.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, 3, batch_norm=True)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, 2, batch_norm=True)
        self.key_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=-1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.key_projector(self.key_backbone.forward_tokens(x)["cls"])

    def forward(self, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        g = batch["global"]
        q1, q2 = self.predictor(self.projector(self.backbone.forward_tokens(g)["cls"])).chunk(2)
        k1, k2 = self._keys(g).chunk(2)
        t = self.cfg.temperature
        if self.cfg.queue_size:  # MoCo v2: negatives from the queue, which takes every rank's keys
            queue = self.queue.clone()
            loss = info_nce_loss(q1, k2, t, queue) + info_nce_loss(q2, k1, t, queue)
            self._enqueue(F.normalize(gather_keys(torch.cat([k1, k2]))[0].float(), dim=-1))
        else:  # MoCo v3: negatives are the keys of the whole global batch (all DDP ranks)
            (k1_all, offset), (k2_all, _) = gather_keys(k1), gather_keys(k2)
            loss = info_nce_loss(q1, k2_all, t, offset=offset) + info_nce_loss(q2, k1_all, t, offset=offset)
        return {"loss": loss}

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        n, size = keys.shape[0], self.cfg.queue_size
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_(int((self.queue_ptr + n) % size))

    def on_step_end(self, progress: Progress) -> None:
        m = cosine_schedule(progress.step, progress.total_steps, self.cfg.momentum, self.cfg.final_momentum)
        ema_update(self.key_backbone, self.backbone, m)
        ema_update(self.key_projector, self.projector, m)


METHOD = register(Method("mocov3", MoCoConfig, lambda backbone, cfg, global_size: MoCo(backbone, cfg)))
