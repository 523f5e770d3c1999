"""From network flows and cell probability to instance masks (cellpose 4.2.1.1 dynamics, faster).

Steps (``compute_masks``): Euler flow following of every foreground pixel → histogram of final
positions → seeds at histogram peaks, expanded over the 11×11(×11) neighbourhood → removal of
masks larger than ``max_size_fraction`` → flow-error QC (2D) → hole filling and removal of
masks smaller than ``min_size``.

Speed-ups over cellpose, none of which changes a result:
* 2D flow following runs in a compiled kernel that repeats torch's bilinear ``grid_sample``
  arithmetic (FMA) operation by operation on SIMD vectors of pixels (LLVM IR through a numba
  intrinsic), and stops a pixel once its float32 trajectory is exactly periodic. It is used
  when a probe shows that it rounds exactly like the local torch; otherwise cellpose's torch
  loop runs;
* the QC computes each object's flow error on its bounding box from the diffusion heat map,
  with numpy's rounding and summation order, instead of building full-image float64 flows;
* histogram seeds, hole filling and relabelling are single compiled passes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from phenoscope.segment.flows import solve_heat


def _check_inputs(dP: np.ndarray, cellprob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dP = np.asarray(dP)
    cellprob = np.asarray(cellprob)
    for name, arr in (("dP", dP), ("cellprob", cellprob)):
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if cellprob.ndim not in (2, 3):
        raise ValueError(f"cellprob must be (Y, X) or (Z, Y, X), got shape {cellprob.shape}")
    if dP.shape != (cellprob.ndim, *cellprob.shape):
        raise ValueError(
            f"dP must have shape {(cellprob.ndim, *cellprob.shape)} (one flow component per axis of "
            f"cellprob {cellprob.shape}), got {dP.shape}"
        )
    if not np.isfinite(dP).all():
        raise ValueError("dP contains NaN or inf values")
    if not np.isfinite(cellprob).all():
        raise ValueError("cellprob contains NaN or inf values")
    return dP.astype(np.float32, copy=False), cellprob.astype(np.float32, copy=False)


# Lanes: _LANES pixels are followed together, as _LANES // _VEC SIMD vectors per coordinate
# (two independent vectors keep the core busy while one waits on its gathers). Lanes advance in
# blocks of _CHECK steps; after each block a lane looks for an exact cycle of period 1.._CHECK
# within the block: a pixel whose float32 trajectory has become periodic has a known position at
# step niter, so it stops and the lane takes the next pixel.
_VEC = 16
_LANES = 32
_CHECK = 32


def _vector_step_codegen(context, builder, signature, args):
    """LLVM IR for one clamped Euler step of _VEC positions: torch's bilinear ``grid_sample``
    (zeros padding, align_corners=False, FMA), operation by operation, on vectors.

    Reads positions ``h[s, :, lane0:lane0 + _VEC]`` (normalised x, y) and writes ``h[s + 1]``. The flow image
    ``im`` is (2·(h+2)·(w+2),) float32 with a 1-pixel zero border, the (dX, dY) of a pixel
    adjacent, so each bilinear corner is one 64-bit gather and no bounds checks are needed.
    """
    im_a, row, sx, sy, ox, oy, xmax, ymax, h_a, s, lane0 = args
    n = _VEC
    f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
    vf, vi32, vi64 = ir.VectorType(f32, n), ir.VectorType(i32, n), ir.VectorType(i64, n)
    mod = builder.module

    def splat(value, vtype):
        undef = ir.Constant(vtype, ir.Undefined)
        v = builder.insert_element(undef, value, ir.Constant(i32, 0))
        return builder.shuffle_vector(v, undef, ir.Constant(vi32, [0] * n))

    def intrinsic_fn(name, ret, nargs):
        return cgutils.get_or_insert_function(mod, ir.FunctionType(ret, [ret] * nargs), name)

    fma = intrinsic_fn(f"llvm.fma.v{n}f32", vf, 3)
    floor = intrinsic_fn(f"llvm.floor.v{n}f32", vf, 1)
    fmax = intrinsic_fn(f"llvm.maxnum.v{n}f32", vf, 2)
    fmin = intrinsic_fn(f"llvm.minnum.v{n}f32", vf, 2)
    ptrs_t = ir.VectorType(i64.as_pointer(), n)
    gather = cgutils.get_or_insert_function(
        mod, ir.FunctionType(vi64, [ptrs_t, i32, ir.VectorType(ir.IntType(1), n), vi64]), f"llvm.masked.gather.v{n}i64.v{n}p0"
    )
    im_ptr = context.make_array(signature.args[0])(context, builder, im_a).data
    h_ptr = context.make_array(signature.args[8])(context, builder, h_a).data

    def vec_at(offset):  # pointer to the vector at float offset ``offset`` of h
        return builder.bitcast(builder.gep(h_ptr, [offset]), vf.as_pointer())

    base = builder.add(builder.mul(s, ir.Constant(i64, 2 * _LANES)), lane0)
    gx = builder.load(vec_at(base), align=4)
    gy = builder.load(vec_at(builder.add(base, ir.Constant(i64, _LANES))), align=4)
    one = splat(ir.Constant(f32, 1.0), vf)
    x = builder.call(fma, [builder.fadd(gx, one), splat(sx, vf), splat(ir.Constant(f32, -0.5), vf)])
    y = builder.call(fma, [builder.fadd(gy, one), splat(sy, vf), splat(ir.Constant(f32, -0.5), vf)])
    # window frame: pixel (ox, oy) of the image is the flow image's first; positions outside it read
    # its zero border (a no-op for the whole image, where ox = oy = 0 and x, y ∈ [-1/2, size - 1/2])
    x = builder.fsub(x, splat(ox, vf))
    y = builder.fsub(y, splat(oy, vf))
    x = builder.call(fmin, [builder.call(fmax, [x, splat(ir.Constant(f32, -1.0), vf)]), splat(xmax, vf)])
    y = builder.call(fmin, [builder.call(fmax, [y, splat(ir.Constant(f32, -1.0), vf)]), splat(ymax, vf)])
    x_w, y_n = builder.call(floor, [x]), builder.call(floor, [y])
    we = builder.fsub(x, x_w)
    e = builder.fsub(one, we)
    nn = builder.fsub(y, y_n)
    ss = builder.fsub(one, nn)
    nw, ne, sw, se = builder.fmul(ss, e), builder.fmul(ss, we), builder.fmul(nn, e), builder.fmul(nn, we)
    # float index of the (dX, dY) pair of the top-left corner; x, y ≥ -1/2 so the +1 is ≥ 0
    xi = builder.fptoui(builder.fadd(x_w, one), vi64)
    yi = builder.fptoui(builder.fadd(y_n, one), vi64)
    rows, two = splat(row, vi64), splat(ir.Constant(i64, 2), vi64)
    k = builder.add(builder.mul(yi, rows), builder.mul(xi, two))
    im_base = splat(builder.ptrtoint(im_ptr, i64), vi64)
    all_on = ir.Constant(ir.VectorType(ir.IntType(1), n), [1] * n)

    def pair(idx):  # (dX, dY) at float index idx, for every lane
        ptrs = builder.inttoptr(builder.add(im_base, builder.mul(idx, splat(ir.Constant(i64, 4), vi64))), ptrs_t)
        q = builder.call(gather, [ptrs, ir.Constant(i32, 8), all_on, ir.Constant(vi64, ir.Undefined)])
        lo = builder.bitcast(builder.trunc(q, vi32), vf)
        hi = builder.bitcast(builder.trunc(builder.lshr(q, splat(ir.Constant(i64, 32), vi64)), vi32), vf)
        return lo, hi

    below = builder.add(k, rows)
    corners = [(pair(k), nw), (pair(builder.add(k, two)), ne), (pair(below), sw), (pair(builder.add(below, two)), se)]
    (cx, cy), wgt = corners[0]
    acc0, acc1 = builder.fmul(cx, wgt), builder.fmul(cy, wgt)
    for (cx, cy), wgt in corners[1:]:
        acc0 = builder.call(fma, [cx, wgt, acc0])
        acc1 = builder.call(fma, [cy, wgt, acc1])
    lo_clamp = splat(ir.Constant(f32, -1.0), vf)
    nx = builder.call(fmin, [builder.call(fmax, [builder.fadd(gx, acc0), lo_clamp]), one])
    ny = builder.call(fmin, [builder.call(fmax, [builder.fadd(gy, acc1), lo_clamp]), one])
    nxt = builder.add(base, ir.Constant(i64, 2 * _LANES))
    builder.store(nx, vec_at(nxt), align=4)
    builder.store(ny, vec_at(builder.add(nxt, ir.Constant(i64, _LANES))), align=4)
    return context.get_dummy_value()


@intrinsic
def _step_lanes(typingctx, im, row, sx, sy, ox, oy, xmax, ymax, h, s, lane0):
    """``h[s + 1] = step(h[s])`` for lanes lane0..lane0+_VEC; h is (_CHECK + 1, 2, _LANES)
    float32 (C order)."""
    return types.void(im, row, sx, sy, ox, oy, xmax, ymax, h, s, lane0), _vector_step_codegen


@numba.njit(cache=True, inline="always")
def _position_at(h: np.ndarray, lane: int, t0: int, niter: int) -> int:
    """Row s of the block history ``h`` (position at step t0 + s, s = 0.._CHECK) that holds the
    position of ``lane`` at step ``niter``, or -1 if it is not known yet."""
    if t0 + _CHECK >= niter:
        return niter - t0
    x, y = h[_CHECK, 0, lane], h[_CHECK, 1, lane]
    for k in range(1, _CHECK + 1):
        if h[_CHECK - k, 0, lane] == x and h[_CHECK - k, 1, lane] == y:  # period k from step t0+_CHECK-k on
            return _CHECK - k + (niter - t0 - _CHECK) % k
    return -1


@numba.njit(cache=True, nogil=True)
def _follow_block(im: np.ndarray, w: int, h: int, frame: np.ndarray, pts: np.ndarray, out: np.ndarray, start: int,
                  stop: int, niter: int) -> None:
    """Follow pixels ``start:stop`` of ``pts`` into ``out``, _LANES at a time, refilling a lane
    as soon as its pixel is finished. ``frame`` = (image height, width, window y0, x0)."""
    row, sx, sy = np.uint64(2 * (w + 2)), np.float32(frame[1] / 2), np.float32(frame[0] / 2)
    ox, oy = np.float32(frame[3]), np.float32(frame[2])
    xmax, ymax = np.float32(w - 0.5), np.float32(h - 0.5)
    hist = np.zeros((_CHECK + 1, 2, _LANES), np.float32)
    lt = np.zeros(_LANES, np.int64)
    li = np.full(_LANES, -1, np.int64)
    nxt, active = start, 0
    for lane in range(_LANES):
        if nxt < stop:
            li[lane], hist[0, 0, lane], hist[0, 1, lane] = nxt, pts[nxt, 0], pts[nxt, 1]
            nxt += 1
            active += 1
    while active > 0:
        for s in range(_CHECK):
            for lane0 in range(0, _LANES, _VEC):
                _step_lanes(im, row, sx, sy, ox, oy, xmax, ymax, hist, np.int64(s), np.int64(lane0))
        for lane in range(_LANES):
            if li[lane] < 0:
                continue
            r = _position_at(hist, lane, lt[lane], niter)
            if r < 0:
                hist[0, 0, lane], hist[0, 1, lane] = hist[_CHECK, 0, lane], hist[_CHECK, 1, lane]
                lt[lane] += _CHECK
                continue
            out[li[lane], 0], out[li[lane], 1] = hist[r, 0, lane], hist[r, 1, lane]
            if nxt < stop:
                li[lane], lt[lane], hist[0, 0, lane], hist[0, 1, lane] = nxt, 0, pts[nxt, 0], pts[nxt, 1]
                nxt += 1
            else:
                li[lane] = -1
                active -= 1


@numba.njit(cache=True, parallel=True)
def _padded_flow_image(dP: np.ndarray, fg: np.ndarray, masked: bool, scale_x: np.float32, scale_y: np.float32) -> np.ndarray:
    """(2·(h+2)·(w+2),) float32: (dX, dY) [· fg / 5 if ``masked``] · scale, interleaved, with a
    zero border; each value rounded as numpy/torch round ``dP * fg / 5.0`` then ``*= scale``."""
    h, w = dP.shape[1], dP.shape[2]
    row = 2 * (w + 2)
    im = np.zeros((h + 2) * row, np.float32)
    five = np.float32(5.0)
    for i in numba.prange(h):
        for j in range(w):
            vx, vy = dP[1, i, j], dP[0, i, j]
            if masked:
                keep = np.float32(1.0) if fg[i, j] else np.float32(0.0)
                vx, vy = vx * keep / five, vy * keep / five
            im[(i + 1) * row + 2 * (j + 1)] = vx * scale_x
            im[(i + 1) * row + 2 * (j + 1) + 1] = vy * scale_y
    return im


@numba.njit(cache=True, parallel=True)
def _follow_2d(im: np.ndarray, h: int, w: int, frame: np.ndarray, pts: np.ndarray, niter: int, threads: int) -> np.ndarray:
    """Positions (N, 2) = normalised (x, y) after ``niter`` steps through the padded flow image
    ``im`` of an (h, w) window of an image (``frame`` = (image height, width, window y0, x0); the whole
    image is (h, w, 0, 0)). Blocks of 1024 pixels are dealt round-robin to ``threads`` workers."""
    out = np.empty_like(pts)
    n = pts.shape[0]
    block = 1024
    n_blocks = (n + block - 1) // block
    for t in numba.prange(threads):
        for b in range(t, n_blocks, threads):
            _follow_block(im, w, h, frame, pts, out, b * block, min(n, (b + 1) * block), niter)
    return out


def _kernel_matches_torch() -> bool:
    """Whether the compiled step rounds exactly like this torch build's CPU ``grid_sample`` (FMA
    arithmetic, as in x86 AVX2/AVX-512 builds); probed once on random data."""
    rng = np.random.default_rng(0)
    im = rng.normal(0, 0.1, (2, 16, 20)).astype(np.float32)
    pts = rng.uniform(-1.0, 1.0, (4096, 2)).astype(np.float32)
    ref = F.grid_sample(torch.from_numpy(im)[None], torch.from_numpy(pts)[None, None], align_corners=False)
    ref = (torch.from_numpy(pts)[None, None] + ref[0, :, 0].T[None, None]).clamp(-1, 1)[0, 0].numpy()
    padded = _padded_flow_image(im[::-1].copy(), _NO_MASK, False, np.float32(1), np.float32(1))
    try:
        same = bool(np.array_equal(_follow_2d(padded, 16, 20, np.array([16, 20, 0, 0]), pts, 1, 1), ref))
    except (numba.core.errors.NumbaError, RuntimeError) as err:  # e.g. an LLVM too old for the kernel's IR
        warnings.warn(f"compiled flow following unavailable ({err}); using torch (slower)", stacklevel=3)
        return False
    if not same:
        warnings.warn("compiled flow following does not round like this torch build; using torch (slower)", stacklevel=3)
    return same


_FAST_2D: bool | None = None
_NO_MASK = np.ones((1, 1), bool)


def _euler_torch(im: torch.Tensor, pt: torch.Tensor, niter: int) -> torch.Tensor:
    """cellpose's ``steps_interp`` loop verbatim (used for 3D)."""
    for _ in range(niter):
        dPt = F.grid_sample(im, pt, align_corners=False)
        for k in range(pt.shape[-1]):
            pt[..., k] += dPt[:, k]
            torch.clamp_(pt[..., k], -1.0, 1.0)
    return pt.reshape(-1, pt.shape[-1])


def _follow(dP: np.ndarray, fg: np.ndarray, inds: tuple[np.ndarray, ...], niter: int,
            frame: Frame | None = None) -> torch.Tensor:
    """Final integer positions (ndim, N) of the pixels ``inds`` after ``niter`` Euler steps through the
    flow ``dP * fg / 5.0`` (pixels per step), without materialising the masked flows in 2D.

    Positions are normalised to [-1, 1] with the align_corners=True convention but sampled with
    align_corners=False, as cellpose does. In 2D the compiled kernel runs when it reproduces the
    local torch's rounding; otherwise (and in 3D) cellpose's torch loop runs.

    ``frame`` (2D): the arrays are a window of a larger image; positions are computed in the image's
    normalised coordinates, as a whole-image run computes them, and returned in the window's pixels."""
    global _FAST_2D
    shape = dP.shape[1:]
    ndim = len(shape)
    if ndim == 2 and _FAST_2D is None:
        _FAST_2D = _kernel_matches_torch()
    if frame is not None and not (ndim == 2 and _FAST_2D):
        warnings.warn("flow following in a window is exact only with the compiled 2D kernel", stacklevel=3)
        frame = None
    full, origin = (frame.shape, frame.origin) if frame is not None else (shape, (0,) * ndim)
    pt = torch.zeros((len(inds[0]), ndim), dtype=torch.float32)
    for n in range(ndim):
        pt[:, ndim - n - 1] = torch.from_numpy(inds[n] + origin[n]).to(dtype=torch.float32)
    size = np.array(full)[::-1].astype("float") - 1
    for k in range(ndim):
        pt[:, k] /= size[k]
    pt *= 2
    pt -= 1
    if ndim == 2 and _FAST_2D:
        scale = [np.float32(2.0 / size[k]) for k in range(ndim)]
        im = _padded_flow_image(dP, fg, True, scale[0], scale[1])
        geometry = np.array([*full, *origin], np.int64)
        pt = torch.from_numpy(_follow_2d(im, shape[0], shape[1], geometry, pt.numpy(), niter, numba.get_num_threads()))
    else:
        im = torch.zeros((1, ndim, *shape), dtype=torch.float32)
        for n in range(ndim):
            im[0, ndim - n - 1] = torch.from_numpy(dP[n] * fg / 5.0)
        for k in range(ndim):
            im[:, k] *= 2.0 / size[k]
        pt = _euler_torch(im, pt.view(*[1] * ndim, -1, ndim), niter)
    pt += 1
    pt *= 0.5
    for k in range(ndim):
        pt[:, k] *= size[k]
    pt = pt[:, list(range(ndim))[::-1]].T.int()
    for n in range(ndim):
        pt[n] -= origin[n]
    return pt


def _max_pool(h: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Max filter (stride 1, same size) over the spatial axes of (B, *spatial)."""
    k0 = kernel_size // 2
    out = h
    for axis in range(1, h.ndim):
        src = out
        out = src.clone()
        n = src.shape[axis]
        for d in range(-k0, k0 + 1):
            mv = out.narrow(axis, max(-d, 0), n - abs(d))
            hv = src.narrow(axis, max(d, 0), n - abs(d))
            torch.maximum(mv, hv, out=mv)
    return out


@numba.njit(cache=True)
def _histogram_seeds(pt: np.ndarray, shape3: np.ndarray, rpad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Histogram of final positions and its seeds, as cellpose's ``get_masks_torch``.

    ``pt`` (ndim, N) int positions, ``shape3`` the (Z, Y, X) image shape (Z = 1 for 2D, where
    the histogram is not padded in z). Positions are shifted by ``rpad`` and clamped into
    the padded histogram. Returns (flat bin of each pixel (N,), histogram (flat int32), seeds
    (n, 3) in row-major order: bins with > 10 pixels that equal the maximum of their 5×5(×5)
    window, clipped at the borders).
    """
    zpad = rpad if shape3[0] > 1 else 0
    d, h, w = shape3[0] + 2 * zpad, shape3[1] + 2 * rpad, shape3[2] + 2 * rpad
    hist = np.zeros(d * h * w, np.int32)
    flat = np.empty(pt.shape[1], np.int64)
    a = pt.shape[0] - 2  # row of y
    for n in range(pt.shape[1]):
        z = min(max(pt[0, n] + zpad, 0), shape3[0] + zpad - 1) if a else 0
        y = min(max(pt[a, n] + rpad, 0), shape3[1] + rpad - 1)
        x = min(max(pt[a + 1, n] + rpad, 0), shape3[2] + rpad - 1)
        flat[n] = (z * h + y) * w + x
        hist[flat[n]] += 1
    seeds = []
    for q in range(hist.size):
        c = hist[q]
        if c <= 10:
            continue
        z, y, x = q // (h * w), (q // w) % h, q % w
        peak = True
        for zz in range(max(z - 2, 0), min(z + 3, d)):
            for yy in range(max(y - 2, 0), min(y + 3, h)):
                for xx in range(max(x - 2, 0), min(x + 3, w)):
                    if hist[(zz * h + yy) * w + xx] > c:
                        peak = False
        if peak:
            seeds.append((z, y, x))
    out = np.empty((len(seeds), 3), np.int64)
    for k, (z, y, x) in enumerate(seeds):
        out[k, 0], out[k, 1], out[k, 2] = z, y, x
    return flat, hist, out


@numba.njit(cache=True)
def _label_counts(masks: np.ndarray) -> np.ndarray:
    """Pixels per label value 0..max (int64)."""
    flat = masks.reshape(-1)
    counts = np.zeros(int(flat.max()) + 1, np.int64)
    for v in flat:
        counts[v] += 1
    return counts


@numba.njit(cache=True)
def _relabel(masks: np.ndarray, keep: np.ndarray) -> None:
    """In place: labels ``v`` with ``keep[v]`` False become 0, the others are renumbered 1..N in
    order of first appearance (row-major), as ``fastremap.mask`` then ``fastremap.renumber``."""
    flat = masks.reshape(-1)
    lut = np.where(keep, -1, 0)
    lut[0] = 0
    n = 0
    for i in range(flat.size):
        v = flat[i]
        if lut[v] < 0:
            n += 1
            lut[v] = n
        flat[i] = lut[v]


@numba.njit(cache=True)
def _scatter_labels(out: np.ndarray, inds: tuple[np.ndarray, ...], labels: np.ndarray, flat: np.ndarray) -> None:
    """``out[inds[0][n], inds[1][n](, ...)] = labels[flat[n]]`` for every followed pixel n."""
    o = out.reshape(-1)
    for n in range(len(flat)):
        q = 0
        for ax in range(len(inds)):
            q = q * out.shape[ax] + inds[ax][n]
        o[q] = labels[flat[n]]


def get_masks(pt: torch.Tensor, inds: tuple[np.ndarray, ...], shape0: tuple[int, ...], max_size_fraction: float = 0.4) -> np.ndarray:
    """Labels from final pixel positions ``pt`` (ndim, N, int): histogram peaks seed masks.

    Same rules as cellpose's ``get_masks_torch``: 20-pixel histogram padding, seeds are 5×5(×5)
    maxima with > 10 pixels, grown 5 times with a 3×3 max filter over bins holding > 2 pixels;
    then masks above ``max_size_fraction`` of the image are removed and labels renumbered.
    """
    ndim = len(shape0)
    rpad = 20
    shape3 = np.array([1] * (3 - ndim) + list(shape0), np.int64)
    flat, hist, seeds = _histogram_seeds(pt.numpy(), shape3, rpad)
    if len(seeds) == 0:
        return np.zeros(shape0, np.uint16)
    shape = tuple(np.array(shape0) + 2 * rpad)
    h1 = torch.from_numpy(hist).view(shape)
    seeds1 = torch.from_numpy(seeds[:, 3 - ndim :])
    npts = h1[tuple(seeds1.T)]
    seeds1 = seeds1[npts.argsort()]
    n_seeds = len(seeds1)
    offs = torch.meshgrid(ndim * [torch.arange(-5, 6)], indexing="ij")
    strides = [int(np.prod(shape[i + 1 :])) for i in range(ndim)]
    box = sum(o * s for o, s in zip(offs, strides)).flatten()
    centre = sum(seeds1[:, i] * strides[i] for i in range(ndim))
    h_slc = h1.view(-1)[box + centre[:, None]].reshape(n_seeds, *[11] * ndim)
    seed_masks = torch.zeros((n_seeds, *[11] * ndim))
    seed_masks[(slice(None), *[5] * ndim)] = 1
    for _ in range(5):
        seed_masks = _max_pool(seed_masks, 3)
        seed_masks *= h_slc > 2
    dtype = torch.int32 if n_seeds < 2**16 else torch.int64
    M1 = torch.zeros(int(np.prod(shape)), dtype=dtype)
    ipix = torch.nonzero(seed_masks).to(dtype)
    mask_idx = ipix[:, 0]
    mask_pos = ipix[:, 1:] + seeds1[mask_idx] - 5
    flat_pos = sum(mask_pos[:, i] * strides[i] for i in range(ndim))
    M1.scatter_reduce_(0, flat_pos, mask_idx + 1, reduce="amax", include_self=False)
    M0 = np.zeros(shape0, np.uint16 if n_seeds < 2**16 else np.uint32)
    _scatter_labels(M0, tuple(inds), M1.numpy(), flat)
    _relabel(M0, _label_counts(M0) <= np.prod(shape0) * max_size_fraction)
    return M0


@numba.njit(cache=True, inline="always")
def _block_sum(a: np.ndarray, lo: int, n: int) -> float:
    """numpy's pairwise-sum leaf (n ≤ 128): 8 running sums, combined as a tree, then the rest."""
    if n < 8:
        res = -0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r = a[lo : lo + 8].copy()
    i = 8
    while i < n - (n % 8):
        for j in range(8):
            r[j] += a[lo + i + j]
        i += 8
    res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@numba.njit(cache=True)
def _pairwise_sum(a: np.ndarray, n: int) -> float:
    """Sum of ``a[:n]`` (float64) in numpy's pairwise order (so ``/ n`` equals ``np.mean``).

    numpy halves a block (to a multiple of 8) until it has ≤ 128 values and adds the two halves'
    sums; this walks the same tree with an explicit stack (numba cannot cache recursion).
    """
    lo = np.zeros(64, np.int64)
    size = np.zeros(64, np.int64)
    state = np.zeros(64, np.int64)  # 0: split pending, 1: left half done, 2: both done
    left = np.zeros(64)
    size[0] = n
    top = 0
    value = 0.0
    while top >= 0:
        if size[top] <= 128 or state[top] == 2:
            value = _block_sum(a, lo[top], size[top]) if size[top] <= 128 else left[top] + value
            top -= 1
            if top >= 0:
                if state[top] == 0:
                    left[top], state[top] = value, 1
                else:
                    state[top] = 2
            continue
        half = size[top] // 2
        half -= half % 8
        if state[top] == 0:
            lo[top + 1], size[top + 1] = lo[top], half
        else:
            lo[top + 1], size[top + 1] = lo[top] + half, size[top] - half
        state[top + 1] = 0
        top += 1
    return value


@numba.njit(cache=True, parallel=True)
def _flow_errors_2d(padded: np.ndarray, heat: np.ndarray, labels: np.ndarray, boxes: np.ndarray, dP: np.ndarray) -> np.ndarray:
    """Per object: mean over its pixels of |unit flow from ``heat`` − dP / 5|², each operation
    rounded as the float64 numpy expression cellpose evaluates on the whole image."""
    out = np.zeros(len(labels))
    five = np.float32(5.0)
    for k in numba.prange(len(labels)):
        y0, y1, x0, x1 = boxes[k, 0], boxes[k, 1], boxes[k, 2], boxes[k, 3]
        vals = np.empty((y1 - y0) * (x1 - x0))
        m = 0
        for y in range(y0 + 1, y1 + 1):  # padded coordinates
            for x in range(x0 + 1, x1 + 1):
                if padded[y, x] == labels[k]:
                    gy = np.float64(heat[y + 1, x] - heat[y - 1, x])
                    gx = np.float64(heat[y, x + 1] - heat[y, x - 1])
                    norm = 1e-60 + np.sqrt(gy * gy + gx * gx)
                    ey = gy / norm - np.float64(dP[0, y - 1, x - 1] / five)
                    ex = gx / norm - np.float64(dP[1, y - 1, x - 1] / five)
                    vals[m] = ey * ey + ex * ex
                    m += 1
        out[k] = _pairwise_sum(vals, m) / m
    return out


def flow_errors(masks: np.ndarray, dP: np.ndarray, niter: int | None = None) -> np.ndarray:
    """Per-mask mean squared difference between the masks' own flows (``niter`` diffusion iterations,
    default cellpose's) and ``dP / 5`` (2D; one value per label present, in ascending order). Works
    per object: no full-image flow arrays."""
    padded, heat, labels, boxes = solve_heat(masks, niter)
    return _flow_errors_2d(padded, heat, labels, boxes, np.asarray(dP, np.float32))


def remove_bad_flow_masks(masks: np.ndarray, dP: np.ndarray, threshold: float = 0.4, niter: int | None = None) -> np.ndarray:
    """Drop masks whose flow error (:func:`flow_errors`) exceeds ``threshold``; renumber (in place).
    Labels must be 1..N."""
    errors = flow_errors(masks, dP, niter)
    if len(errors) != masks.max():
        raise ValueError(f"labels must be 1..N without gaps: {len(errors)} labels present, max {masks.max()}")
    _relabel(masks, np.concatenate([[True], ~(errors > threshold)]))
    return masks


@numba.njit(cache=True)
def _fill_holes(masks: np.ndarray, volume: bool) -> None:
    """In place, for the labels present in ascending order (k = 0, 1, ...): every pixel of the
    label's bounding box that has the label or is enclosed by it (not connected to the box border
    through other pixels, 6-/4-connected) becomes k + 1.

    ``masks`` is (Z, Y, X), Z = 1 for a 2D image (``volume`` False). Same result as cellpose's
    ``ndi.binary_fill_holes`` on each box in turn.
    """
    d0, h0, w0 = masks.shape
    n_labels = int(masks.max()) + 1
    lo = np.full((n_labels, 3), 1 << 62, np.int64)
    hi = np.full((n_labels, 3), -1, np.int64)
    for z in range(d0):
        for i in range(h0):
            for j in range(w0):
                v = masks[z, i, j]
                if v == 0:
                    continue
                if hi[v, 0] < 0:  # first pixel in scan order: smallest z
                    lo[v, 0] = z
                lo[v, 1], lo[v, 2] = min(lo[v, 1], i), min(lo[v, 2], j)
                hi[v, 0], hi[v, 1], hi[v, 2] = z + 1, max(hi[v, 1], i + 1), max(hi[v, 2], j + 1)
    size = 1
    for lab in range(1, n_labels):
        size = max(size, (hi[lab, 0] - lo[lab, 0]) * (hi[lab, 1] - lo[lab, 1]) * (hi[lab, 2] - lo[lab, 2]))
    queue = np.empty((size, 3), np.int64)
    outside = np.zeros(size, np.bool_)
    k = 0
    for lab in range(1, n_labels):
        if hi[lab, 0] < 0:
            continue
        z0, y0, x0 = lo[lab, 0], lo[lab, 1], lo[lab, 2]
        d, h, w = hi[lab, 0] - z0, hi[lab, 1] - y0, hi[lab, 2] - x0
        outside[: d * h * w] = False
        n = 0
        for z in range(d):
            for i in range(h):
                for j in range(w):
                    border = i == 0 or i == h - 1 or j == 0 or j == w - 1 or (volume and (z == 0 or z == d - 1))
                    if border and masks[z0 + z, y0 + i, x0 + j] != lab:
                        outside[(z * h + i) * w + j] = True
                        queue[n, 0], queue[n, 1], queue[n, 2] = z, i, j
                        n += 1
        while n > 0:
            n -= 1
            z, i, j = queue[n, 0], queue[n, 1], queue[n, 2]
            for dz, di, dj in ((0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1), (-1, 0, 0), (1, 0, 0)):
                zz, ii, jj = z + dz, i + di, j + dj
                if 0 <= zz < d and 0 <= ii < h and 0 <= jj < w:
                    q = (zz * h + ii) * w + jj
                    if not outside[q] and masks[z0 + zz, y0 + ii, x0 + jj] != lab:
                        outside[q] = True
                        queue[n, 0], queue[n, 1], queue[n, 2] = zz, ii, jj
                        n += 1
        k += 1
        for z in range(d):
            for i in range(h):
                for j in range(w):
                    if not outside[(z * h + i) * w + j]:
                        masks[z0 + z, y0 + i, x0 + j] = k


def fill_holes_and_remove_small_masks(masks: np.ndarray, min_size: int = 15) -> np.ndarray:
    """Remove masks < ``min_size`` px, fill holes of each mask (in label order, renumbering them
    1..N), remove small masks again; returns a new array. Holes are 4-connected in 2D,
    6-connected in 3D; ``min_size`` ≤ 0 skips the removals."""
    masks = np.array(masks, order="C")
    if min_size > 0:
        _relabel(masks, _label_counts(masks) >= min_size)
    _fill_holes(masks if masks.ndim == 3 else masks[None], masks.ndim == 3)
    if min_size > 0:
        _relabel(masks, _label_counts(masks) >= min_size)
    return masks


@dataclass(frozen=True)
class Frame:
    """Where a window lies in its image: the image's ``shape`` and the window's top-left ``origin`` (px)."""

    shape: tuple[int, int]
    origin: tuple[int, int]


def compute_masks(
    dP: np.ndarray,
    cellprob: np.ndarray,
    niter: int = 200,
    cellprob_threshold: float = 0.0,
    flow_threshold: float = 0.4,
    min_size: int = 15,
    max_size_fraction: float = 0.4,
) -> np.ndarray:
    """Instance masks from flows and cell probability (2D or 3D), identical to cellpose 4.2.1.1.

    Args:
        dP: (2, Y, X) or (3, Z, Y, X) flows at the network's scale (≈ 5 × unit flows).
        cellprob: (Y, X) or (Z, Y, X) cell-probability logits.
        niter: Euler steps of flow following.
        cellprob_threshold: pixels with ``cellprob > cellprob_threshold`` are followed.
        flow_threshold: masks whose flow error exceeds it are removed (2D only, as cellpose);
            0 or None disables the QC.
        min_size: masks smaller than this (px) are removed, after hole filling; ≤ 0 disables both.
        max_size_fraction: masks covering more than this fraction of the image are removed.
    Returns:
        uint16 label image (uint32 above 65535 masks), 0 = background, labels 1..N.
    """
    mask = follow_masks(dP, cellprob, niter, cellprob_threshold, max_size_fraction)
    return finish_masks(mask, dP, flow_threshold, min_size)


def follow_masks(dP: np.ndarray, cellprob: np.ndarray, niter: int = 200, cellprob_threshold: float = 0.0,
                 max_size_fraction: float = 0.4, frame: Frame | None = None) -> np.ndarray:
    """The first half of :func:`compute_masks`: flow following and histogram seeds, before the flow
    QC and the size clean-up (labels 1..N, uint32 or narrower). ``frame``: the arrays are a window of
    a larger (2D) image, followed as a whole-image run follows them (see :func:`_follow`)."""
    dP, cellprob = _check_inputs(dP, cellprob)
    fg = cellprob > cellprob_threshold
    if not fg.any():
        return np.zeros(cellprob.shape, np.uint16)
    inds = np.nonzero(fg)
    p_final = _follow(dP, fg, inds, niter, frame)
    return get_masks(p_final, inds, dP.shape[1:], max_size_fraction=max_size_fraction)


def finish_masks(mask: np.ndarray, dP: np.ndarray, flow_threshold: float = 0.4, min_size: int = 15,
                 heat_niter: int | None = None) -> np.ndarray:
    """The second half of :func:`compute_masks` on :func:`follow_masks`' labels: the flow QC (2D; its
    diffusion runs ``heat_niter`` iterations, default cellpose's for these masks), hole filling and
    small-mask removal."""
    if dP.shape[0] == 2 and mask.max() > 0 and flow_threshold:
        mask = remove_bad_flow_masks(mask, dP, threshold=flow_threshold, niter=heat_niter)
    if mask.max() < 2**16:
        mask = mask.astype(np.uint16, copy=False)
    if min_size > 0:
        mask = fill_holes_and_remove_small_masks(mask, min_size=min_size)
    if mask.dtype == np.uint32 and mask.max() < 2**16:
        mask = mask.astype(np.uint16)
    return mask
