"""3D segmentation from a 2D network, as cellpose's ``do_3D``: the network runs on every YX, ZY and ZX
plane of the volume, the per-plane flows are summed into (dZ, dY, dX) and the three cellprob maps
into one, and 3D flow dynamics turn them into masks.

Pipeline (cellpose 4 ``CellposeModel.eval(do_3D=True)``): volume → (Z, Y, X, C ≤ in_chans) →
per-channel 1–99 % percentile normalisation over the whole volume → optional resize (diameter, and
``anisotropy`` along Z) → ``run_3d`` → resize back → optional Gaussian smoothing of the flows →
``compute_masks`` in 3D. Also :func:`stitch_planes`: per-plane 2D masks joined into 3D objects by IoU
(cellpose's ``stitch_threshold``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from phenoscope.core.axes import guess_channel_axis
from phenoscope.core.normalize import normalize_percentile
from phenoscope.segment.preprocess import merge_identical_channels, resize_chw

# per orientation (cellpose's names): the axis that indexes the planes, and which output flow each of
# the plane's two flows (along its first and second axis) adds to: 0 = dZ, 1 = dY, 2 = dX
ORIENTATIONS = (("YX", 1, (1, 2)), ("ZY", 2, (0, 2)), ("ZX", 3, (0, 1)))  # axis of the (C, Z, Y, X) input


def to_zyxc(volume: np.ndarray, z_axis: int = 0, channel_axis: int | None = None) -> np.ndarray:
    """A volume as (Z, Y, X, C), a view of the input: ZYX gets C = 1; 4D takes its channel axis as given, or
    guessed from the other three axes as for a 2D image. ``ValueError`` naming the problem for bad axes."""
    volume = np.asarray(volume)
    if volume.ndim not in (3, 4):
        raise ValueError(f"a 3D volume is ZYX or 4D with channels, got shape {volume.shape}")
    if not -volume.ndim <= z_axis < volume.ndim:
        raise ValueError(f"z_axis={z_axis} is out of range for a volume of shape {volume.shape}")
    z_axis %= volume.ndim
    if volume.ndim == 3:
        if channel_axis is not None:
            raise ValueError(f"channel_axis={channel_axis} given for a ZYX volume of shape {volume.shape}")
        return np.moveaxis(volume, z_axis, 0)[..., None]
    if channel_axis is None:
        rest = [a for a in range(4) if a != z_axis]
        guess = guess_channel_axis(tuple(volume.shape[a] for a in rest))
        channel_axis = rest[guess]
    if not -4 <= channel_axis < 4 or channel_axis % 4 == z_axis:
        raise ValueError(f"channel_axis={channel_axis} is out of range or equals z_axis for shape {volume.shape}")
    return np.moveaxis(volume, [z_axis, channel_axis % 4], [0, -1])


def volume_input(volume: np.ndarray, z_axis: int = 0, channel_axis: int | None = None, in_chans: int = 3,
                 merge_identical: bool = False) -> np.ndarray:
    """(C ≤ in_chans, Z, Y, X) float32 as the network sees a volume: its first ``in_chans`` channels,
    each 1–99 % percentile-normalised over the whole volume (cellpose's ``norm3D``).

    ``volume``: ZYX, or 4D with a channel axis (see :func:`to_zyxc`). Raises ``ValueError`` naming the
    problem for bad axes or NaN/inf.
    """
    zyxc = to_zyxc(volume, z_axis, channel_axis)
    if zyxc.dtype.kind not in "biuf":
        raise ValueError(f"unsupported volume dtype {zyxc.dtype}")
    zyxc = zyxc[..., :in_chans]
    if merge_identical:
        zyxc = merge_identical_channels(zyxc)
    return np.moveaxis(normalize_percentile(zyxc, channel_axis=-1), -1, 0)


def resize_volume(x: np.ndarray, lz: int, ly: int, lx: int) -> np.ndarray:
    """(C, Z, Y, X) → (C, lz, ly, lx): bilinear in YX per plane, then along Z per ZX plane, as cellpose's
    ``resize_image_3d``."""
    c, z, y, w = x.shape
    if (y, w) != (ly, lx):
        x = resize_chw(x.reshape(c * z, y, w), ly, lx).reshape(c, z, ly, lx)
    if z != lz:
        zy = np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(c * ly, z, lx)  # (C·Y, Z, X) planes
        x = resize_chw(zy, lz, lx).reshape(c, ly, lz, lx).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(x)


def run_3d(run_plane: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """(4, Z, Y, X) = (dZ, dY, dX, cellprob) from a normalised (C, Z, Y, X) volume.

    ``run_plane`` maps a (C, h, w) plane to the network's (3, h, w) output (flow along h, flow along w,
    cellprob). As in cellpose's ``run_3D``, each flow component is the sum over the two orientations
    that contain its axis, and cellprob the sum over all three.
    """
    _, nz, ny, nx = x.shape
    out = np.zeros((4, nz, ny, nx), np.float32)
    for _, axis, (first, second) in ORIENTATIONS:
        for i in range(x.shape[axis]):
            index = (slice(None),) * axis + (i,)
            y = run_plane(np.ascontiguousarray(x[index]))
            target = (slice(None),) * (axis - 1) + (i,)
            out[(first, *target)] += y[0]
            out[(second, *target)] += y[1]
            out[(3, *target)] += y[2]
    return out


def smooth_flows(dP: np.ndarray, sigma: float | Sequence[float]) -> np.ndarray:
    """Gaussian smoothing of (3, Z, Y, X) flows with ``sigma`` px (one value, or Z, Y, X values), as
    cellpose's ``flow3D_smooth``; 0 leaves the flows as they are."""
    from scipy.ndimage import gaussian_filter

    sig = [float(sigma)] * 3 if np.isscalar(sigma) else [float(s) for s in sigma]
    if len(sig) != 3 or min(sig) < 0:
        raise ValueError(f"flow smoothing needs one or three sigmas >= 0, got {sigma}")
    return gaussian_filter(dP, [0, *sig]) if any(sig) else dP


def stitch_planes(masks: np.ndarray, threshold: float = 0.25) -> np.ndarray:
    """(Z, Y, X) per-plane 2D labels → 3D labels (uint32), exactly as cellpose's ``stitch3D``: a mask of
    plane z+1 takes the label of the plane-z mask it overlaps best when that IoU ≥ ``threshold`` and no
    other plane-(z+1) mask overlaps that one better; the others get new labels."""
    from phenoscope.eval.segmentation import iou_matrix

    if np.ndim(masks) != 3:
        raise ValueError(f"stitching needs (Z, Y, X) masks, got shape {np.shape(masks)}")
    masks = np.array(masks, dtype=np.uint32)
    mmax, stitched = int(masks[0].max()), False
    for i in range(len(masks) - 1):
        iou = iou_matrix(masks[i + 1].astype(np.int64), masks[i].astype(np.int64))[1:, 1:]
        if not iou.size:  # either plane is empty
            if not stitched:  # nothing stitched yet: the plane keeps its own labels (as cellpose)
                mmax = int(masks[i + 1].max())
                continue
            count = int(masks[i + 1].max())
            new = np.arange(mmax + 1, mmax + count + 1, dtype=np.uint32)
            mmax += count
        else:
            iou[iou < threshold] = 0.0
            iou[iou < iou.max(axis=0)] = 0.0
            new = (iou.argmax(axis=1) + 1).astype(np.uint32)
            unmatched = np.nonzero(iou.max(axis=1) == 0.0)[0]
            new[unmatched] = np.arange(mmax + 1, mmax + len(unmatched) + 1, dtype=np.uint32)
            mmax += len(unmatched)
            stitched = True
        masks[i + 1] = np.concatenate([[0], new]).astype(np.uint32)[masks[i + 1]]
    return masks
