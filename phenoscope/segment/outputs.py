"""Writers for segmentation results: label TIFF, per-cell CSV, cellpose ``_seg.npy``, outline PNG, ImageJ ROIs.

All writers are atomic (temp file beside the target, renamed on success).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from phenoscope.core.io import atomic_path, atomic_write
from phenoscope.core.normalize import normalize_percentile


def label_dtype(masks: np.ndarray) -> type:
    """uint16 for ≤ 65535 labels, else uint32."""
    return np.uint16 if int(masks.max(initial=0)) <= np.iinfo(np.uint16).max else np.uint32


def write_masks(path: str | Path, masks: np.ndarray) -> None:
    """(H, W) labels → compressed TIFF, uint16 (uint32 beyond 65535 cells)."""
    import tifffile

    # (core.io.imwrite_tiff passes an fdopen handle, whose integer .name tifffile rejects)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, masks.astype(label_dtype(masks)), compression="zlib")


SHAPE_PROPERTIES = ("perimeter", "eccentricity", "solidity", "axis_major_length", "axis_minor_length")


PerMaskClasses = Mapping[int, int] | Sequence[int] | np.ndarray


def cell_table(masks: np.ndarray, image_yxc: np.ndarray, image_name: str | None = None,
               classes: PerMaskClasses | None = None) -> pd.DataFrame:
    """One row per cell: ``image`` (the source file name, if given), label, area (px), centroid (y, x),
    bbox (y0, x0, y1, x1; half-open), shape (perimeter in px, eccentricity, solidity, major and minor
    axis lengths in px) and the mean intensity of each channel of the raw (H, W, C) image
    (columns ``mean_intensity_c<k>``).

    3D masks (Z, Y, X) with a (Z, Y, X, C) image give area in voxels, centroid (z, y, x), bbox
    (z0, y0, x0, z1, y1, x1) and the channel means; the 2D shape measures are left out.

    ``classes`` adds a ``class`` column: a mapping label → class, or one class per cell in increasing
    label order (e.g. the classes :func:`phenoscope.segment.semantic.vote_classes` gives with its masks)."""
    from skimage.measure import regionprops_table

    axes = "zyx"[-masks.ndim:]
    table = regionprops_table(
        masks.astype(np.int64, copy=False),
        intensity_image=image_yxc.astype(np.float32, copy=False),
        properties=("label", "area", "centroid", "bbox", *(SHAPE_PROPERTIES if masks.ndim == 2 else ()), "intensity_mean"),
    )
    df = pd.DataFrame(table)
    names = {f"centroid-{i}": f"centroid_{a}" for i, a in enumerate(axes)}
    names.update({f"bbox-{i}": f"bbox_{a}0" for i, a in enumerate(axes)})
    names.update({f"bbox-{i + len(axes)}": f"bbox_{a}1" for i, a in enumerate(axes)})
    names.update({f"intensity_mean-{c}": f"mean_intensity_c{c}" for c in range(image_yxc.shape[-1])})
    df = df.rename(columns=names)
    if "intensity_mean" in df:  # single-channel images
        df = df.rename(columns={"intensity_mean": "mean_intensity_c0"})
    df = df.astype({"label": np.int64, "area": np.int64})
    if image_name is not None:
        df.insert(0, "image", image_name)
    if classes is not None:
        df["class"] = classes_per_label(classes, df["label"].to_numpy())
    return df


def classes_per_label(classes: PerMaskClasses, labels: np.ndarray) -> np.ndarray:
    """(n,) int64 class of each of the (n,) ``labels``, from a mapping label → class (``ValueError`` naming
    the labels it lacks) or a sequence of n classes in the order of ``labels``."""
    if isinstance(classes, Mapping):
        missing = sorted(set(labels.tolist()) - set(classes))
        if missing:
            raise ValueError(f"{len(missing)} object(s) have no class, e.g. labels {missing[:5]}")
        return np.array([classes[label] for label in labels.tolist()], np.int64)
    values = np.asarray(classes, np.int64)
    if values.shape != labels.shape:
        raise ValueError(f"got {values.size} classes for {labels.size} objects")
    return values


def write_cell_table(path: str | Path, masks: np.ndarray, image_yxc: np.ndarray, image_name: str | None = None,
                     classes: PerMaskClasses | None = None) -> pd.DataFrame:
    """:func:`cell_table` written as CSV, atomically."""
    df = cell_table(masks, image_yxc, image_name, classes)
    with atomic_write(path, "w") as fh:
        df.to_csv(fh, index=False)
    return df


def flow_rgb(flows: np.ndarray) -> np.ndarray:
    """(2, H, W) flows → (H, W, 3) uint8 colour wheel (cellpose's ``dx_to_circ``)."""
    mag = np.clip(normalize_percentile(np.sqrt((flows**2).sum(axis=0))), 0, 1) * 255 / 2
    angles = np.arctan2(flows[1], flows[0]) + np.pi
    phases = angles[..., None] + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
    return np.clip(mag[..., None] * (np.cos(phases) + 1), 0, 255).astype(np.uint8)


def outlines(masks: np.ndarray) -> np.ndarray:
    """Boolean (H, W): pixels on the inner boundary of each mask."""
    from skimage.segmentation import find_boundaries

    return find_boundaries(masks, mode="inner")


def write_seg_npy(
    path: str | Path, image_path: str | Path, masks: np.ndarray, flows: np.ndarray | None,
    cellprob: np.ndarray | None, diameter: float | None,
) -> None:
    """A cellpose-GUI-compatible ``_seg.npy`` (a pickled dict, as cellpose writes it; load with allow_pickle)."""
    dtype = label_dtype(masks)
    flowi: list = []
    if flows is not None and cellprob is not None:
        prob8 = (np.clip(normalize_percentile(cellprob), 0, 1) * 255).astype(np.uint8)
        flowi = [flow_rgb(flows)[None], prob8, (flows[0] / 10 * 127 + 127).astype(np.uint8), [],
                 np.concatenate((flows, cellprob[None]), axis=0)]
    dat = {
        "outlines": (masks * outlines(masks)).astype(dtype),
        "masks": masks.astype(dtype),
        "chan_choose": [0, 0],
        "ismanual": np.zeros(int(masks.max(initial=0)), bool),
        "filename": str(Path(image_path).resolve()),  # absolute, so the cellpose GUI finds the image
        "flows": flowi,
        "diameter": np.nan if diameter is None else float(diameter),
    }
    with atomic_write(path) as fh:
        np.save(fh, np.array(dat, dtype=object), allow_pickle=True)


def display_rgb(image_yxc: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 for display: an 8-bit image in its own colours (first 3 channels, alpha dropped;
    gray replicated); other dtypes (16-bit, float) stretched per channel from the 1st to the 99th percentile."""
    img = image_yxc[..., :3]
    if img.dtype == np.uint8:
        rgb = img
    else:
        rgb = (np.clip(normalize_percentile(img, channel_axis=-1), 0, 1) * 255).astype(np.uint8)
    if rgb.shape[-1] == 1:
        return np.repeat(rgb, 3, axis=-1)
    if rgb.shape[-1] == 2:
        return np.pad(rgb, ((0, 0), (0, 0), (0, 1)))
    return np.ascontiguousarray(rgb)


def overlay_rgb(image_yxc: np.ndarray, masks: np.ndarray, color: tuple[int, int, int] = (255, 0, 0)) -> np.ndarray:
    """(H, W, 3) uint8: the image as :func:`display_rgb` shows it, with mask outlines drawn in ``color``."""
    rgb = display_rgb(image_yxc).copy()
    rgb[outlines(masks)] = color
    return rgb


def write_overlay_png(path: str | Path, image_yxc: np.ndarray, masks: np.ndarray) -> None:
    from PIL import Image

    with atomic_write(path) as fh:
        Image.fromarray(overlay_rgb(image_yxc, masks)).save(fh, format="PNG")


def write_imagej_rois(path: str | Path, masks: np.ndarray) -> int:
    """ImageJ/Fiji ROI zip with one polygon per label (outer contour, named by label). Returns the count."""
    import roifile
    from scipy.ndimage import find_objects
    from skimage.measure import find_contours

    rois = []
    for label, sl in enumerate(find_objects(masks), start=1):
        if sl is None:
            continue
        crop = np.pad(masks[sl] == label, 1)
        contour = max(find_contours(crop.astype(np.uint8), 0.5), key=len)
        yx = contour - 1 + np.array([sl[0].start, sl[1].start])
        rois.append(roifile.ImagejRoi.frompoints(yx[:, ::-1], name=f"{label:05d}"))
    with atomic_path(path) as tmp:
        tmp.unlink()
        if rois:
            roifile.roiwrite(tmp, rois)
        else:  # an empty, valid zip
            import zipfile

            zipfile.ZipFile(tmp, "w").close()
    return len(rois)
