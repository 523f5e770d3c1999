"""End-to-end time of the default model on a 1024×1024 image on CPU (2 threads), beside cellpose cpsam.

Times ``load_model().segment(image)`` (size estimate, normalisation, tiles, blending, flow dynamics with QC)
and the whole ``phenoscope segment`` per-image step (read, segment, write masks + cell table).
Images: the densest real 1024² DSB 2018 image (when ``../shared/data`` is there) and a dense generated one.
With ``--cpsam-tiles N`` it also times cellpose 4.2.1.1's CPSAM (random weights, fp32) on N 256²
tiles and extrapolates to the 25 tiles cellpose needs for this image, for the ratio.

    python benchmarks/bench_default_speed.py --threads 2 --repeats 3 --cpsam-tiles 2
    python benchmarks/bench_default_speed.py --threads 2 --diameter auto   # two passes, resized
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from phenoscope.datasets import data_root
from phenoscope.segment.files import parse_diameter

DSB = data_root() / "dsb2018_train"


def sample_images() -> list[tuple[np.ndarray, str]]:
    """1024² images: the DSB 1024×1024 image with the most nuclei (if the data is there) and a dense
    generated one (the demo sample tiled 2×2: 320 nuclei)."""
    from phenoscope.datasets import synthetic_nuclei

    img, _ = synthetic_nuclei((512, 512), n=80)
    out = [(np.tile(img, (2, 2)), "generated, 320 nuclei")]
    if DSB.exists():
        from phenoscope.datasets import dsb_image, dsb_index

        idx = dsb_index(DSB)
        big = idx[(idx.height == 1024) & (idx.width == 1024)]
        row = big.loc[big.n_objects.idxmax()]
        out.insert(0, (dsb_image(DSB, row.image_id), f"DSB {row.image_id[:12]}… RGB, {row.n_objects} nuclei annotated"))
    return out


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cpsam_seconds(tiles: int, total_tiles: int) -> float:
    """cellpose CPSAM fp32 forward time for ``tiles`` tiles, scaled to ``total_tiles``."""
    from phenoscope.testing import import_cellpose

    net = import_cellpose().vit.CPSAM().eval()  # fp32
    x = torch.randn(tiles, 3, 256, 256)
    with torch.inference_mode():
        t0 = time.perf_counter()
        net(x)
    return (time.perf_counter() - t0) * total_tiles / tiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpsam-tiles", type=int, default=0, help="also time N cpsam tiles (0: skip)")
    parser.add_argument("--diameter", type=parse_diameter, default=None,
                        help="'auto' or px (default: the model's size estimate, native size without a size head)")
    parser.add_argument("--tta", action="store_true", help="average over tile flips, as `phenoscope segment --tta`")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from phenoscope.core.io import imwrite_tiff
    from phenoscope.core.tiling import tile_grid
    from phenoscope.segment import load_model
    from phenoscope.segment.files import SegmentParams, load_segmenter, segment_file

    model = load_model(args.model)
    n_tiles = len(list(tile_grid(1024, 1024, model.cfg.tile, 0.1, augment=args.tta)))
    print(f"{n_tiles} tiles of {model.cfg.tile}² per image; {args.threads} threads, best of {args.repeats}")
    diameter = args.diameter  # None, px or 'auto'
    for image, what in sample_images():
        res = model.segment(image, diameter=diameter, tta=args.tta)  # warm-up (numba compilation, oneDNN kernels)
        seg = best_of(lambda: model.segment(image, diameter=diameter, tta=args.tta), args.repeats)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "image.tif"
            imwrite_tiff(path, image)
            segmenter = load_segmenter(args.model, SegmentParams(diameter=diameter, tta=args.tta))
            end_to_end = best_of(lambda: segment_file(path, tmp, segmenter), args.repeats)
        size = f" (segmented at diameter {res.diameter:.1f} px)" if res.diameter else " (native size)"
        print(f"{what} → {res.masks.max()} cells{size}: model.segment {seg:.2f} s; "
              f"read + segment + write masks and cells.csv {end_to_end:.2f} s")
        if diameter is None and model.net.size is not None and res.diameter:
            estimate = best_of(lambda: model.estimate_diameter(image), args.repeats)
            fixed = best_of(lambda: model.segment(image, diameter=res.diameter, tta=args.tta), args.repeats)
            native = best_of(lambda: model.segment(image, diameter=model.cfg.diam_mean, tta=args.tta), args.repeats)
            print(f"    size estimate alone {estimate:.2f} s; one pass at that diameter {fixed:.2f} s "
                  f"(estimate + pass = {(estimate + fixed) / fixed:.2f}× the pass); native-size pass {native:.2f} s")
    if args.cpsam_tiles:
        cp = cpsam_seconds(args.cpsam_tiles, len(list(tile_grid(1024, 1024, 256, 0.1))))
        print(f"cellpose cpsam fp32, network alone on 25 tiles (extrapolated from {args.cpsam_tiles}): {cp:.0f} s "
              f"= {cp / seg:.0f}× the last image's model.segment")


if __name__ == "__main__":
    main()
