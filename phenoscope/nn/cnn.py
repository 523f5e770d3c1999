"""A ResNet backbone for small cell crops (32–64 px), implementing :class:`phenoscope.nn.Backbone`.

timm's ResNet (BasicBlock) with a small-input stem: one 3×3 convolution of stride ``stem_stride``
and no max-pool, so a 40-px crop keeps a 5×5 (stride 1) or 3×3 (stride 2) last feature map instead
of ImageNet's 2×2 from a 7×7 stride-2 stem and a max-pool. The pooled last feature map acts as the
class token and its positions as the patch tokens. Masked-token objectives (iBOT, MAE) need a ViT
and say so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["CNNConfig", "CellCNN", "CNN_ARCHS"]

# name → (blocks per stage, channels per stage): timm's resnet10 / resnet18 and half-width versions
CNN_ARCHS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "resnet10": ((1, 1, 1, 1), (64, 128, 256, 512)),
    "resnet18": ((2, 2, 2, 2), (64, 128, 256, 512)),
    "resnet10-half": ((1, 1, 1, 1), (32, 64, 128, 256)),
    "resnet18-half": ((2, 2, 2, 2), (32, 64, 128, 256)),
}


@dataclass
class CNNConfig:
    """ResNet options: ``arch`` (a key of :data:`CNN_ARCHS`), input channels, stem stride (1 or 2).

    The default, a half-width ResNet-18 with a stride-2 stem, costs about as much per 40-px cell as the
    4-block ViT-tiny/8 (``benchmarks/bench_pretrain_step.py``); a full-width ResNet-18 with a stride-1
    stem costs about 15× more."""

    arch: str = "resnet18-half"
    in_chans: int = 3
    stem_stride: int = 2

    def __post_init__(self) -> None:
        if self.arch not in CNN_ARCHS:
            raise ValueError(f"unknown CNN arch {self.arch!r}; choose from {tuple(CNN_ARCHS)}")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {self.stem_stride}")


class CellCNN(nn.Module):
    """ResNet with a small-input stem; ``forward_tokens`` → ``cls`` (B, D) = mean of the last feature map,
    ``patches`` (B, h·w, D) = its positions (row-major). D = the last stage's channels; h = ⌈H / p⌉ with
    p = ``patch_size`` (the total stride), which equals the protocol's H // p when p divides H."""

    def __init__(self, cfg: CNNConfig) -> None:
        super().__init__()
        from timm.models.resnet import BasicBlock, ResNet

        layers, channels = CNN_ARCHS[cfg.arch]
        net = ResNet(BasicBlock, layers, num_classes=0, in_chans=cfg.in_chans, channels=channels,
                     global_pool="")
        stem = net.bn1.num_features  # timm's stem width (64), which the first stage expects
        net.conv1 = nn.Conv2d(cfg.in_chans, stem, 3, cfg.stem_stride, 1, bias=False)
        net.maxpool = nn.Identity()
        self.net, self.cfg = net, cfg
        self.embed_dim, self.in_chans, self.depth = channels[-1], cfg.in_chans, len(layers)
        self.patch_size = cfg.stem_stride * 8  # three stride-2 stages after the stem
        # the Backbone protocol's mask token; unused (frozen) since a CNN takes no masked tokens
        self.mask_token = nn.Parameter(torch.zeros(1, stem), requires_grad=False)

    def forward_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Images (B, C, H, W) → ``{"cls": (B, D), "patches": (B, N, D)}``."""
        if masks is not None:
            raise ValueError("a CNN backbone takes no masked tokens: iBOT and MAE need backbone = 'vit' "
                             "(set [augment] mask_probability = 0 for DINO)")
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        f = self.net.forward_features(x.contiguous(memory_format=torch.channels_last))  # (B, D, h, w); NHWC is faster on CPU
        patches = f.flatten(2).transpose(1, 2)
        return {"cls": patches.mean(1), "patches": patches}

    def embed(self, x: torch.Tensor, n_last_blocks: int = 1) -> torch.Tensor:
        """Evaluation features (B, D): the pooled last feature map (``n_last_blocks`` must be 1)."""
        if n_last_blocks != 1:
            raise ValueError("a CNN backbone has one embedding (n_last_blocks = 1)")
        return self.forward_tokens(x)["cls"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → pooled embedding (B, D)."""
        return self.forward_tokens(x)["cls"]
