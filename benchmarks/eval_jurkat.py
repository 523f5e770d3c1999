"""Frozen-embedding evaluation on Jurkat cell-cycle crops (7,918 cells, 3 channels, 7 phases).

Stratified 5-fold CV, macro-F1, two classifiers: kNN (k=20, cosine, majority vote, on the
features as they are, except the handcrafted ones, which are standardised on the training part
because their units differ by orders of magnitude) and logistic regression (on standardised
features, its C chosen in every fold from ``PROBE_C`` = 1, 0.1, 0.01 on a 20 % holdout of the
training part: the 4,800 raw pixels need C = 0.01, the embeddings mostly C = 1); ``--mlp`` adds a
2-layer MLP probe (256 hidden units, early stopping). Feature sets, side by side in one run:

- ``handcrafted``: per-channel intensity statistics + shape of the DNA-channel object (Otsu);
- ``raw``: the 3×40×40 pixels;
- each ``--backbone NAME=PATH`` (``backbone.safetensors`` from ``phenoscope pretrain``, a ViT or a
  CNN): a ViT's class token (``NAME``) and class token + mean patch token (``NAME+avg``), a CNN's
  pooled feature map (``NAME``);
- ``random-NAME``: a randomly initialised network of NAME's architecture and preprocessing (one per
  architecture: the first backbone that has it names it).

Images go through `phenoscope embed`'s path with the preprocessing each checkpoint records.
Reference figures are printed next to our numbers, with ratios. ``--dna-content`` also reports how
well each feature set predicts the cell's DNA content (log integrated intensity of the DNA object,
the cue that separates G1, S and G2): 5-fold R² of a ridge regression.

    python benchmarks/eval_jurkat.py --backbone dino=runs/jurkat_dino/backbone.safetensors --lowshot
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import RidgeCV
from sklearn.metrics import f1_score
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from phenoscope.datasets.jurkat import DNA_CHANNEL, load_jurkat
from phenoscope.config import to_dict
from phenoscope.core.checkpoint import Preprocessing
from phenoscope.eval.probes import knn_scores, linear_probe_scores, mlp_scores, select_c, stratified_fraction
from phenoscope.ssl.augment import resize
from phenoscope.nn.cnn import CellCNN
from phenoscope.ssl.backbone import CellViT
from phenoscope.ssl.checkpoint import load_backbone_checkpoint
from phenoscope.ssl.embed import EmbedConfig, embed_crops

# Reference figures (stratified 5-fold macro-F1): (LogReg, kNN).
REFERENCE = {"handcrafted": (0.816, 0.685), "raw": (0.664, 0.591)}
STANDARDIZE_KNN = {"handcrafted"}  # sums of ~1e5 grey levels beside eccentricities <= 1
DNA_CONTENT = -4  # handcrafted column (from the end, so any channel count): the DNA object's integrated intensity


def handcrafted_features(images: np.ndarray) -> np.ndarray:
    """Per-channel intensity stats (mean, std, min, max, p10/50/90, sum) + DNA-object shape (N, 35)."""
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops

    x = images.astype(np.float32).reshape(len(images), images.shape[1], -1)
    stats = [x.mean(-1), x.std(-1), x.min(-1), x.max(-1), *np.percentile(x, [10, 50, 90], axis=-1), x.sum(-1)]
    shape = np.zeros((len(images), 11), dtype=np.float32)
    for i, img in enumerate(images[:, DNA_CHANNEL].astype(np.float32)):
        lab = label(img > threshold_otsu(img))
        props = regionprops(lab, intensity_image=img)
        if not props:
            continue
        r = max(props, key=lambda p: p.area)
        shape[i] = [r.area, r.perimeter, r.eccentricity, r.solidity, r.extent, r.axis_major_length, r.axis_minor_length,
                    r.intensity_mean * r.area, r.intensity_mean, r.intensity_max, r.euler_number]
    return np.concatenate([np.stack(stats, 1).reshape(len(images), -1), shape], axis=1)


def backbone_features(model: CellViT | CellCNN, images: np.ndarray, prep: Preprocessing, batch: int = 256) -> dict[str, np.ndarray]:
    """Features of every image through ``phenoscope embed``'s :func:`embed_crops` with the checkpoint's
    preprocessing (images first resized to the training views' size when that differs from theirs):
    ``{"": ...}`` a CNN's pooled map; a ViT's class token and ``"+avg"`` class token ⊕ mean patch token."""
    x = images.astype(np.float32)
    if prep.input_size and x.shape[-1] != prep.input_size:
        x = resize(torch.from_numpy(x), prep.input_size).numpy()
    feats = embed_crops(model.eval(), x, EmbedConfig(batch_size=batch), torch.device("cpu"), prep)
    if isinstance(model, CellCNN):
        return {"": feats}
    return {"": feats[:, : model.cfg.embed_dim], "+avg": feats}


def cross_validate(feats: np.ndarray, y: np.ndarray, fraction: float = 1.0, folds: int = 5, seed: int = 0,
                   knn_standardize: bool = False, mlp: bool = False) -> dict:
    """Mean macro-F1 over stratified folds (``logreg``, ``knn``, and ``mlp`` if asked), mean per-class F1
    (``<probe>_per_class``, one value per class in label order) and the C chosen in each fold (``logreg_C``);
    the training part is subsampled to ``fraction`` (stratified, at least one cell per class).
    ``knn_standardize`` runs kNN on features standardised with the training part's statistics."""
    classes = np.unique(y)
    per_class: dict[str, list[np.ndarray]] = {"logreg": [], "knn": [], **({"mlp": []} if mlp else {})}
    chosen = []
    for fold, (train_idx, test_idx) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(feats, y)):
        tr = train_idx[stratified_fraction(y[train_idx], fraction, seed + fold)]
        c = select_c(feats[tr], y[tr], seed=seed)[0]
        chosen.append(c)
        train_x, test_x = feats[tr], feats[test_idx]
        if knn_standardize:
            scaler = StandardScaler().fit(train_x)
            train_x, test_x = scaler.transform(train_x), scaler.transform(test_x)
        preds = {"logreg": linear_probe_scores(feats[tr], y[tr], feats[test_idx], len(classes), c, seed).argmax(1),
                 "knn": knn_scores(train_x, y[tr], test_x, len(classes), k=20, temperature=None).argmax(1)}
        if mlp:
            preds["mlp"] = mlp_scores(feats[tr], y[tr], feats[test_idx], len(classes), seed=seed).argmax(1)
        for name, pred in preds.items():
            per_class[name].append(f1_score(y[test_idx], pred, average=None, labels=classes, zero_division=0))
    out: dict = {"logreg_C": chosen}
    for name, f1s in per_class.items():
        out[name] = float(np.mean([f.mean() for f in f1s]))
        out[f"{name}_per_class"] = np.mean(f1s, axis=0).round(3).tolist()
    return out


def dna_content_r2(feats: np.ndarray, target: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Out-of-fold R² of a ridge regression (standardised features, alpha by inner CV) predicting ``target``."""
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 7)))
    pred = cross_val_predict(model, feats, target, cv=KFold(folds, shuffle=True, random_state=seed))
    return float(1 - np.mean((pred - target) ** 2) / np.var(target))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--npz", type=Path, default=None, help="the crops .npz (default: the shared data set)")
    ap.add_argument("--backbone", action="append", default=[], help="NAME=PATH to backbone.safetensors (repeatable)")
    ap.add_argument("--lowshot", action="store_true", help="also 1/5/10/100 %% label curves")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write results as JSON")
    ap.add_argument("--no-references", action="store_true", help="skip handcrafted / raw / random-init features")
    ap.add_argument("--mlp", action="store_true", help="also a 2-layer MLP probe")
    ap.add_argument("--dna-content", action="store_true", help="also R² of predicting log DNA content from each feature set")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    images, y, names = load_jurkat(args.npz)
    counts = np.bincount(y)
    print(f"{len(y)} cells; classes: " + ", ".join(f"{n} {c}" for n, c in zip(names, counts)))
    t0 = time.time()
    feats: dict[str, np.ndarray] = {}
    if not args.no_references:
        feats["handcrafted"] = handcrafted_features(images)
        feats["raw"] = images.reshape(len(images), -1).astype(np.float32)
    backbones = [(n, Path(p)) for n, p in (b.split("=", 1) for b in args.backbone)]
    architectures = set()
    for name, path in backbones:
        model, prep = load_backbone_checkpoint(path)
        arch = json.dumps([type(model).__name__, to_dict(model.cfg), prep.normalize], sort_keys=True)
        if not args.no_references and arch not in architectures:  # random init, same architecture and normalisation
            architectures.add(arch)
            rand = backbone_features(type(model)(model.cfg), images, prep)
            feats.update({f"random-{name}{suffix}": f for suffix, f in rand.items()})
        feats.update({f"{name}{suffix}": f for suffix, f in backbone_features(model, images, prep).items()})
    print(f"features in {time.time() - t0:.0f} s: " + ", ".join(f"{k} {v.shape[1]}" for k, v in feats.items()))
    results = {k: cross_validate(v, y, 1.0, args.folds, args.seed, k in STANDARDIZE_KNN, args.mlp) for k, v in feats.items()}
    print("\nstratified 5-fold macro-F1 (ratio = ours / the reference figure for that row, where one exists)")
    mlp_col = f"{'MLP':>8}" if args.mlp else ""
    print(f"{'features':<22}{'LogReg':>8}{'kNN':>8}{mlp_col}{'ref LR':>10}{'ref kNN':>10}{'ratio LR':>10}{'ratio kNN':>10}   LogReg C by fold")
    for k, r in results.items():
        ref = REFERENCE.get(k)
        extra = f"{ref[0]:>10.3f}{ref[1]:>10.3f}{r['logreg'] / ref[0]:>10.2f}{r['knn'] / ref[1]:>10.2f}" if ref else " " * 40
        mlp = f"{r['mlp']:>8.3f}" if args.mlp else ""
        print(f"{k:<22}{r['logreg']:>8.3f}{r['knn']:>8.3f}{mlp}{extra}   " + " ".join(f"{c:g}" for c in r["logreg_C"]))
    print("\nper-class kNN F1\n" + f"{'features':<22}" + "".join(f"{n[:9]:>10}" for n in names))
    for k, r in results.items():
        print(f"{k:<22}" + "".join(f"{f:>10.2f}" for f in r["knn_per_class"]))
    if "handcrafted" in results:
        hc = results["handcrafted"]
        ratios = [f"{k} LR x{r['logreg'] / hc['logreg']:.2f} kNN x{r['knn'] / hc['knn']:.2f}" for k, r in results.items() if k != "handcrafted"]
        print("\nratio to handcrafted (this run): " + ", ".join(ratios))
    lowshot = {}
    if args.lowshot:
        print("\nlow-shot macro-F1 (LogReg / kNN" + (" / MLP" if args.mlp else "") + ") by fraction of training labels")
        for k, v in feats.items():
            lowshot[k] = {f: cross_validate(v, y, f, args.folds, args.seed, k in STANDARDIZE_KNN, args.mlp) for f in (0.01, 0.05, 0.10)}
            lowshot[k][1.0] = results[k]
            print(f"{k:<22}" + "  ".join(f"{int(f * 100):>3}%: {r['logreg']:.3f}/{r['knn']:.3f}" + (f"/{r['mlp']:.3f}" if args.mlp else "")
                                          for f, r in lowshot[k].items()))
    dna_r2 = {}
    if args.dna_content:
        hc = feats["handcrafted"] if "handcrafted" in feats else handcrafted_features(images)
        target = np.log1p(hc[:, DNA_CONTENT])
        print("\nR² of log DNA content (ridge, 5-fold): DNA content is what separates G1, S and G2")
        for k, v in feats.items():
            if k != "handcrafted":  # it contains the target
                dna_r2[k] = dna_content_r2(v, target, args.folds, args.seed)
                print(f"{k:<22}{dna_r2[k]:>8.3f}")
    if args.out:
        from phenoscope.core.io import atomic_write

        with atomic_write(args.out, "w") as fh:
            json.dump({"full": results, "lowshot": {k: {str(f): r for f, r in v.items()} for k, v in lowshot.items()},
                       "dna_content_r2": dna_r2}, fh, indent=2)


if __name__ == "__main__":
    main()
