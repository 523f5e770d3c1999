"""Masked autoencoder: encode the visible patches of the first global view, decode all, regress the
masked pixels.

Batch: ``global`` (2B, C, H, W), view-major (``phenoscope.ssl.data.MultiCropCollate``). MAE needs a
backbone whose ``forward_tokens`` also takes ``keep`` (indices of the only patches to encode), as
:class:`phenoscope.ssl.backbone.CellViT` and the Cellpose-SAM ``Encoder`` do.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from phenoscope.nn.backbone import Backbone
from phenoscope.ssl.backbone import Block
from phenoscope.ssl.losses import mae_loss, patchify
from phenoscope.ssl.registry import Method, Objective, register
from phenoscope.train.loop import Progress


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    decoder_dim: int = 256
    decoder_depth: int = 4
    decoder_heads: int = 8
    norm_pix_loss: bool = True


class MAE(Objective):
    """Masked autoencoder: encode visible patches, decode all, regress masked pixels."""

    def __init__(self, backbone: Backbone, cfg: MAEConfig, img_size: int) -> None:
        super().__init__()
        if "keep" not in inspect.signature(backbone.forward_tokens).parameters:
            raise ValueError(f"MAE needs a backbone that encodes a subset of patches (forward_tokens(x, keep=...)); "
                             f"{type(backbone).__name__} does not: use another method")
        self.backbone, self.cfg = backbone, cfg
        self._freeze_mask_token()
        p, c, dim = backbone.patch_size, backbone.in_chans, backbone.embed_dim
        self.n_patches = (img_size // p) ** 2
        self.decoder_embed = nn.Linear(dim, cfg.decoder_dim)
        self.decoder_mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.decoder_pos = nn.Parameter(torch.randn(1, 1 + self.n_patches, cfg.decoder_dim) * 0.02)
        self.decoder = nn.Sequential(*[Block(cfg.decoder_dim, cfg.decoder_heads, qkv_bias=True) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, p * p * c)
        nn.init.normal_(self.decoder_mask_token, std=0.02)

    def forward(self, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        x = batch["global"].chunk(2)[0]
        b, n = x.shape[0], self.n_patches
        if (x.shape[-2] // self.backbone.patch_size) ** 2 != n:
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
        return {"loss": mae_loss(pred, patchify(x, self.backbone.patch_size), masked, self.cfg.norm_pix_loss)}


METHOD = register(Method("mae", MAEConfig, lambda backbone, cfg, global_size: MAE(backbone, cfg, global_size)))
