"""Cell-image augmentations (Cell-DINO): crops, shifts, flips, per-channel intensity jitter, channel drop,
protein-channel rescale and self-normalisation. No blur, solarisation or grayscale.

Every function takes a float tensor (C, H, W) and a ``torch.Generator`` and returns a new tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    """Multi-crop and intensity augmentation options (sizes in pixels)."""

    global_size: int = 224
    local_size: int = 96
    n_local: int = 8  # 0 switches local crops off
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    max_shift: int = 0  # random translation of up to this many pixels per axis (reflect padding); 0 = off
    flip_p: float = 0.5  # each of horizontal / vertical
    rot90: bool = True
    normalize: str = "channel"  # self-normalisation "channel" / "image", or fixed "dataset" statistics
    channel_mean: list[float] | None = None  # "dataset" mode; filled from the data when None
    channel_std: list[float] | None = None
    jitter_p: float = 0.8  # per channel
    brightness: float = 0.2  # additive, in units of the normalised intensity
    contrast: float = 0.2  # multiplicative factor in [1 - c, 1 + c]
    channel_drop_p: float = 0.2  # zero out one random channel (needs >= 2 channels)
    protein_channel: int | None = None
    protein_scale: tuple[float, float] = (0.5, 1.5)
    protein_p: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # iBOT block-mask ratio range
    mask_probability: float = 0.5  # fraction of global crops that get masks


def _uniform(g: torch.Generator, lo: float, hi: float, n: int = 1) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def random_resized_crop(
    x: torch.Tensor, size: int, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator
) -> torch.Tensor:
    """torchvision ``RandomResizedCrop`` semantics (10 tries, then a central crop); bilinear, antialiased."""
    _, h, w = x.shape
    area = h * w
    box = None
    for _ in range(10):
        target = area * _uniform(g, *scale).item()
        aspect = math.exp(_uniform(g, math.log(ratio[0]), math.log(ratio[1])).item())
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            box = (top, left, ch, cw)
            break
    if box is None:
        side = min(h, w)
        box = ((h - side) // 2, (w - side) // 2, side, side)
    top, left, ch, cw = box
    return resize(x[None, :, top : top + ch, left : left + cw], size)[0]


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) → (B, C, size, size), bilinear and antialiased: the resampling of every view."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Translate (C, H, W) by integers dy, dx uniform in [-max_shift, max_shift], the uncovered border
    reflected (no resampling, so the pixel scale is kept); ``max_shift`` 0 returns ``x`` and draws nothing."""
    if max_shift <= 0:
        return x
    _, h, w = x.shape
    if max_shift >= min(h, w):
        raise ValueError(f"max_shift {max_shift} must be smaller than the view ({h}x{w})")
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=g))
    padded = F.pad(x[None], (max_shift,) * 4, mode="reflect")[0]
    top, left = max_shift - dy, max_shift - dx
    return padded[:, top : top + h, left : left + w]


def random_flip_rot(x: torch.Tensor, flip_p: float, rot90: bool, g: torch.Generator) -> torch.Tensor:
    """Random horizontal / vertical flips and (optionally) a random multiple of 90° rotation."""
    if torch.rand(1, generator=g).item() < flip_p:
        x = x.flip(-1)
    if torch.rand(1, generator=g).item() < flip_p:
        x = x.flip(-2)
    if rot90 and x.shape[-1] == x.shape[-2]:
        x = torch.rot90(x, int(torch.randint(0, 4, (1,), generator=g)), dims=(-2, -1))
    return x


def self_normalize(x: torch.Tensor, mode: str = "channel", eps: float = 1e-6) -> torch.Tensor:
    """Zero mean, unit std per channel (``"channel"``) or over the whole image (``"image"``)."""
    if mode not in ("channel", "image"):
        raise ValueError(f"normalize must be 'channel' or 'image', got {mode!r}")
    dims = (-2, -1) if mode == "channel" else (-3, -2, -1)
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True)
    return (x - mean) / (std + eps)


def normalize_input(
    x: torch.Tensor, mode: str, channel_mean: list[float] | None = None, channel_std: list[float] | None = None
) -> torch.Tensor:
    """Self-normalise (``channel`` / ``image``) or apply fixed per-channel ``dataset`` statistics to
    (..., C, H, W) images. ``dataset`` keeps absolute intensities comparable between images (e.g. DNA content)."""
    if mode != "dataset":
        return self_normalize(x, mode)
    c = x.shape[-3]
    if channel_mean is None or channel_std is None or len(channel_mean) != c or len(channel_std) != c:
        raise ValueError(f"normalize='dataset' needs channel_mean/channel_std with {c} entries")
    mean = torch.tensor(channel_mean, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(channel_std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - mean) / std


def normalize_view(x: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """:func:`normalize_input` with the mode and statistics of ``cfg``."""
    return normalize_input(x, cfg.normalize, cfg.channel_mean, cfg.channel_std)


def jitter_channels(x: torch.Tensor, p: float, brightness: float, contrast: float, g: torch.Generator) -> torch.Tensor:
    """Per channel, with probability ``p``: ``x_c ← (x_c - mean_c) * a + mean_c + b``."""
    c = x.shape[0]
    on = (torch.rand(c, generator=g) < p).float()
    a = 1 + on * _uniform(g, -contrast, contrast, c)
    b = on * _uniform(g, -brightness, brightness, c)
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (x - mean) * a[:, None, None] + mean + b[:, None, None]


def drop_channel(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """With probability ``p`` zero out one uniformly chosen channel (images with ≥ 2 channels)."""
    if x.shape[0] < 2 or torch.rand(1, generator=g).item() >= p:
        return x
    x = x.clone()
    x[int(torch.randint(0, x.shape[0], (1,), generator=g))] = 0
    return x


def rescale_channel(x: torch.Tensor, channel: int | None, scale: tuple[float, float], p: float, g: torch.Generator) -> torch.Tensor:
    """With probability ``p`` multiply ``channel`` (e.g. the protein stain) by ``uniform(scale)``."""
    if channel is None or torch.rand(1, generator=g).item() >= p:
        return x
    if not 0 <= channel < x.shape[0]:
        raise ValueError(f"protein_channel {channel} out of range for {x.shape[0]} channels")
    x = x.clone()
    x[channel] = x[channel] * _uniform(g, *scale).item()
    return x


def augment_view(x: torch.Tensor, cfg: AugmentConfig, size: int, scale: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """One augmented view: crop → shift → flips → normalise → jitter → protein rescale → channel drop."""
    x = random_resized_crop(x, size, scale, cfg.ratio, g)
    x = random_shift(x, cfg.max_shift, g)
    x = random_flip_rot(x, cfg.flip_p, cfg.rot90, g)
    x = normalize_view(x, cfg)
    x = jitter_channels(x, cfg.jitter_p, cfg.brightness, cfg.contrast, g)
    x = rescale_channel(x, cfg.protein_channel, cfg.protein_scale, cfg.protein_p, g)
    return drop_channel(x, cfg.channel_drop_p, g)


def multi_crop(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> dict[str, list[torch.Tensor]]:
    """2 global views and ``cfg.n_local`` local views of one image (C, H, W)."""
    return {
        "global": [augment_view(x, cfg, cfg.global_size, cfg.global_scale, g) for _ in range(2)],
        "local": [augment_view(x, cfg, cfg.local_size, cfg.local_scale, g) for _ in range(cfg.n_local)],
    }
