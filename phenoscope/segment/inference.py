"""Tiled Cellpose-SAM inference on any 2D image: ``load_model(...).segment(image)``.

Pipeline (cellpose 4 ``CellposeModel.eval`` semantics): image → (H, W, C≤3) → per-channel 1–99 %
percentile normalisation → optional resize to a 30 px cell diameter → 256² tiles (overlap 0.1,
cellpose padding) streamed through the network in batches → tapered blending → resize back →
``compute_masks``. Missing channels are zero (the 3-input network sees zeros there).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from phenoscope.core.device import resolve_device
from phenoscope.core.tiling import blend_tile, flip_tile, read_tile, taper_mask, tile_grid, unflip_output
from phenoscope.segment.flows import diameter as median_diameter
from phenoscope.segment.net import CellposeSAMNet
from phenoscope.segment.options import MaskOptions
from phenoscope.segment.preprocess import network_input, padded_network_input, resize_chw


@dataclass
class SegmentResult:
    """Output of :meth:`CellposeSAM.segment` for an (H, W) image."""

    masks: np.ndarray  # (H, W) (or (Z, Y, X) in 3D) labels, 0 = background
    flows: np.ndarray  # (2, H, W) float32 (dY, dX) (3D: (3, Z, Y, X), dZ first) at the network's scale (≈ 5 × unit flows)
    cellprob: np.ndarray  # (H, W) (3D: (Z, Y, X)) float32 cell-probability logits
    diameter: float | None = None  # px: the cell diameter the image was resized for (given or estimated)


class CellposeSAM:
    """A Cellpose-SAM network ready to segment images of any size."""

    def __init__(self, net: CellposeSAMNet, device: str | torch.device | None = None) -> None:
        self.device = resolve_device(device)
        self.net = net.to(self.device).eval()
        self.cfg = net.cfg

    def _autocast(self) -> contextlib.AbstractContextManager:
        # fp32 on CPU (bf16 there is ~11× slower); bf16 (or fp16) autocast on GPUs
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def forward_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """(B, in_chans, tile, tile) float32 → (B, maps, tile, tile) float32 network outputs."""
        x = torch.from_numpy(tiles).to(self.device)
        with torch.inference_mode(), self._autocast():
            y = self.net(x)
        return y.float().cpu().numpy()

    def run_tiled(self, image: np.ndarray, tile_overlap: float = 0.1, batch_size: int = 8, tta: bool = False) -> np.ndarray:
        """Network outputs (maps, H, W) for a normalised (C, H, W) image, blending streamed tile batches."""
        grid = tile_grid(image.shape[1], image.shape[2], self.cfg.tile, tile_overlap, augment=tta)
        return self.blend(image, list(grid), batch_size, tta)

    def blend(self, image: np.ndarray, tiles: list[tuple[int, int, int, int]], batch_size: int = 8, tta: bool = False,
              origin: tuple[int, int] = (0, 0)) -> np.ndarray:
        """Blended network outputs (maps, H, W) of ``tiles`` (grid row, column, y0, x0) over a normalised
        (C, H, W) image whose top-left pixel sits at ``origin`` in the tiles' coordinates (a window of a
        larger image: pixels every tile of whose layout is given get exactly that layout's outputs)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        t = self.cfg.tile
        mask = taper_mask(t)
        acc = np.zeros((self.cfg.maps, *image.shape[1:]), np.float32)
        weight = np.zeros(image.shape[1:], np.float32)
        buf = np.zeros((batch_size, self.cfg.in_chans, t, t), np.float32)
        placed = [(j, i, y0 - origin[0], x0 - origin[1]) for j, i, y0, x0 in tiles]
        for start in range(0, len(placed), batch_size):
            batch = placed[start:start + batch_size]
            for b, (j, i, y0, x0) in enumerate(batch):
                read_tile(image, y0, x0, buf[b])
                if tta:
                    buf[b] = flip_tile(buf[b], j, i)
            out = self.forward_tiles(buf[: len(batch)])
            for y, (j, i, y0, x0) in zip(out, batch):
                blend_tile(acc, weight, unflip_output(y, j, i) if tta else y, y0, x0, mask)
        acc /= weight
        return acc

    def predict(
        self,
        image: np.ndarray,
        channel_axis: int | None = None,
        diameter: float | None = None,
        tile_overlap: float = 0.1,
        batch_size: int = 8,
        tta: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Flows (2, H, W) and cellprob logits (H, W) of an image, at its original size."""
        y = self.predict_maps(image, channel_axis, diameter, tile_overlap, batch_size, tta)
        return y[:2], y[2]

    def predict_maps(
        self,
        image: np.ndarray,
        channel_axis: int | None = None,
        diameter: float | None = None,
        tile_overlap: float = 0.1,
        batch_size: int = 8,
        tta: bool = False,
    ) -> np.ndarray:
        """All output maps (maps, H, W) of an image at its original size: dY, dX, cellprob, then the class
        logits of a network with classes (:mod:`phenoscope.segment.semantic`)."""
        x = network_input(image, channel_axis, self.cfg.in_chans, self.cfg.merge_identical_channels)
        return self.predict_normalised(x, diameter, tile_overlap, batch_size, tta)

    def predict_normalised(self, x: np.ndarray, diameter: float | None = None, tile_overlap: float = 0.1,
                           batch_size: int = 8, tta: bool = False) -> np.ndarray:
        """All output maps (maps, H, W) of a normalised (C, H, W) network input: resized by ``diameter``,
        tiled, and resized back."""
        h, w = x.shape[1:]
        rescale = self.rescale(diameter)
        if rescale != 1.0:
            ly, lx = int(h * rescale), int(w * rescale)
            if min(ly, lx) < 1:
                raise ValueError(f"diameter {diameter} shrinks the {h}×{w} image to nothing")
            x = resize_chw(x, ly, lx)
        return resize_chw(self.run_tiled(x, tile_overlap, batch_size, tta), h, w)

    def predict_3d(
        self,
        volume: np.ndarray,
        z_axis: int = 0,
        channel_axis: int | None = None,
        diameter: float | None = None,
        anisotropy: float | None = None,
        tile_overlap: float = 0.1,
        batch_size: int = 8,
        tta: bool = False,
        smooth: float | tuple[float, float, float] = 0.0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Flows (3, Z, Y, X) = (dZ, dY, dX) and cellprob (Z, Y, X) of a volume, from the 2D network run on
        its YX, ZY and ZX planes (:mod:`phenoscope.segment.volume`; cellpose's ``do_3D``).

        ``anisotropy``: Z spacing / XY spacing (2 when Z is sampled half as densely); the volume is resized
        along Z by it (and in all axes for ``diameter``) before the network, and the outputs back.
        ``smooth``: Gaussian sigma(s) in px for the flows (cellpose's ``flow3D_smooth``)."""
        from phenoscope.segment.volume import resize_volume, run_3d, smooth_flows, volume_input

        x = volume_input(volume, z_axis, channel_axis, self.cfg.in_chans, self.cfg.merge_identical_channels)
        shape = x.shape[1:]
        rescale, aniso = self.rescale(diameter), anisotropy or 1.0
        if aniso <= 0:
            raise ValueError(f"anisotropy must be > 0, got {anisotropy}")
        if rescale != 1.0 or aniso != 1.0:
            x = resize_volume(x, int(shape[0] * aniso * rescale), int(shape[1] * rescale), int(shape[2] * rescale))
        y = run_3d(lambda plane: self.run_tiled(plane, tile_overlap, batch_size, tta), x)
        del x
        if y.shape[1:] != shape:
            y = resize_volume(y, *shape)
        return smooth_flows(y[:3], smooth), y[3]

    def segment_3d(
        self,
        volume: np.ndarray,
        z_axis: int = 0,
        channel_axis: int | None = None,
        diameter: float | None = None,
        anisotropy: float | None = None,
        options: MaskOptions | None = None,
        tile_overlap: float = 0.1,
        batch_size: int = 8,
        tta: bool = False,
        smooth: float | tuple[float, float, float] = 0.0,
    ) -> SegmentResult:
        """3D masks (Z, Y, X) of a volume (see :meth:`predict_3d`); 3D flow dynamics, as cellpose's
        ``do_3D`` (the flow-error QC is 2D only, so ``options.flow_threshold`` has no effect)."""
        flows, cellprob = self.predict_3d(volume, z_axis, channel_axis, diameter, anisotropy, tile_overlap, batch_size,
                                          tta, smooth)
        return SegmentResult(masks=self.masks(flows, cellprob, diameter, options), flows=flows, cellprob=cellprob,
                             diameter=diameter)

    def segment_planes(
        self,
        volume: np.ndarray,
        z_axis: int = 0,
        channel_axis: int | None = None,
        diameter: float | None = None,
        stitch_threshold: float = 0.25,
        options: MaskOptions | None = None,
        tile_overlap: float = 0.1,
        batch_size: int = 8,
        tta: bool = False,
    ) -> SegmentResult:
        """3D masks (Z, Y, X) of a volume from 2D masks of each Z plane joined by IoU ≥ ``stitch_threshold``
        (:func:`phenoscope.segment.volume.stitch_planes`; cellpose's ``stitch_threshold`` mode). The volume is
        normalised as a whole, as in :meth:`segment_3d`; flows are (2, Z, Y, X) = per-plane (dY, dX). As in
        cellpose, hole filling and ``options.min_size`` apply to the stitched 3D masks, not to the planes."""
        import dataclasses

        from phenoscope.segment.dynamics import fill_holes_and_remove_small_masks
        from phenoscope.segment.volume import stitch_planes, volume_input

        options = options or MaskOptions()
        per_plane = dataclasses.replace(options, min_size=-1)
        x = volume_input(volume, z_axis, channel_axis, self.cfg.in_chans, self.cfg.merge_identical_channels)
        flows, cellprob, masks = [], [], []
        for z in range(x.shape[1]):
            y = self.predict_normalised(np.ascontiguousarray(x[:, z]), diameter, tile_overlap, batch_size, tta)
            flows.append(y[:2])
            cellprob.append(y[2])
            masks.append(self.masks(y[:2], y[2], diameter, per_plane))
        stitched = fill_holes_and_remove_small_masks(stitch_planes(np.stack(masks), stitch_threshold), options.min_size)
        return SegmentResult(masks=stitched, flows=np.stack(flows, axis=1), cellprob=np.stack(cellprob), diameter=diameter)

    def rescale(self, diameter: float | None) -> float:
        """Resize factor bringing cells of ``diameter`` px to the network's 30 px (1.0 if not given)."""
        if diameter is None or diameter <= 0:
            return 1.0
        return self.cfg.diam_mean / float(diameter)

    def estimate_diameter(self, image: np.ndarray, channel_axis: int | None = None, max_tiles: int = 8) -> float | None:
        """Median cell diameter (px) of a 2D image from the network's size head (:mod:`phenoscope.segment.size`),
        from at most ``max_tiles`` tiles at native size; None if the network has no size head or sees no cells."""
        from phenoscope.segment.size import estimate_diameter

        if self.net.size is None:
            return None
        x = padded_network_input(image, channel_axis, self.cfg.in_chans, self.cfg.merge_identical_channels)
        with self._autocast():
            d = estimate_diameter(self.net, x, max_tiles, self.device)
        return None if d is None else float(np.clip(d, self.cfg.diam_mean / 4, self.cfg.diam_mean * 4))

    def segment(
        self,
        image: np.ndarray,
        channel_axis: int | None = None,
        diameter: float | str | None = None,
        options: MaskOptions | None = None,
        tile_overlap: float = 0.1,
        batch_size: int = 8,
        tta: bool = False,
    ) -> SegmentResult:
        """Segment one 2D image (YX, YXC or CYX; see :func:`phenoscope.segment.preprocess.to_yxc`) into a label image.

        ``diameter``: a number (px) resizes cells of that size to the network's ``diam_mean`` (30 px); None
        uses the network's size estimate (:meth:`estimate_diameter`) when it has a size head, and native size
        otherwise (or when no cells are seen); ``"auto"`` segments at native size, measures the diameter on
        those masks (cellpose's 2·sqrt(median area / π)), then segments again resized by it (at most 4× either
        way). ``options``: how flows become masks (default :class:`MaskOptions()`, cellpose's defaults).
        """
        options = options or MaskOptions()
        if isinstance(diameter, str):
            if diameter != "auto":
                raise ValueError(f"diameter must be a number of px, None or 'auto', got {diameter!r}")
            first = self.predict_masks(image, channel_axis, None, options, tile_overlap, batch_size, tta)
            estimate = median_diameter(first.masks)
            if estimate <= 0:  # no cells: nothing to measure
                return first
            d = float(np.clip(estimate, self.cfg.diam_mean / 4, self.cfg.diam_mean * 4))
            return self.predict_masks(image, channel_axis, d, options, tile_overlap, batch_size, tta)
        if diameter is None:
            diameter = self.estimate_diameter(image, channel_axis)
        return self.predict_masks(image, channel_axis, diameter, options, tile_overlap, batch_size, tta)

    def predict_masks(self, image: np.ndarray, channel_axis: int | None = None, diameter: float | None = None,
                      options: MaskOptions | None = None, tile_overlap: float = 0.1, batch_size: int = 8,
                      tta: bool = False) -> SegmentResult:
        """:meth:`predict` then :meth:`masks` at a given ``diameter`` (px; None: native size, no estimate)."""
        flows, cellprob = self.predict(image, channel_axis, diameter, tile_overlap, batch_size, tta)
        return SegmentResult(masks=self.masks(flows, cellprob, diameter, options), flows=flows, cellprob=cellprob,
                             diameter=diameter)

    def masks(self, flows: np.ndarray, cellprob: np.ndarray, diameter: float | None = None,
              options: MaskOptions | None = None) -> np.ndarray:
        """Label image (H, W) from this model's flows (2, H, W) and cellprob (H, W) predicted for ``diameter``
        (the Euler steps scale with the resize, as in cellpose). Re-running only this step with new
        ``options`` is cellpose's "recompute masks"."""
        from phenoscope.segment.dynamics import compute_masks

        niter = int(200 / self.rescale(diameter))
        return compute_masks(flows, cellprob, niter=niter, **(options or MaskOptions()).kwargs())




def load_model(name_or_path: str | Path = "default", device: str | torch.device | None = None) -> CellposeSAM:
    """A :class:`CellposeSAM` from a weights file — ours (``.safetensors`` + ``.json``) or a cellpose
    cpsam file — or ``"default"``: the model shipped with phenoscope (see ``phenoscope/models/default.md``)."""
    from phenoscope.segment.checkpoint import load_network

    return CellposeSAM(load_network(name_or_path), device)
