"""Single-cell embedding throughput: phenoscope vs the dinov2 reference forward, same ViT-S/8 5-channel weights (CPU).

Both sides get the same self-normalised crops in the same batches and produce CLS ⊕ mean patch
features; the reference is Meta's ``dinov2`` package (``forward_features`` under ``torch.no_grad``,
as its evaluation scripts run it). Crops come from real DSB 2018 nuclei (RGB + two derived channels)
when ``../shared/data`` is present, else from generated nuclei. Prints crops/s, the ratio and the
largest feature difference, for each crop size: 128 px is the size of the Cell-DINO paper's
single-cell Cell Painting images (the 5-channel ViT-S/8 case), 64 px a small nucleus crop.

    python benchmarks/bench_embed.py --threads 2 --crop 128 64 --n-crops 256
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from phenoscope.datasets import data_root
from phenoscope.ssl.augment import self_normalize
from phenoscope.ssl.checkpoint import load_dinov2_backbone
from phenoscope.ssl.data import cell_crops
from phenoscope.ssl.embed import EmbedConfig, embed_crops

DSB = data_root() / "dsb2018_train"


def crops_5ch(n: int, size: int) -> np.ndarray:
    """(n, 5, size, size) cell crops: DSB RGB + (gray, gradient magnitude), or generated nuclei."""
    from scipy import ndimage as ndi

    out = []
    if DSB.exists():
        from phenoscope.datasets import dsb_image, dsb_index, dsb_labels

        sources = ((dsb_image(DSB, i), dsb_labels(DSB, i)) for i in dsb_index(DSB).image_id)
    else:
        from phenoscope.datasets import synthetic_nuclei

        sources = ((np.repeat(img[..., None], 3, -1), lab) for img, lab in (synthetic_nuclei(seed=s) for s in range(1000)))
    for rgb, lab in sources:
        gray = rgb.astype(np.float32).mean(-1)
        image = np.concatenate([np.moveaxis(rgb.astype(np.float32), -1, 0), gray[None], ndi.sobel(gray)[None]])
        out.append(cell_crops(image, lab, size)[0])
        if sum(len(c) for c in out) >= n:
            break
    return np.concatenate(out)[:n]


def reference(seed: int = 0):
    import dinov2.models.vision_transformer as vt

    torch.manual_seed(seed)
    ref = vt.vit_small(patch_size=8, img_size=224, in_chans=5, init_values=1.0, block_chunks=0)
    with torch.no_grad():  # random weights; layer scales and norm gains around 1
        for name, p in ref.named_parameters():
            scale = name.endswith("gamma") or ("norm" in name and name.endswith("weight"))
            p.copy_(torch.rand_like(p) + 0.5 if scale else torch.randn_like(p) * 0.05)
    return ref.eval()


@torch.no_grad()
def reference_features(ref, crops: np.ndarray, batch: int) -> np.ndarray:
    out = []
    for s in range(0, len(crops), batch):
        f = ref.forward_features(self_normalize(torch.from_numpy(crops[s : s + batch])))
        out.append(torch.cat([f["x_norm_clstoken"], f["x_norm_patchtokens"].mean(1)], -1).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--crop", type=int, nargs="+", default=[128, 64], help="crop sizes in px, measured one after another")
    parser.add_argument("--n-crops", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref = reference()
    ours = load_dinov2_backbone({k: v.clone() for k, v in ref.state_dict().items()}).eval()
    for size in args.crop:
        compare(ref, ours, crops_5ch(args.n_crops, size), args.batch_size, args.repeats, args.threads)


def compare(ref, ours, crops: np.ndarray, batch: int, repeats: int, threads: int) -> None:
    """Time both forwards on the same crops (interleaved, best of ``repeats``); print crops/s and the ratio."""
    cfg = EmbedConfig(crop_size=crops.shape[-1], batch_size=batch)
    runs = {"dinov2 reference": lambda: reference_features(ref, crops, batch),
            "phenoscope": lambda: embed_crops(ours, crops, cfg, torch.device("cpu"))}
    feats, best = {}, {}
    for _ in range(repeats):  # interleaved, so both see the same machine load
        for name, fn in runs.items():
            t0 = time.perf_counter()
            feats[name] = fn()
            best[name] = min(best.get(name, np.inf), time.perf_counter() - t0)
    print(f"{len(crops)} crops of 5×{crops.shape[-1]}², ViT-S/8, batch {batch}, {threads} threads, best of {repeats}")
    for name, t in best.items():
        print(f"  {name:<18} {len(crops) / t:8.1f} crops/s")
    diff = np.abs(feats["phenoscope"] - feats["dinov2 reference"]).max()
    print(f"speed-up: {best['dinov2 reference'] / best['phenoscope']:.2f}×  (goal ≥ 1.2×); max |feature diff| {diff:.2e}")


if __name__ == "__main__":
    main()
