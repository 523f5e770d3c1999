"""Image sources for pretraining and the multi-crop dataset / collate.

A *source* is any sequence of float32 arrays (C, H, W): ``ArraySource`` (npz / in-memory),
``FileSource`` (TIFF stacks CYX or YXC, or one file per channel), ``FOVCrops`` (random crops
of fields of view), ``cell_crops`` (fixed-size crops on mask centroids) and
``ChannelsAsSamples`` (bag-of-channels training: every channel is its own 1-channel image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from phenoscope.core.axes import channels_first, layout_axis
from phenoscope.core.io import imread
from phenoscope.ssl.augment import AugmentConfig, multi_crop
from phenoscope.ssl.masking import batch_masks


class ArraySource:
    """Images from an array (N, C, H, W), e.g. an ``.npz`` entry."""

    def __init__(self, images: np.ndarray) -> None:
        if images.ndim != 4:
            raise ValueError(f"expected images (N, C, H, W), got shape {images.shape}")
        self.images = images

    @classmethod
    def from_npz(cls, path: str | Path, key: str = "images") -> ArraySource:
        with np.load(path, allow_pickle=False) as z:
            if key not in z:
                raise ValueError(f"{path}: no array {key!r}; arrays: {list(z.keys())}")
            return cls(z[key])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.images[i], dtype=np.float32)


def to_cyx(arr: np.ndarray, layout: str = "auto") -> np.ndarray:
    """(H, W), (C, H, W) or (H, W, C) → (C, H, W); ``auto`` guesses the channel axis
    (:func:`phenoscope.core.axes.guess_channel_axis`)."""
    return channels_first(arr, layout_axis(layout))


class FileSource:
    """Images from files: each item is one multi-channel file or a list of per-channel files."""

    def __init__(self, items: Sequence[str | Path | Sequence[str | Path]], layout: str = "auto") -> None:
        if not items:
            raise ValueError("no image files given")
        self.items = list(items)
        self.layout = layout

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> np.ndarray:
        item = self.items[i]
        if isinstance(item, (str, Path)):
            return to_cyx(imread(item), self.layout).astype(np.float32)
        chans = [imread(p) for p in item]
        if any(c.ndim != 2 or c.shape != chans[0].shape for c in chans):
            raise ValueError(f"per-channel files must be 2-D images of one shape: {[str(p) for p in item]}")
        return np.stack(chans).astype(np.float32)


class FOVCrops:
    """``crops_per_image`` random ``size``×``size`` crops of each field of view in ``source``."""

    def __init__(self, source: Sequence[np.ndarray], size: int, crops_per_image: int = 1, seed: int = 0) -> None:
        self.source, self.size, self.k, self.seed = source, size, crops_per_image, seed

    def __len__(self) -> int:
        return len(self.source) * self.k

    def __getitem__(self, i: int) -> np.ndarray:
        img = self.source[i // self.k]
        _, h, w = img.shape
        if h < self.size or w < self.size:
            raise ValueError(f"image {i // self.k} ({h}x{w}) is smaller than the crop size {self.size}")
        rng = np.random.default_rng([self.seed, i, int(torch.randint(0, 2**31, (1,)))])
        top, left = rng.integers(0, h - self.size + 1), rng.integers(0, w - self.size + 1)
        return img[:, top : top + self.size, left : left + self.size]


def cell_crops(
    image: np.ndarray, labels: np.ndarray, size: int, mask_background: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed-size crops centred on each labelled object's centroid.

    Args:
        image: (C, H, W); labels: (H, W) integer instance labels, 0 = background.
        mask_background: zero every pixel that does not belong to the crop's own cell.
    Returns:
        crops (n, C, size, size) float32, zero-padded at image borders, their label ids (n,)
        and centroids (n, 2) as (y, x) in pixels.
    """
    from scipy import ndimage

    if labels.shape != image.shape[1:]:
        raise ValueError(f"labels {labels.shape} do not match image {image.shape[1:]}")
    ids = np.unique(labels)
    ids = ids[ids != 0]
    centres = ndimage.center_of_mass(np.ones_like(labels), labels, ids)
    half = size // 2
    pad = ((0, 0), (half, size), (half, size))
    img = np.pad(image.astype(np.float32), pad)
    lab = np.pad(labels, pad[1:])
    crops = np.zeros((len(ids), image.shape[0], size, size), dtype=np.float32)
    for n, (cid, (cy, cx)) in enumerate(zip(ids, centres)):
        top, left = int(round(cy)), int(round(cx))  # in padded coordinates: centre - half + half
        crop = img[:, top : top + size, left : left + size]
        crops[n] = crop * (lab[top : top + size, left : left + size] == cid) if mask_background else crop
    return crops, ids, np.asarray(centres, dtype=np.float64).reshape(-1, 2)


class ChannelsAsSamples:
    """Bag-of-channels training source: item ``i`` is channel ``i % C`` of image ``i // C``."""

    def __init__(self, source: Sequence[np.ndarray], n_channels: int) -> None:
        self.source, self.c = source, n_channels

    def __len__(self) -> int:
        return len(self.source) * self.c

    def __getitem__(self, i: int) -> np.ndarray:
        img = self.source[i // self.c]
        if img.shape[0] != self.c:
            raise ValueError(f"image {i // self.c} has {img.shape[0]} channels, expected {self.c}")
        return img[i % self.c : i % self.c + 1]


class MultiCropDataset(Dataset):
    """Source + augmentations → ``{"global": [2 × (C,H,W)], "local": [n × (C,h,w)]}`` per item."""

    def __init__(self, source: Sequence[np.ndarray], cfg: AugmentConfig, seed: int = 0) -> None:
        self.source, self.cfg, self.seed = source, cfg, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, list[torch.Tensor]]:
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))) ^ (self.seed * 1_000_003 + i))
        return multi_crop(torch.from_numpy(np.ascontiguousarray(self.source[i])), self.cfg, g)


class MultiCropCollate:
    """Stack views view-major and draw iBOT block masks for the global crops.

    Output: ``global`` (2B, C, H, W), ``local`` (nL*B, C, h, w) if any, ``masks`` bool (2B, N).
    """

    def __init__(self, cfg: AugmentConfig, patch_size: int) -> None:
        self.cfg, self.patch = cfg, patch_size

    def __call__(self, items: list[dict[str, list[torch.Tensor]]]) -> dict[str, torch.Tensor]:
        out = {"global": torch.stack([v for k in range(2) for v in (it["global"][k] for it in items)])}
        if self.cfg.n_local:
            out["local"] = torch.stack([v for k in range(self.cfg.n_local) for v in (it["local"][k] for it in items)])
        side = self.cfg.global_size // self.patch
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,))))
        masks = batch_masks(out["global"].shape[0], (side, side), rng, self.cfg.mask_ratio, self.cfg.mask_probability)
        out["masks"] = torch.from_numpy(masks)
        return out
