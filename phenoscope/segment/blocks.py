"""Segment 2D images larger than memory block by block, with the cells of one whole-image run.

The image (a zarr array or an OME-Zarr image) is cut into ``block``² *cores*. One task per core
segments its *window* (the core widened by ``margin`` px on every side) and keeps the cells whose
centre lies in its core, so every cell has exactly one owner (StarDist's ``predict_instances_big``
rule) instead of being stitched from pieces (cellpose's ``distributed_eval`` links labels that touch
across a block face, which cuts and merges cells at seams).

Why an owned cell is the whole-image run's cell (up to float rounding):

- normalisation uses the whole image's percentiles, from the strided sample that
  :func:`phenoscope.core.normalize.normalize_percentile` uses on large arrays;
- the resize to the network's 30 px diameter is computed in whole-image coordinates, and a window
  runs every tile of the whole image's tile layout that reaches it, so each window pixel blends the
  same tile outputs with the same weights;
- flow dynamics and the mask clean-up are local to a cell and its surroundings.

A cell of a window's own core that reaches the window's edge (inside the image) is larger than the
margin: the run stops with an error naming the block, since its mask may be cut.

Labels are globally unique: block k's cells are numbered after the cells of blocks < k (one count per
block). The label image is then written one core-sized zarr chunk per task, from the ≤ 9 windows
that reach it, so no process holds the labels of the whole image; it goes to ``<out>/labels/<name>``
as OME-Zarr (multiscale pyramid and ``image-label`` metadata, written by ome-zarr-py). The per-cell
table is measured in each window on its own cells and concatenated.

State lives in ``<out>.<name>.work/`` beside the output: each window's cells (``blocks/<k>.npz``,
written atomically) and each label chunk, so a killed run resumes with the blocks not yet done. The
labels appear under ``<out>`` only when complete.

Arrays: images (C, H, W) float32 channel-first; labels (H, W) uint32; lengths in pixels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from phenoscope.batch import Executor, InputError, Item, SerialExecutor, run_batch
from phenoscope.core.io import atomic_path, atomic_write
from phenoscope.core.normalize import sample_steps
from phenoscope.core.tiling import tile_grid
from phenoscope.segment.options import MaskOptions

__all__ = ["BlockLayout", "bilinear_taps", "open_image", "normalization_bounds", "resize_window", "segment_zarr"]


# ---------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class BlockLayout:
    """Cores of ``block``² px over an (height, width) image, and windows widened by ``margin`` px."""

    height: int
    width: int
    block: int
    margin: int

    @property
    def rows(self) -> int:
        return -(-self.height // self.block)

    @property
    def cols(self) -> int:
        return -(-self.width // self.block)

    def __len__(self) -> int:
        return self.rows * self.cols

    def core(self, k: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of block k's core (row-major block order), clipped to the image."""
        r, c = divmod(k, self.cols)
        return (r * self.block, min(self.height, (r + 1) * self.block),
                c * self.block, min(self.width, (c + 1) * self.block))

    def window(self, k: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of block k's core widened by the margin, clipped to the image."""
        y0, y1, x0, x1 = self.core(k)
        m = self.margin
        return max(0, y0 - m), min(self.height, y1 + m), max(0, x0 - m), min(self.width, x1 + m)

    def neighbours(self, k: int) -> list[int]:
        """Blocks whose windows can hold cells owned there that reach block k's core (k included), in order."""
        r, c = divmod(k, self.cols)
        reach = -(-self.margin // self.block)
        return [rr * self.cols + cc for rr in range(max(0, r - reach), min(self.rows, r + reach + 1))
                for cc in range(max(0, c - reach), min(self.cols, c + reach + 1))]


# ------------------------------------------------------------------------------------- resize by windows
def bilinear_taps(out_len: int, in_len: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weight of i1 for output pixels ``start..stop-1`` of a bilinear resize of
    an axis of ``in_len`` px to ``out_len`` px (torch ``interpolate(mode="bilinear", align_corners=False)``:
    half-pixel centres, clamped at 0, float32 arithmetic)."""
    scale = np.float32(in_len) / np.float32(out_len)
    src = np.maximum(np.float32(0), scale * (np.arange(start, stop, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5))
    i0 = src.astype(np.int64)
    i1 = np.where(i0 < in_len - 1, i0 + 1, i0)
    return i0, i1, (src - i0).astype(np.float32)


def source_span(taps: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[int, int]:
    """The [start, stop) range of source pixels that :func:`bilinear_taps` reads."""
    return int(taps[0].min()), int(taps[1].max()) + 1


def resize_window(x: np.ndarray, taps_y: tuple, taps_x: tuple, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """The pixels of a bilinear resize named by ``taps_y`` / ``taps_x`` (:func:`bilinear_taps`), read from
    ``x`` (C, h, w): a window of the source whose top-left pixel is ``origin`` in source coordinates."""
    (y0, y1, wy), (x0, x1, wx) = taps_y, taps_x
    y0, y1, x0, x1 = y0 - origin[0], y1 - origin[0], x0 - origin[1], x1 - origin[1]
    rows = x[:, y0] * (1 - wy)[None, :, None] + x[:, y1] * wy[None, :, None]
    return (rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx).astype(np.float32)


# ----------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class ImageSource:
    """A zarr array (or an OME-Zarr image's full-resolution array) read as (C, H, W) windows."""

    path: str
    array: str  # path of the array inside the store ("" for a bare array)
    channel_axis: int | None  # None: a (H, W) image

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        shape = _open(self.path, self.array).shape
        if self.channel_axis is None:
            return (1, *shape)
        c = shape[self.channel_axis]
        h, w = (n for a, n in enumerate(shape) if a != self.channel_axis)
        return c, h, w

    def read(self, y0: int, y1: int, x0: int, x1: int, step: tuple[int, int] = (1, 1)) -> np.ndarray:
        """Raw pixels (C, h, w) float32 of rows y0:y1, columns x0:x1 (every ``step`` pixel)."""
        arr = _open(self.path, self.array)
        yx = (slice(y0, y1, step[0]), slice(x0, x1, step[1]))
        if self.channel_axis is None:
            return np.asarray(arr[yx], np.float32)[None]
        index = list(yx)
        index.insert(self.channel_axis, slice(None))
        return np.moveaxis(np.asarray(arr[tuple(index)], np.float32), self.channel_axis, 0)


@lru_cache(maxsize=4)
def _open(path: str, array: str) -> Any:
    import zarr

    root = zarr.open(path, mode="r")
    return root[array] if array else root


def open_image(path: str | Path, channel_axis: int | None = None) -> ImageSource:
    """A 2D image in a zarr store: a bare array (YX, or with ``channel_axis``; a 3D array's channel axis
    is the one of ≤ 5 planes, as for image files) or an OME-Zarr image (its first multiscale level; axes
    from its metadata, length-1 ``t`` / ``z`` axes dropped). Raises :class:`InputError` naming the path."""
    import zarr

    try:
        root = zarr.open(str(path), mode="r")
    except Exception as err:  # zarr raises several types for a path that is not a store
        raise InputError(f"{path}: not a zarr array or OME-Zarr image ({type(err).__name__})") from None
    array, axes = "", None
    if isinstance(root, zarr.Group):
        attrs = dict(root.attrs)
        multiscales = attrs.get("ome", attrs).get("multiscales")
        if not multiscales:
            raise InputError(f"{path}: a zarr group without OME-Zarr 'multiscales' metadata; give the array's path")
        array = multiscales[0]["datasets"][0]["path"]
        axes = [a["name"] if isinstance(a, dict) else a for a in multiscales[0].get("axes", [])]
        arr = root[array]
    else:
        arr = root
    shape = arr.shape
    if axes:
        keep = [n for n, a in enumerate(axes) if a in "cyx" or shape[n] > 1]
        if [axes[n] for n in keep] not in (["y", "x"], ["c", "y", "x"]):
            raise InputError(f"{path}: OME-Zarr axes {''.join(axes)} with shape {shape}: need a 2D image (y, x, optional c)")
        if len(keep) < len(shape):
            raise InputError(f"{path}: drop the length-1 axes of {''.join(axes)} first (shape {shape})")
        channel_axis = axes.index("c") if "c" in axes else None
    elif len(shape) == 3 and channel_axis is None:
        from phenoscope.core.axes import guess_channel_axis

        channel_axis = guess_channel_axis(shape)
    if len(shape) not in (2, 3) or (len(shape) == 3) != (channel_axis is not None):
        raise InputError(f"{path}: array of shape {shape}: need a 2D image (YX, or YXC / CYX with a channel axis)")
    if channel_axis is not None:
        channel_axis %= len(shape)
    src = ImageSource(str(path), array, channel_axis)
    if min(src.shape[1:]) < 16:
        raise InputError(f"{path}: image of {src.shape[1]}×{src.shape[2]} px is too small")
    return src


def normalization_bounds(src: ImageSource, in_chans: int, merge_identical: bool) -> tuple[list[int], np.ndarray]:
    """The channels the network reads and their (low, high) 1–99 % percentiles, (n, 2), from the strided
    sample :func:`phenoscope.segment.preprocess.network_input` uses for images above 224³ px (all pixels
    below). Identical channels (a gray image stored as RGB) are merged when ``merge_identical``, judged
    on that sample; a channel whose range there is ≤ 1e-3 gets bounds (0, inf): it reads as zeros."""
    c, h, w = src.shape
    sample = src.read(0, h, 0, w, sample_steps((h, w)))[:in_chans]
    channels = list(range(sample.shape[0]))
    if merge_identical and len(channels) > 1 and all(np.array_equal(sample[0], s) for s in sample[1:]):
        channels = [0]
    bounds = []
    for ch in channels:
        lo, hi = np.percentile(sample[ch], [1.0, 99.0])
        bounds.append((0.0, np.inf) if np.ptp(sample[ch]) == 0 or hi - lo <= 1e-3 else (float(lo), float(hi)))
    return channels, np.array(bounds, np.float64)


def _normalise(raw: np.ndarray, channels: list[int], bounds: np.ndarray) -> np.ndarray:
    """(len(channels), h, w) float32 normalised as :func:`phenoscope.core.normalize.normalize_percentile` does."""
    x = raw[channels].copy()
    for v, (lo, hi) in zip(x, bounds):
        if np.isinf(hi):
            v[...] = 0
        else:
            v -= lo
            v /= hi - lo
    return x


# ---------------------------------------------------------------------------------------- the block task
@dataclass(frozen=True)
class Geometry:
    """Everything a block task needs besides the model: the image, how it is read, and the run's options."""

    source: ImageSource
    layout: BlockLayout
    channels: list[int]
    bounds: np.ndarray  # (n, 2) normalisation bounds
    diameter: float | None  # px; None = native size
    options: MaskOptions
    tile_overlap: float
    batch_size: int
    tta: bool


def window_outputs(model: Any, geo: Geometry, win: tuple[int, int, int, int]) -> np.ndarray:
    """Network outputs (nout, h, w) over a window (y0, y1, x0, x1) of the image at its own resolution,
    equal to the whole-image :meth:`CellposeSAM.predict` there (see the module docstring)."""
    y0, y1, x0, x1 = win
    _, h, w = geo.source.shape
    r = model.rescale(geo.diameter)
    ly, lx = (int(h * r), int(w * r)) if r != 1.0 else (h, w)
    back = (bilinear_taps(h, ly, y0, y1), bilinear_taps(w, lx, x0, x1)) if r != 1.0 else None
    ny0, ny1 = source_span(back[0]) if back else (y0, y1)
    nx0, nx1 = source_span(back[1]) if back else (x0, x1)
    t = model.cfg.tile
    tiles = [tl for tl in tile_grid(ly, lx, t, geo.tile_overlap, augment=geo.tta)
             if tl[2] < ny1 and tl[2] + t > ny0 and tl[3] < nx1 and tl[3] + t > nx0]
    uy0, uy1 = max(0, min(tl[2] for tl in tiles)), min(ly, max(tl[2] for tl in tiles) + t)
    ux0, ux1 = max(0, min(tl[3] for tl in tiles)), min(lx, max(tl[3] for tl in tiles) + t)
    if r != 1.0:
        taps = bilinear_taps(ly, h, uy0, uy1), bilinear_taps(lx, w, ux0, ux1)
        (sy0, sy1), (sx0, sx1) = source_span(taps[0]), source_span(taps[1])
        raw = _normalise(geo.source.read(sy0, sy1, sx0, sx1), geo.channels, geo.bounds)
        x = resize_window(raw, *taps, origin=(sy0, sx0))
    else:
        x = _normalise(geo.source.read(uy0, uy1, ux0, ux1), geo.channels, geo.bounds)
    y = model.blend(x, tiles, geo.batch_size, geo.tta, origin=(uy0, ux0))
    if back:
        return resize_window(y, *back, origin=(uy0, ux0))
    return y[:, y0 - uy0 : y1 - uy0, x0 - ux0 : x1 - ux0]


def owned_cells(masks: np.ndarray, win: tuple[int, int, int, int], core: tuple[int, int, int, int],
                image_shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Keep the cells of a window's masks (h, w) whose centre (floor of the mean pixel position, in image
    coordinates) lies in ``core``, renumbered 1..n in label order; returns (labels, n). Raises
    ``ValueError`` if one of them reaches a window edge that is not the image's edge."""
    n_lab = int(masks.max())
    if n_lab == 0:
        return np.zeros(masks.shape, np.uint32), 0
    ys, xs = np.nonzero(masks)
    lab = masks[ys, xs].astype(np.int64)
    count = np.bincount(lab, minlength=n_lab + 1)
    present = count > 0
    cy = np.floor(np.bincount(lab, ys, n_lab + 1)[present] / count[present]).astype(np.int64) + win[0]
    cx = np.floor(np.bincount(lab, xs, n_lab + 1)[present] / count[present]).astype(np.int64) + win[2]
    ids = np.flatnonzero(present)
    own = ids[(cy >= core[0]) & (cy < core[1]) & (cx >= core[2]) & (cx < core[3])]
    lut = np.zeros(n_lab + 1, np.uint32)
    lut[own] = np.arange(1, len(own) + 1, dtype=np.uint32)
    out = lut[masks]
    edges = [(win[0] > 0, out[0]), (win[1] < image_shape[0], out[-1]),
             (win[2] > 0, out[:, 0]), (win[3] < image_shape[1], out[:, -1])]
    if any(inner and line.any() for inner, line in edges):
        raise ValueError(f"a cell of the core at rows {core[0]}:{core[1]}, columns {core[2]}:{core[3]} reaches the "
                         "edge of its window: cells are larger than the margin; use a larger --overlap")
    return out, len(own)


def _bbox(labels: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the non-zero pixels (all 0 when there are none)."""
    if not labels.any():
        return 0, 0, 0, 0
    ys, xs = np.nonzero(labels)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


@dataclass(frozen=True)
class BlockJob:
    """Phase 1 of a block (picklable: executors send it once to every worker): network outputs over its
    window, flow following in the image's frame, and the cells it owns, before the flow QC (whose
    diffusion length depends on the largest cell of the whole image)."""

    model: Any  # a CellposeSAM
    geo: Geometry

    def __call__(self, item: Item) -> int:
        from phenoscope.segment.dynamics import Frame, follow_masks
        from phenoscope.segment.flows import heat_iterations

        k = item.extra
        geo = self.geo
        win, core = geo.layout.window(k), geo.layout.core(k)
        _, h, w = geo.source.shape
        y = window_outputs(self.model, geo, win)
        frac = geo.options.max_size_fraction * h * w / ((win[1] - win[0]) * (win[3] - win[2]))
        masks = follow_masks(y[:2], y[2], int(200 / self.model.rescale(geo.diameter)), geo.options.cellprob_threshold,
                             frac, Frame((h, w), (win[0], win[2])))
        labels, n = owned_cells(masks, win, core, (h, w))
        y0, y1, x0, x1 = _bbox(labels)
        with atomic_write(item.outputs[0]) as fh:
            np.savez(fh, labels=labels[y0:y1, x0:x1], flows=y[:2, y0:y1, x0:x1],
                     origin=np.array([win[0] + y0, win[2] + x0], np.int64), count=np.int64(n),
                     heat_niter=np.int64(heat_iterations(labels[y0:y1, x0:x1]) if n else 0))
        return n


@dataclass(frozen=True)
class FinishJob:
    """Phase 2 of a block: the flow QC with the whole image's diffusion length, hole filling, small-mask
    removal and the per-cell table of the block's cells (image coordinates, raw intensities)."""

    geo: Geometry
    heat_niter: int

    def __call__(self, item: Item) -> int:
        from phenoscope.segment.dynamics import finish_masks
        from phenoscope.segment.outputs import cell_table

        with np.load(item.extra) as z:
            labels, flows, origin = z["labels"], z["flows"], z["origin"]
        if labels.size:  # a block may own no cells
            labels = finish_masks(labels.astype(np.uint32), flows, self.geo.options.flow_threshold,
                                  self.geo.options.min_size, self.heat_niter)
        n = int(labels.max(initial=0))
        table = {}
        if n:
            raw = self.geo.source.read(origin[0], origin[0] + labels.shape[0], origin[1], origin[1] + labels.shape[1])
            df = cell_table(labels, np.moveaxis(raw, 0, -1))
            for col in ("centroid_y", "bbox_y0", "bbox_y1"):
                df[col] += origin[0]
            for col in ("centroid_x", "bbox_x0", "bbox_x1"):
                df[col] += origin[1]
            table = {f"col_{c}": df[c].to_numpy() for c in df.columns}
        with atomic_write(item.outputs[0]) as fh:
            np.savez(fh, labels=labels.astype(np.uint32), origin=origin, count=np.int64(n),
                     columns=np.array(list(table), dtype=str), **table)
        return n


@dataclass(frozen=True)
class ChunkJob:
    """The per-chunk merge task: paste the owned cells of the windows reaching core k, with global ids."""

    layout: BlockLayout
    blocks: Path
    labels: str  # the level-0 zarr array of the work folder
    offsets: tuple[int, ...]

    def __call__(self, item: Item) -> int:
        import zarr

        k = item.extra
        y0, y1, x0, x1 = self.layout.core(k)
        chunk = np.zeros((y1 - y0, x1 - x0), np.uint32)
        for n in self.layout.neighbours(k):
            with np.load(self.blocks / f"{n}.npz") as z:
                lab, (oy, ox) = z["labels"], z["origin"]
            ay, by = max(y0, oy), min(y1, oy + lab.shape[0])
            ax, bx = max(x0, ox), min(x1, ox + lab.shape[1])
            if ay >= by or ax >= bx:
                continue
            part = lab[ay - oy : by - oy, ax - ox : bx - ox]
            dst = chunk[ay - y0 : by - y0, ax - x0 : bx - x0]
            free = (part > 0) & (dst == 0)  # a pixel two windows both claim keeps the first block's cell
            dst[free] = part[free] + np.uint32(self.offsets[n])
        zarr.open_array(self.labels, mode="r+")[y0:y1, x0:x1] = chunk
        with atomic_write(item.outputs[0], "w") as fh:
            fh.write(str(int(chunk.max())))
        return int((chunk > 0).sum())


# -------------------------------------------------------------------------------------------- the driver
def _run_key(geo: Geometry, model: Any) -> str:
    """A digest of everything a block's result depends on: image, layout, options and network weights."""
    spec = {"source": geo.source.path, "layout": dataclasses.asdict(geo.layout), "diameter": geo.diameter,
            "options": dataclasses.asdict(geo.options), "tile_overlap": geo.tile_overlap, "tta": geo.tta,
            "net": repr(model.cfg), "channels": geo.channels, "bounds": geo.bounds.tolist()}
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    for name, tensor in sorted(model.net.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def segment_zarr(
    source: str | Path,
    out: str | Path,
    model: Any = "default",
    diameter: float | None = None,
    block: int = 1024,
    margin: int | None = None,
    options: MaskOptions | None = None,
    name: str = "cells",
    channel_axis: int | None = None,
    tile_overlap: float = 0.1,
    batch_size: int = 8,
    tta: bool = False,
    executor: Executor | None = None,
    device: str | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Segment a 2D zarr / OME-Zarr image of any size into ``<out>/labels/<name>`` (OME-Zarr) and
    ``<out>/../<out stem>_<name>.parquet`` (the per-cell table); see the module docstring.

    ``model``: a :class:`CellposeSAM` or a name / path for :func:`load_model`. ``diameter`` (px): the cell
    size (None: the model's size estimate on the central 2048² px, else native size). ``margin``: context
    around each core in px (default and minimum: 2 diameters). ``executor``: where block tasks run
    (:class:`phenoscope.batch.DaskExecutor` for a cluster; default: this process). Bad input raises
    :class:`InputError` before any work; failed blocks are reported and a rerun redoes only those.
    Returns a summary: cells, blocks done / skipped / failed, the diameter and the output paths.
    """
    from phenoscope.segment.inference import load_model

    try:
        import dask.array  # noqa: F401  (the label pyramid)
        import ome_zarr  # noqa: F401  (the OME-Zarr labels)
    except ImportError as err:
        raise InputError(f"segmenting zarr images needs {err.name}: pip install 'phenoscope[dask]'") from None
    options = options or MaskOptions()
    out = Path(out)
    src = open_image(source, channel_axis)
    if isinstance(model, (str, Path)):
        model = load_model(model, device)
    _, h, w = src.shape
    if diameter is None:
        cy, cx = max(0, h // 2 - 1024), max(0, w // 2 - 1024)
        centre = src.read(cy, min(h, cy + 2048), cx, min(w, cx + 2048))
        diameter = model.estimate_diameter(np.moveaxis(centre, 0, -1))
    d = float(diameter) if diameter else model.cfg.diam_mean
    margin = int(np.ceil(2 * d)) if margin is None else margin
    if margin < 2 * d:
        raise InputError(f"{source}: a margin of {margin} px is less than 2 cell diameters ({2 * d:.0f} px)")
    if block < 2 * d:
        raise InputError(f"{source}: a block of {block} px is smaller than 2 cell diameters ({2 * d:.0f} px)")
    table_path = out.parent / f"{out.stem}_{name}.parquet"
    if (out / "labels" / name).exists():
        raise InputError(f"{out}/labels/{name} exists; remove it or choose another --name")
    channels, bounds = normalization_bounds(src, model.cfg.in_chans, model.cfg.merge_identical_channels)
    geo = Geometry(src, BlockLayout(h, w, block, margin), channels, bounds, diameter, options, tile_overlap,
                   batch_size, tta)
    work = out.parent / f"{out.name}.{name}.work"
    key = _run_key(geo, model)
    _check_state(work, key)
    executor = executor or SerialExecutor()
    items = [Item(Path(f"{source}[block {k}: rows {geo.layout.core(k)[0]}:{geo.layout.core(k)[1]}, "
                       f"columns {geo.layout.core(k)[2]}:{geo.layout.core(k)[3]}]"), (), k) for k in range(len(geo.layout))]
    (work / "blocks").mkdir(parents=True, exist_ok=True)
    first = [Item(i.source, (work / "blocks" / f"{i.extra}.pre.npz",), i.extra) for i in items]
    report = run_batch(first, BlockJob(model, geo), executor, progress=progress, desc="blocks")
    summary = {"diameter": diameter, "blocks": len(items), "blocks_done": len(report.done),
               "blocks_skipped": len(report.skipped), "failed": report.failure_lines()}
    if report.failed:
        return summary
    heat_niter = max(int(np.load(i.outputs[0])["heat_niter"]) for i in first)
    second = [Item(i.source, (work / "blocks" / f"{i.extra}.npz",), f.outputs[0]) for i, f in zip(items, first)]
    report = run_batch(second, FinishJob(geo, heat_niter), executor, progress=progress, desc="clean-up")
    if report.failed:
        return {**summary, "failed": report.failure_lines()}
    counts = [int(np.load(work / "blocks" / f"{k}.npz")["count"]) for k in range(len(items))]
    offsets = tuple(int(o) for o in np.concatenate([[0], np.cumsum(counts)[:-1]]))
    _merge(geo.layout, work, offsets, executor, progress, source)
    _write_table(work, len(items), offsets, table_path)
    _publish(work, out, name, src.shape[1:], block)
    shutil.rmtree(work)
    return {**summary, "cells": int(sum(counts)), "labels": str(out / "labels" / name), "table": str(table_path)}


def _check_state(work: Path, key: str) -> None:
    state = work / "run.json"
    if state.exists() and json.loads(state.read_text())["key"] != key:
        raise InputError(f"{work} holds an unfinished run with other inputs or options; remove it to start afresh")
    work.mkdir(parents=True, exist_ok=True)
    with atomic_write(state, "w") as fh:
        json.dump({"key": key}, fh)


def _merge(layout: BlockLayout, work: Path, offsets: tuple[int, ...], executor: Executor, progress: bool | None,
           source: str | Path) -> None:
    import zarr

    level0 = work / "labels0.zarr"
    if not level0.exists():
        with atomic_path(level0) as tmp:
            tmp.unlink()
            zarr.create_array(str(tmp), shape=(layout.height, layout.width), chunks=(layout.block, layout.block),
                              dtype="uint32", fill_value=0)
    (work / "chunks").mkdir(exist_ok=True)
    items = [Item(Path(f"{source}[labels chunk {k}]"), (work / "chunks" / f"{k}.done",), k) for k in range(len(layout))]
    report = run_batch(items, ChunkJob(layout, work / "blocks", str(level0), offsets), executor, progress=progress,
                       desc="labels")
    if report.failed:
        raise RuntimeError("; ".join(report.failure_lines()))


def _write_table(work: Path, n_blocks: int, offsets: tuple[int, ...], path: Path) -> None:
    import pandas as pd

    parts = []
    for k in range(n_blocks):
        with np.load(work / "blocks" / f"{k}.npz") as z:
            if int(z["count"]):
                df = pd.DataFrame({c[4:]: z[c] for c in z["columns"]})
                df["label"] += offsets[k]
                parts.append(df)
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"label": np.zeros(0, np.int64)})
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)


def _publish(work: Path, out: Path, name: str, shape: tuple[int, int], block: int) -> None:
    """Write the OME-Zarr labels (pyramid + ``image-label`` metadata) into a staging group, then move them
    into ``<out>/labels/<name>`` and list them in ``<out>/labels``."""
    import dask
    import dask.array as da
    import zarr
    from ome_zarr.writer import write_labels

    staging = work / "staging.zarr"
    if staging.exists():
        shutil.rmtree(staging)
    labels = da.from_zarr(str(work / "labels0.zarr"))
    levels = []
    while len(levels) < 4 and min(shape) // 2 ** (len(levels) + 1) >= 256:
        levels.append(2 ** (len(levels) + 1))
    # in this process, also when a distributed Client is the default (its p2p rechunk needs workers)
    with dask.config.set({"scheduler": "threads", "array.rechunk.method": "tasks"}):
        write_labels(labels, zarr.open_group(str(staging), mode="w"), name=name, axes="yx", scaler=None,
                     scale_factors=levels, storage_options={"chunks": (block, block)})
    staged = dict(zarr.open_group(str(staging / "labels"), mode="r").attrs)
    group = zarr.open_group(str(out), mode="a").require_group("labels")
    shutil.move(str(staging / "labels" / name), str(out / "labels" / name))
    attrs = dict(group.attrs)
    if "ome" in staged:  # NGFF 0.5 keeps its keys under "ome"
        group.attrs["ome"] = {**staged["ome"], "labels": [*attrs.get("ome", {}).get("labels", []), name]}
    else:
        group.attrs["labels"] = [*attrs.get("labels", []), name]
