"""Cell size from the network's own features: the diameter estimate behind the default ``segment``.

The network is trained on cells of many sizes, but segments best when they are resized to one canonical
diameter. Cellpose's SizeModel regresses the log diameter on the network's style vector; here a linear
head (``CellposeSAMNet.size``, ``NetConfig.size_head``) reads the log diameter from the neck features,
pooled with the predicted cell probability as weights (so background does not dilute them):

- :func:`pooled_features`: (B, neck_dim) foreground-weighted means and their weights, per tile;
- :func:`fit_size_head`: ridge regression on augmented training tiles whose cell diameter is known
  exactly (the augmentation resized it), run once after the flows are trained;
- :func:`estimate_diameter`: an image's diameter from a few of its tiles at native size, one forward
  pass each, so the estimate costs a fraction of the segmentation pass it sets up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from phenoscope.segment.net import CellposeSAMNet, grown

__all__ = ["SizeFit", "estimate_diameter", "fit_size_head", "pooled_features", "tile_log_diameters"]

MIN_MASS = 1.0  # a tile must hold at least this many tokens' worth of cell probability to vote


def pooled_features(feats: torch.Tensor, cellprob: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """feats (B, C, h, w) neck features and cellprob (B, h·patch, w·patch) logits → (pooled (B, C), mass (B,)).

    Each token's weight is the mean cell probability over its patch; ``mass`` is their sum (in tokens).
    """
    w = F.avg_pool2d(torch.sigmoid(cellprob[:, None].float()), patch)  # (B, 1, h, w)
    mass = w.sum(dim=(1, 2, 3))
    pooled = (feats.float() * w).sum(dim=(2, 3)) / mass.clamp_min(1e-6)[:, None]
    return pooled, mass


def _tile_features(net: CellposeSAMNet, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, in_chans, tile, tile) tiles → :func:`pooled_features` of the network's own neck and cellprob."""
    y, feats = net.forward_features(tiles)
    return pooled_features(feats, y[:, 2], net.cfg.patch)


@torch.no_grad()
def tile_log_diameters(net: CellposeSAMNet, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, in_chans, tile, tile) normalised tiles → (log diameter in px (B,), vote weight (B,)) from ``net.size``."""
    if net.size is None:
        raise ValueError("this network has no size head (NetConfig.size_head); fit one with fit_size_head")
    pooled, mass = _tile_features(net, tiles)
    return net.size(pooled)[:, 0], mass


def estimate_diameter(net: CellposeSAMNet, image: np.ndarray, max_tiles: int, device: torch.device) -> float | None:
    """Median-cell diameter (px) of a normalised (C, H, W) image at native size, or None if no cells are seen.

    Up to ``max_tiles`` tiles are read on a regular grid, the ones with the most contrast first; each
    votes its predicted log diameter with its cell-probability mass as weight.
    """
    t = net.cfg.tile
    c, h, w = image.shape
    padded = np.zeros((c, max(h, t), max(w, t)), np.float32)
    padded[:, :h, :w] = image
    ys = np.unique(np.linspace(0, padded.shape[1] - t, max(1, int(np.ceil(padded.shape[1] / t)))).astype(int))
    xs = np.unique(np.linspace(0, padded.shape[2] - t, max(1, int(np.ceil(padded.shape[2] / t)))).astype(int))
    tiles = np.stack([padded[:, y:y + t, x:x + t] for y in ys for x in xs])
    contrast = tiles.reshape(len(tiles), -1).std(axis=1)
    chosen = tiles[np.argsort(-contrast, kind="stable")[: max(1, max_tiles)]]
    logd, mass = tile_log_diameters(net, torch.from_numpy(np.ascontiguousarray(chosen)).to(device))
    keep = mass >= MIN_MASS
    if not keep.any():
        return None
    return float(torch.exp((logd[keep] * mass[keep]).sum() / mass[keep].sum()))


@dataclass
class SizeFit:
    """What :func:`fit_size_head` measured: tiles used, the ridge penalty chosen, and the held-out error
    (RMS of log diameter, so 0.1 ≈ 10 %) of that choice on the tiles of held-out images (of the fitted
    tiles when there are too few images to hold any out)."""

    tiles: int
    alpha: float
    rmse_log: float


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    mx, my = x.mean(axis=0), y.mean()
    xc = x - mx
    w = np.linalg.solve(xc.T @ xc + alpha * len(x) * np.eye(x.shape[1]), xc.T @ (y - my))
    return w, float(my - mx @ w)


def fit_size_head(
    net: CellposeSAMNet, draw_tile, n_images: int, tiles: int = 2048, batch_size: int = 32, seed: int = 0,
    alphas: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
) -> tuple[CellposeSAMNet, SizeFit]:
    """Fit the size head of ``net`` (added if missing) by ridge regression; returns (network, fit record).

    ``draw_tile(rng, i)`` returns (image (C, tile, tile), cell diameter in that tile in px) for training
    image ``i`` (the augmentation's resize sets the diameter exactly). The penalty is chosen on the tiles
    of a held-out fifth of the images, then the head is refitted on all tiles.
    """
    if not net.cfg.size_head:
        net = grown(net, size_head=True)
    device = next(net.parameters()).device
    net.eval()
    rng = np.random.default_rng(seed)
    owners = rng.integers(n_images, size=tiles)
    feats, masses, targets = [], [], []
    with torch.no_grad():
        for start in range(0, tiles, batch_size):
            drawn = [draw_tile(rng, int(i)) for i in owners[start:start + batch_size]]
            x = torch.from_numpy(np.stack([d[0] for d in drawn])).to(device)
            pooled, mass = _tile_features(net, x)
            feats.append(pooled.cpu().numpy())
            masses.append(mass.cpu().numpy())
            targets.extend(np.log(d[1]) for d in drawn)
    x, mass, target = np.concatenate(feats), np.concatenate(masses), np.asarray(targets)
    keep = mass >= MIN_MASS
    x, target, owners = x[keep], target[keep], owners[keep]
    if len(x) < 2 * x.shape[1]:
        raise ValueError(f"only {len(x)} of {tiles} tiles hold cells; draw more tiles to fit the size head")
    held = np.isin(owners, rng.permutation(n_images)[: max(1, n_images // 5)])
    fit_on, score_on = ~held, held
    if held.all() or not held.any():  # too few images to hold some out: score on the fitted tiles
        fit_on = score_on = np.ones(len(x), bool)
    errors = {}
    for alpha in alphas:
        w, b = _ridge(x[fit_on], target[fit_on], alpha)
        errors[alpha] = float(np.sqrt(np.mean((x[score_on] @ w + b - target[score_on]) ** 2)))
    best = min(errors, key=errors.get)
    w, b = _ridge(x, target, best)
    with torch.no_grad():
        net.size.weight.copy_(torch.from_numpy(w[None].astype(np.float32)))
        net.size.bias.fill_(b)
    return net, SizeFit(tiles=int(len(x)), alpha=best, rmse_log=errors[best])
