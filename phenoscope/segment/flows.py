"""Cellpose diffusion flows from instance labels (2D and 3D).

Same numbers as ``cellpose.dynamics.masks_to_flows_gpu`` / ``masks_to_flows_gpu_3d`` (4.2.1.1):
heat diffuses from each object's centre by Jacobi iterations over the 9 (3D: 7) neighbours that
belong to the same object; the flow is the unit-normalised central difference of the heat.

Instead of gathering all pixels of the image on every iteration, each object is solved on its own
bounding box, in cache, by a compiled kernel (objects in parallel). The arithmetic, its order and
the iteration count are cellpose's, so results agree to the last bit in practice.
"""

from __future__ import annotations

import numba
import numpy as np
from scipy import ndimage as ndi

# cellpose switches the heat map to float32 above this many (padded) pixels.
_FLOAT32_ABOVE = 4e7


def check_labels(masks: np.ndarray, name: str = "masks", as_int64: bool = True) -> np.ndarray:
    """Validate an instance label image (2D or 3D, integer-valued, ≥ 0); return it as int64
    (integer images keep their dtype if ``as_int64`` is False; float images become int64)."""
    masks = np.asarray(masks)
    if masks.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2D (Y, X) or 3D (Z, Y, X) label image, got shape {masks.shape}")
    if masks.dtype == bool:
        raise ValueError(f"{name} is boolean; pass an instance label image (0 = background, 1..N = objects)")
    if not (np.issubdtype(masks.dtype, np.integer) or np.issubdtype(masks.dtype, np.floating)):
        raise ValueError(f"{name} must have an integer dtype, got {masks.dtype}")
    if np.issubdtype(masks.dtype, np.floating) and (not np.isfinite(masks).all() or (masks != np.round(masks)).any()):
        raise ValueError(f"{name} is a float image with non-integer or non-finite values; labels must be integers")
    if masks.size and masks.min() < 0:
        raise ValueError(f"{name} has negative labels (min {masks.min()}); labels must be ≥ 0")
    if as_int64 or not np.issubdtype(masks.dtype, np.integer):
        return masks.astype(np.int64, copy=False)
    return masks


def diameter(labels: np.ndarray) -> float:
    """cellpose's diameter estimate: 2·sqrt(median area / π) in px (0 for an empty label image)."""
    counts = np.bincount(labels.ravel())[1:]
    counts = counts[counts > 0]
    return float(2 * np.sqrt(np.median(counts) / np.pi)) if counts.size else 0.0


@numba.njit(cache=True, nogil=True)
def _centre_2d(local: np.ndarray) -> tuple[int, int]:
    """cellpose ``center_of_mass``: rounded mean pixel, else the object pixel nearest to it."""
    h, w = local.shape
    sy = 0
    sx = 0
    n = 0
    for i in range(h):
        for j in range(w):
            if local[i, j]:
                sy += i
                sx += j
                n += 1
    ym = int(np.round(sy / n))
    xm = int(np.round(sx / n))
    if 0 <= ym < h and 0 <= xm < w and local[ym, xm]:
        return ym, xm
    best = -1
    by = 0
    bx = 0
    for i in range(h):  # row-major order, first minimum wins (np.argmin)
        for j in range(w):
            if local[i, j]:
                d = (j - xm) ** 2 + (i - ym) ** 2
                if best < 0 or d < best:
                    best = d
                    by = i
                    bx = j
    return by, bx


@numba.njit(cache=True, nogil=True)
def _diffuse_box_2d(inside: np.ndarray, cy: int, cx: int, n_iter: int, heat: np.ndarray) -> None:
    """Jacobi heat diffusion on one padded box; ``heat`` (zeros, same shape as ``inside``) is filled.

    Per iteration, as cellpose: +1 at the centre, then every object pixel becomes the sum over its
    9 neighbours (self, N, S, W, E, NW, NE, SW, SE; others' pixels count 0), divided by 9.
    """
    h, w = inside.shape
    new = heat.copy()
    for _ in range(n_iter):
        heat[cy, cx] += 1.0
        for i in range(1, h - 1):
            for j in range(1, w - 1):
                if inside[i, j]:
                    s = heat[i, j] + heat[i - 1, j]
                    s = s + heat[i + 1, j]
                    s = s + heat[i, j - 1]
                    s = s + heat[i, j + 1]
                    s = s + heat[i - 1, j - 1]
                    s = s + heat[i - 1, j + 1]
                    s = s + heat[i + 1, j - 1]
                    s = s + heat[i + 1, j + 1]
                    new[i, j] = s / 9.0
        for i in range(1, h - 1):
            for j in range(1, w - 1):
                if inside[i, j]:
                    heat[i, j] = new[i, j]


@numba.njit(cache=True, parallel=True)
def _heat_2d(padded: np.ndarray, boxes: np.ndarray, labels: np.ndarray, n_iter: int, heat: np.ndarray) -> np.ndarray:
    """Solve every object on its padded bounding box; write heat into ``heat`` (padded image coords).

    Returns the (n, 2) centres in padded image coordinates.
    """
    n = len(labels)
    centres = np.zeros((n, 2), np.int64)
    for k in numba.prange(n):
        y0, y1, x0, x1 = boxes[k, 0], boxes[k, 1], boxes[k, 2], boxes[k, 3]
        # box with a 1-pixel margin, in padded coordinates: object rows y0+1..y1
        inside = padded[y0 : y1 + 2, x0 : x1 + 2] == labels[k]
        cy, cx = _centre_2d(inside[1:-1, 1:-1])
        local = np.zeros(inside.shape, heat.dtype)
        _diffuse_box_2d(inside, cy + 1, cx + 1, n_iter, local)
        centres[k, 0] = cy + 1 + y0
        centres[k, 1] = cx + 1 + x0
        for i in range(1, inside.shape[0] - 1):
            for j in range(1, inside.shape[1] - 1):
                if inside[i, j]:
                    heat[y0 + i, x0 + j] = local[i, j]
    return centres


@numba.njit(cache=True, nogil=True)
def _diffuse_box_3d(inside: np.ndarray, c: np.ndarray, n_iter: int, heat: np.ndarray) -> None:
    """3D version: neighbours (self, z+1, z-1, y+1, y-1, x+1, x-1), divided by 7."""
    d, h, w = inside.shape
    new = heat.copy()
    for _ in range(n_iter):
        heat[c[0], c[1], c[2]] += 1.0
        for z in range(1, d - 1):
            for i in range(1, h - 1):
                for j in range(1, w - 1):
                    if inside[z, i, j]:
                        s = heat[z, i, j] + heat[z + 1, i, j]
                        s = s + heat[z - 1, i, j]
                        s = s + heat[z, i + 1, j]
                        s = s + heat[z, i - 1, j]
                        s = s + heat[z, i, j + 1]
                        s = s + heat[z, i, j - 1]
                        new[z, i, j] = s / 7.0
        for z in range(1, d - 1):
            for i in range(1, h - 1):
                for j in range(1, w - 1):
                    if inside[z, i, j]:
                        heat[z, i, j] = new[z, i, j]


@numba.njit(cache=True, parallel=True)
def _heat_3d(padded: np.ndarray, boxes: np.ndarray, labels: np.ndarray, centres: np.ndarray, n_iter: int, heat: np.ndarray) -> None:
    for k in numba.prange(len(labels)):
        z0, z1, y0, y1, x0, x1 = boxes[k]
        inside = padded[z0 : z1 + 2, y0 : y1 + 2, x0 : x1 + 2] == labels[k]
        local = np.zeros(inside.shape, heat.dtype)
        c = centres[k] - np.array([z0, y0, x0])
        _diffuse_box_3d(inside, c, n_iter, local)
        for z in range(1, inside.shape[0] - 1):
            for i in range(1, inside.shape[1] - 1):
                for j in range(1, inside.shape[2] - 1):
                    if inside[z, i, j]:
                        heat[z0 + z, y0 + i, x0 + j] = local[z, i, j]


def _objects(masks: np.ndarray) -> tuple[np.ndarray, list[tuple[slice, ...]]]:
    """Labels present (ascending) and their bounding-box slices."""
    slices = ndi.find_objects(masks)
    labels = np.array([i + 1 for i, s in enumerate(slices) if s is not None], np.int64)
    return labels, [s for s in slices if s is not None]


def _centres_3d(masks: np.ndarray, labels: np.ndarray, slices: list) -> np.ndarray:
    """cellpose 3D centre: the object voxel nearest the (unrounded) mean, in padded coordinates."""
    centres = np.zeros((len(labels), 3), np.int64)
    for k, (lab, (sz, sy, sx)) in enumerate(zip(labels, slices)):
        zi, yi, xi = np.nonzero(masks[sz, sy, sx] == lab)
        zi, yi, xi = (a.astype(np.int32) + 1 for a in (zi, yi, xi))
        imin = np.argmin((zi - np.mean(zi)) ** 2 + (xi - np.mean(xi)) ** 2 + (yi - np.mean(yi)) ** 2)
        centres[k] = (zi[imin] + sz.start, yi[imin] + sy.start, xi[imin] + sx.start)
    return centres


def _flows_from_heat(heat: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Central differences of the padded heat map at object pixels, unit-normalised (float64)."""
    ndim = heat.ndim
    idx = np.nonzero(inside)
    grads = []
    for ax in range(ndim):
        up = list(idx)
        down = list(idx)
        up[ax] = idx[ax] + 1
        down[ax] = idx[ax] - 1
        grads.append(heat[tuple(up)] - heat[tuple(down)])
    mu = np.stack(grads).astype(np.float64 if ndim == 2 else heat.dtype)
    mu /= 1e-60 + (mu**2).sum(axis=0) ** 0.5
    out = np.zeros((ndim, *(s - 2 for s in heat.shape)), np.float64)
    out[(slice(None), *(i - 1 for i in idx))] = mu
    return out


def _heat_iterations_2d(boxes: np.ndarray) -> int:
    ext = (boxes[:, 1] - boxes[:, 0]) + (boxes[:, 3] - boxes[:, 2]) + 2
    return int(2 * ext.max()) if len(ext) else 0


def heat_iterations(masks: np.ndarray) -> int:
    """cellpose's diffusion iterations for a 2D label image: 2 × (the largest box's height + width + 2);
    0 without masks. The largest over the blocks of an image is the whole image's."""
    _, slices = _objects(check_labels(masks, as_int64=False))
    return _heat_iterations_2d(np.array([[s.start, s.stop] for slc in slices for s in slc], np.int64).reshape(-1, 4))


def solve_heat(masks: np.ndarray, niter: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Diffusion heat of every object, as cellpose computes it.

    Returns (padded labels, padded heat, labels (n,), boxes (n, 2·ndim) of (start, stop) per
    axis in unpadded coordinates); the padded arrays have a 1-pixel zero border. Heat is float64,
    float32 above 4e7 padded pixels (as cellpose).
    """
    masks = check_labels(masks, as_int64=False)
    labels, slices = _objects(masks)
    padded = np.pad(masks, 1)
    heat = np.zeros(padded.shape, np.float32 if padded.size > _FLOAT32_ABOVE else np.float64)
    boxes = np.array([[v for s in slc for v in (s.start, s.stop)] for slc in slices], np.int64).reshape(-1, 2 * masks.ndim)
    if len(labels) == 0:
        return padded, heat, labels, boxes
    if masks.ndim == 2:
        n_iter = _heat_iterations_2d(boxes) if niter is None else int(niter)
        _heat_2d(padded, boxes, labels, n_iter, heat)
    else:
        ext = (boxes[:, 1::2] - boxes[:, 0::2] + 1).sum(axis=1)
        n_iter = int(6 * ext.max()) if niter is None else int(niter)
        _heat_3d(padded, boxes, labels, _centres_3d(masks, labels, slices), n_iter, heat)
    return padded, heat, labels, boxes


def flows_float64(masks: np.ndarray, niter: int | None = None) -> np.ndarray:
    """``masks_to_flows`` in float64."""
    padded, heat, _, _ = solve_heat(masks, niter)
    return _flows_from_heat(heat, padded > 0)


def masks_to_flows(masks: np.ndarray, niter: int | None = None) -> np.ndarray:
    """Unit diffusion flows of an instance label image.

    Args:
        masks: (Y, X) or (Z, Y, X) integer labels, 0 = background. Labels need not be contiguous.
        niter: diffusion iterations; default cellpose's (2D: 2 × the largest box height+width+2;
            3D: 6 × the largest box extent sum).
    Returns:
        float32 array (2, Y, X) = (dY, dX), or (3, Z, Y, X) = (dZ, dY, dX); unit length inside
        objects, zero outside.
    """
    return flows_float64(masks, niter).astype(np.float32)
