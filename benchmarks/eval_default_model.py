"""Accuracy and robustness of a segmentation model on the DSB 2018 validation split, beside the classical baseline.

Every image goes through the user path, ``load_model(...).segment(raw RGB image)`` given at native size,
with default parameters and no diameter, so the model's size estimate sets the resize if it has a size
head (``--diameter auto|PX`` and ``--tta`` change that). Prints (and writes as JSON) mean AP@0.5/0.75/0.9 and the
error rate at 0.5 per modality and overall; with ``--robustness`` also AP@0.5 under the
perturbations of the Cellpose-SAM paper's Figure 3:

- ``permute``: channels rolled (R,G,B → B,R,G); gray images are given as one channel in the blue slot
- ``invert``: 255 − image
- ``resize0.5`` / ``resize2``: image rescaled (bilinear, anti-aliased) and labels rescaled (nearest)
- ``poisson``: shot noise with 10 photons at the 99th percentile of each image
- ``blur``: Gaussian blur, σ = 2 px

    python benchmarks/eval_default_model.py --threads 2 --robustness --out out/eval_default.json
    python benchmarks/eval_default_model.py --threads 2 --robustness --perturbations resize0.5 resize2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.transform import rescale

from phenoscope.datasets import data_root, dsb_image, dsb_index, dsb_labels
from phenoscope.eval.segmentation import average_precision, error_rate
from phenoscope.segment import load_model, segment_classic
from phenoscope.segment.files import parse_diameter

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.5, 0.75, 0.9)
PERTURBATIONS = ("original", "permute", "invert", "resize0.5", "resize2", "poisson", "blur")


def perturb(image: np.ndarray, labels: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image and labels under one perturbation (labels change only when resized)."""
    x = image.astype(np.float32)
    if kind == "original":
        return image, labels
    if kind == "permute":
        gray = np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2])
        return (np.stack([0 * x[..., 0], 0 * x[..., 0], x[..., 0]], -1) if gray else x[..., [2, 0, 1]]), labels
    if kind == "invert":
        return 255 - x, labels
    if kind.startswith("resize"):
        f = float(kind.removeprefix("resize"))
        img = rescale(x, f, channel_axis=-1, order=1, anti_aliasing=f < 1, preserve_range=True)
        lab = rescale(labels, f, order=0, anti_aliasing=False, preserve_range=True).astype(labels.dtype)
        return img, lab
    if kind == "poisson":
        peak = np.percentile(x, 99) or 1.0
        return rng.poisson(x * (10.0 / peak)).astype(np.float32), labels
    if kind == "blur":
        return ndi.gaussian_filter(x, (2, 2, 0)), labels
    raise ValueError(kind)


def summarise(ap: np.ndarray, tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, groups: np.ndarray) -> dict:
    """Mean AP per threshold and error rate at 0.5, overall and per group."""
    err = error_rate(tp, fp, fn)[:, 0]
    out = {}
    for name in ["all", *sorted(set(groups))]:
        sel = np.ones(len(groups), bool) if name == "all" else groups == name
        out[name] = {"n": int(sel.sum()), **{f"ap{int(100 * t)}": float(np.nanmean(ap[sel, i])) for i, t in enumerate(THRESHOLDS)},
                     "error_rate50": float(np.nanmean(err[sel]))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", default=str(data_root() / "dsb2018_train"))
    parser.add_argument("--split", default=str(ROOT / "phenoscope" / "models" / "dsb2018_val_ids.txt"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--robustness", action="store_true", help="also evaluate the perturbations")
    parser.add_argument("--perturbations", nargs="+", choices=PERTURBATIONS[1:], default=None,
                        help="with --robustness: only these perturbations (default: all)")
    parser.add_argument("--diameter", type=parse_diameter, default=None,
                        help="passed to model.segment: px, or 'auto' (default: native size)")
    parser.add_argument("--tta", action="store_true", help="passed to model.segment: average over tile flips")
    parser.add_argument("--max-images", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = [s.strip() for s in Path(args.split).read_text().splitlines() if s.strip() and not s.startswith("#")]
    ids = ids[: args.max_images] if args.max_images else ids
    index = dsb_index(args.data).set_index("image_id")
    groups = index.loc[ids, "modality_heuristic"].to_numpy()
    model = load_model(args.model)
    results: dict = {"model": args.model, "diameter": args.diameter, "tta": args.tta, "n_images": len(ids), "split": args.split}
    kinds = ("original", *(args.perturbations or PERTURBATIONS[1:])) if args.robustness else ("original",)
    methods = [("model", lambda im: model.segment(im, diameter=args.diameter, tta=args.tta).masks)] + [("classic", lambda im: segment_classic(im))]
    for kind in kinds:
        for name, seg in methods if kind == "original" else methods[:1]:
            rng = np.random.default_rng(0)
            truth, preds, t0 = [], [], time.perf_counter()
            for image_id in ids:
                img, lab = perturb(dsb_image(args.data, image_id), dsb_labels(args.data, image_id), kind, rng)
                truth.append(lab)
                preds.append(seg(img))
            scores = summarise(*average_precision(truth, preds, THRESHOLDS), groups)
            results.setdefault(kind, {})[name] = scores
            line = "  ".join(f"{g}: {s['ap50']:.3f}" for g, s in scores.items())
            a = scores["all"]
            print(f"{kind:>10} {name:>8}  AP50 {a['ap50']:.3f} AP75 {a['ap75']:.3f} AP90 {a['ap90']:.3f} "
                  f"err50 {a['error_rate50']:.3f} | AP50 by modality: {line}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
