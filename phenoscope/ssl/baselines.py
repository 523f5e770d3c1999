"""Baseline objectives on the same loop and augmentations: SimCLR, MoCo v3 (+ v2 queue), MAE.

SimCLR and MoCo read the two global views (``batch["global"]``, (2B, C, H, W) view-major);
MAE reconstructs the first global view. Each objective exposes ``backbone`` for export.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from phenoscope.ssl.backbone import Block, CellViT
from phenoscope.ssl.heads import mlp
from phenoscope.ssl.losses import gather_keys, info_nce_loss, mae_loss, nt_xent_loss, patchify
from phenoscope.train.loop import Progress
from phenoscope.train.optim import param_groups
from phenoscope.train.schedules import cosine_schedule, ema_update


@dataclass
class SimCLRConfig:
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    temperature: float = 0.1


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


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    decoder_dim: int = 256
    decoder_depth: int = 4
    decoder_heads: int = 8
    norm_pix_loss: bool = True


def _views(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["global"].chunk(2)


class _Objective(nn.Module):
    """Shared pieces: default parameter groups; ``mask_token`` is unused by these methods."""

    backbone: CellViT

    def _freeze_unused(self) -> None:
        self.backbone.mask_token.requires_grad_(False)

    def param_groups(self) -> list[dict]:
        return param_groups(self.named_parameters())


class SimCLR(_Objective):
    """Backbone CLS → 2-layer BN projector → NT-Xent between the two views."""

    def __init__(self, backbone: CellViT, cfg: SimCLRConfig) -> None:
        super().__init__()
        self.backbone, self.cfg = backbone, cfg
        self.projector = mlp(backbone.cfg.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, 2, batch_norm=True)
        self._freeze_unused()

    def forward(self, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        z = self.projector(self.backbone(batch["global"]))
        z1, z2 = z.chunk(2)
        return {"loss": nt_xent_loss(z1, z2, self.cfg.temperature)}


class MoCo(_Objective):
    """MoCo v3: query encoder + predictor vs EMA key encoder, symmetrised InfoNCE."""

    def __init__(self, backbone: CellViT, cfg: MoCoConfig) -> None:
        super().__init__()
        self.backbone, self.cfg = backbone, cfg
        self._freeze_unused()
        self.projector = mlp(backbone.cfg.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, 3, batch_norm=True)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, 2, batch_norm=True)
        self.key_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=-1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.key_projector(self.key_backbone(x))

    def forward(self, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        g = batch["global"]
        q1, q2 = self.predictor(self.projector(self.backbone(g))).chunk(2)
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


class MAE(_Objective):
    """Masked autoencoder: encode visible patches, decode all, regress masked pixels."""

    def __init__(self, backbone: CellViT, cfg: MAEConfig, img_size: int) -> None:
        super().__init__()
        self.backbone, self.cfg = backbone, cfg
        self._freeze_unused()
        p, c, dim = backbone.cfg.patch_size, backbone.cfg.in_chans, backbone.cfg.embed_dim
        self.n_patches = (img_size // p) ** 2
        self.decoder_embed = nn.Linear(dim, cfg.decoder_dim)
        self.decoder_mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.decoder_pos = nn.Parameter(torch.randn(1, 1 + self.n_patches, cfg.decoder_dim) * 0.02)
        self.decoder = nn.Sequential(*[Block(cfg.decoder_dim, cfg.decoder_heads, qkv_bias=True) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, p * p * c)
        nn.init.normal_(self.decoder_mask_token, std=0.02)

    def forward(self, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        x = _views(batch)[0]
        b, n = x.shape[0], self.n_patches
        if (x.shape[-2] // self.backbone.cfg.patch_size) ** 2 != n:
            raise ValueError(f"MAE was built for {n} patches per image, got input {tuple(x.shape)}")
        n_keep = max(1, int(round(n * (1 - self.cfg.mask_ratio))))
        order = torch.rand(b, n, device=x.device).argsort(dim=1)
        keep = order[:, :n_keep]
        tokens = self.backbone.forward_tokens(x, keep=keep)
        vis = self.decoder_embed(torch.cat([tokens["cls"][:, None], tokens["patches"]], dim=1))
        full = self.decoder_mask_token.expand(b, n, -1).clone()
        full.scatter_(1, keep[..., None].expand(-1, -1, full.shape[-1]), vis[:, 1:])
        dec = torch.cat([vis[:, :1], full], dim=1) + self.decoder_pos
        pred = self.decoder_pred(self.decoder_norm(self.decoder(dec)))[:, 1:]
        masked = torch.ones(b, n, device=x.device).scatter_(1, keep, 0.0)
        return {"loss": mae_loss(pred, patchify(x, self.backbone.cfg.patch_size), masked, self.cfg.norm_pix_loss)}
