"""Vision Transformer backbones for multi-channel cell images.

``CellViT`` is a timm ``VisionTransformer`` with any number of input channels, optional
register tokens, a learnable ``mask_token`` (for iBOT / masked inputs) and DINOv2's
position-embedding interpolation (bicubic with ``interpolate_offset``), so that imported
DINOv2 / Cell-DINO checkpoints give the reference outputs at any resolution.

``BagOfChannels`` embeds every channel separately with a 1-channel ``CellViT`` and
concatenates the per-channel embeddings (channel-adaptive Cell-DINO).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from phenoscope.core.compat import import_torchvision
from phenoscope.core.fastops import linear, linear_add, version_key

# timm imports torchvision; make a CUDA-only torchvision wheel importable on CPU torch first
# (no-op when torchvision loads normally).
import_torchvision()

from timm.models.vision_transformer import Block, VisionTransformer  # noqa: E402,F401  (Block: re-exported for MAE)

# name -> (embed_dim, depth, num_heads), as in dinov2 / timm.
ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}


@dataclass
class ViTConfig:
    """Backbone options. ``depth``/``embed_dim``/``num_heads`` of 0 take the ``arch`` preset."""

    arch: str = "vit_small"
    in_chans: int = 3
    patch_size: int = 16
    img_size: int = 224  # pixels; sets the size of the stored position-embedding grid
    num_registers: int = 0
    init_values: float | None = None  # layer-scale init (dinov2 trains with 1e-5); None = no layer scale
    drop_path_rate: float = 0.0
    interpolate_offset: float = 0.1
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    mlp_ratio: float = 4.0

    def resolved(self) -> ViTConfig:
        """Copy with the ``arch`` preset filled into zero-valued size fields; validates values."""
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; known: {sorted(ARCHS)}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1 pixel (dinov2 uses 14, Cell-DINO 8 or 16), got {self.patch_size}")
        if self.in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {self.in_chans}")
        dim, depth, heads = ARCHS[self.arch]
        return dataclasses.replace(
            self,
            embed_dim=self.embed_dim or dim,
            depth=self.depth or depth,
            num_heads=self.num_heads or heads,
        )


def interpolate_pos_embed_dinov2(
    pos_embed: torch.Tensor, height: int, width: int, patch_size: int, offset: float = 0.1
) -> torch.Tensor:
    """DINOv2's resampling of a square patch position grid to an image of ``height×width`` px.

    Args:
        pos_embed: (1, M*M, D) patch position embeddings (no class token).
        height, width: input image size in pixels.
    Returns:
        (1, (height // p) * (width // p), D) in ``pos_embed``'s dtype. Identity when the grid
        already matches and the image is square, exactly like the reference.
    """
    n, dim = pos_embed.shape[1], pos_embed.shape[2]
    m = int(math.sqrt(n))
    if m * m != n:
        raise ValueError(f"position grid must be square, got {n} positions")
    gh, gw = height // patch_size, width // patch_size
    if gh * gw == n and height == width:
        return pos_embed
    grid = pos_embed.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    scale = ((gh + offset) / m, (gw + offset) / m)
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")
    if grid.shape[-2:] != (gh, gw):
        raise ValueError(f"interpolated grid {tuple(grid.shape[-2:])} != expected {(gh, gw)}")
    return grid.permute(0, 2, 3, 1).reshape(1, gh * gw, dim).to(pos_embed.dtype)


class CellViT(VisionTransformer):
    """timm ViT with dinov2 token layout ``[cls, registers..., patches]`` and masked inputs; a
    :class:`phenoscope.nn.Backbone`.

    The class-token position embedding is folded into ``cls_token`` (timm's
    ``no_embed_class`` layout), so ``pos_embed`` holds patch positions only.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        cfg = cfg.resolved()
        super().__init__(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
            num_classes=0,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=True,
            init_values=cfg.init_values,
            class_token=True,
            no_embed_class=True,
            reg_tokens=cfg.num_registers,
            dynamic_img_size=True,
            drop_path_rate=cfg.drop_path_rate,
        )
        self.cfg = cfg
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.embed_dim))

    @property
    def n_prefix(self) -> int:
        return 1 + self.cfg.num_registers

    @property
    def patch_size(self) -> int:
        """Patch side in pixels (:class:`phenoscope.nn.Backbone`; ``embed_dim`` and ``in_chans`` are timm's)."""
        return self.cfg.patch_size

    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        return self.cfg.depth

    def forward_tokens(
        self, x: torch.Tensor, masks: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Normalised tokens of images ``x`` (B, C, H, W).

        Args:
            masks: optional bool (B, N) with N = (H//p)*(W//p); True patches are replaced by
                ``mask_token`` before the position embedding (iBOT / dinov2 semantics).
            keep: optional long (B, K) indices of the only patches to encode (MAE encoder).
        Returns:
            ``cls`` (B, D), ``registers`` (B, R, D), ``patches`` (B, N or K, D).
        """
        t = self.norm(self.blocks(self.input_tokens(x, masks, keep)))
        r = self.n_prefix
        return {"cls": t[:, 0], "registers": t[:, 1:r], "patches": t[:, r:]}

    def input_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) → (B, prefix + N, D) tokens entering the first block (see :meth:`forward_tokens`)."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"expected input (B, {self.cfg.in_chans}, H, W), got {tuple(x.shape)}")
        b, _, h, w = x.shape
        t = self.patch_embed(x).flatten(1, 2)  # (B, N, D)
        if masks is not None:
            if masks.shape != t.shape[:2]:
                raise ValueError(f"masks must have shape {tuple(t.shape[:2])}, got {tuple(masks.shape)}")
            t = torch.where(masks.unsqueeze(-1), self.mask_token.to(t.dtype).unsqueeze(0), t)
        pos = interpolate_pos_embed_dinov2(self.pos_embed, h, w, self.cfg.patch_size, self.cfg.interpolate_offset)
        t = t + pos
        if keep is not None:
            t = torch.gather(t, 1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        prefix = [self.cls_token.expand(b, -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(b, -1, -1))
        return self.norm_pre(torch.cat(prefix + [t], dim=1))

    def embed(self, x: torch.Tensor, n_last_blocks: int = 1) -> torch.Tensor:
        """Evaluation features (B, (n_last_blocks + 1)·D): the normed class token of each of the last
        ``n_last_blocks`` blocks (dinov2 linear-probe style), then the mean of the last block's patch tokens."""
        if not 1 <= n_last_blocks <= len(self.blocks):
            raise ValueError(f"n_last_blocks must be in 1..{len(self.blocks)}, got {n_last_blocks}")
        t = self.input_tokens(x)
        first_kept = len(self.blocks) - n_last_blocks
        blk0 = self.blocks[0]
        fast = not torch.is_grad_enabled() and isinstance(blk0.mlp.act, nn.GELU) and getattr(blk0.attn, "gate", None) is None
        cls = []
        for i, blk in enumerate(self.blocks):
            t = inference_block(blk, t) if fast else blk(t)
            if i >= first_kept:
                cls.append(self.norm(t[:, 0]))
        patches = self.norm(t[:, self.n_prefix :]).mean(dim=1)
        return torch.cat(cls + [patches], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(B, C, H, W) → class-token embedding (B, D)."""
        return self.forward_tokens(x)["cls"]


def _scaled_linear(layer: nn.Linear, layer_scale: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of ``layer_scale(layer(x))`` folded into one linear (γ·W, γ·b); cached on
    ``layer_scale`` until any of the tensors changes (``fastops.version_key``). The folded tensors
    are made outside inference mode, so that they have version counters and can be packed."""
    gamma = getattr(layer_scale, "gamma", None)
    if gamma is None:  # no layer scale (nn.Identity)
        return layer.weight, layer.bias
    tensors = (layer.weight, gamma) if layer.bias is None else (layer.weight, gamma, layer.bias)
    key = version_key(*tensors)
    cached = layer_scale.__dict__.get("_folded")
    if key is None or cached is None or cached[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            bias = None if layer.bias is None else layer.bias * gamma
            cached = (key, layer.weight * gamma[:, None], bias)
        if key is not None:
            layer_scale.__dict__["_folded"] = cached
    return cached[1], cached[2]


def inference_block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ``Block.forward`` without autograd: oneDNN linears on packed weights, the GELU fused
    into ``fc1``, layer scales folded into ``proj``/``fc2`` and the residual additions fused into their GEMMs."""
    attn, mlp = blk.attn, blk.mlp
    b, n, _ = x.shape
    qkv = linear(blk.norm1(x), attn.qkv, pack=True).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    y = F.scaled_dot_product_attention(attn.q_norm(q), attn.k_norm(k), v).transpose(1, 2).reshape(b, n, -1)
    x = linear_add(attn.norm(y), *_scaled_linear(attn.proj, blk.ls1), x)
    return linear_add(mlp.norm(linear(blk.norm2(x), mlp.fc1, gelu=True, pack=True)), *_scaled_linear(mlp.fc2, blk.ls2), x)


class BagOfChannels(nn.Module):
    """Channel-adaptive embedding: a 1-channel ``CellViT`` applied to every channel.

    ``forward`` maps (B, C, H, W) → (B, C*D): channel c's class token is in columns
    ``[c*D, (c+1)*D)``. Any number of channels is accepted.
    """

    def __init__(self, backbone: CellViT) -> None:
        super().__init__()
        if backbone.cfg.in_chans != 1:
            raise ValueError(f"bag-of-channels needs a 1-channel backbone, got in_chans={backbone.cfg.in_chans}")
        self.backbone = backbone

    def _per_channel(self, x: torch.Tensor, fn) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected (B, C, H, W), got {tuple(x.shape)}")
        b, c, h, w = x.shape
        emb = fn(x.reshape(b * c, 1, h, w))
        return emb.reshape(b, c * emb.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._per_channel(x, self.backbone)

    def embed(self, x: torch.Tensor, n_last_blocks: int = 1) -> torch.Tensor:
        """(B, C, H, W) → (B, C·F): :meth:`CellViT.embed` of every channel, concatenated in channel order."""
        return self._per_channel(x, lambda t: self.backbone.embed(t, n_last_blocks))
