"""Frozen-embedding evaluation: temperature-weighted cosine kNN, linear probe, 2-layer MLP with
per-class thresholds, macro-F1 / mAP, and low-shot curves (mean ± sd over seeds).

Arrays: ``x`` (n, d) float features, ``y`` (n,) integer class ids in ``[0, n_classes)``.
Scores are (n, n_classes) class probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, f1_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler, label_binarize

Probe = Callable[[np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]
LOW_SHOT_FRACTIONS = (0.01, 0.02, 0.05, 0.10, 0.20, 0.50, 1.00)
PROBE_C = (1.0, 0.1, 0.01)  # linear-probe C grid (inverse L2 strength), searched on held-out training data


def knn_scores(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int, k: int = 20,
    temperature: float | None = 0.07,
) -> np.ndarray:
    """Cosine kNN class scores (n_test, n_classes): the top-``k`` cosine neighbours vote with weight
    exp(similarity / ``temperature``) (DINO's kNN), or one vote each when ``temperature`` is None
    (a majority vote: the argmax equals scikit-learn's ``KNeighborsClassifier(metric="cosine")``,
    ties going to the lowest class id). ``k`` is capped at the training-set size."""
    if k < 1 or (temperature is not None and temperature <= 0):
        raise ValueError("k must be ≥ 1 and temperature > 0 (or None)")
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sim = b @ a.T
    k = min(k, len(train_x))
    idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    w = np.ones(idx.shape) if temperature is None else np.exp(np.take_along_axis(sim, idx, axis=1) / temperature)
    scores = np.zeros((len(test_x), n_classes))
    np.add.at(scores, (np.repeat(np.arange(len(test_x)), k), train_y[idx].ravel()), w.ravel())
    return scores / scores.sum(axis=1, keepdims=True)


def _expand(proba: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((len(proba), n_classes))
    out[:, classes] = proba
    return out


def linear_probe_scores(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int, c: float | Sequence[float] = PROBE_C, seed: int = 0
) -> np.ndarray:
    """Standardised features → multinomial logistic regression (L2, ``C=c``).

    A sequence ``c`` is a grid: ``select_c`` picks one on held-out training data (never on ``test_x``).
    High-dimensional features such as raw pixels need strong regularisation, so a fixed C favours
    compact embeddings; the grid gives every feature set its own.
    """
    if not np.isscalar(c):
        c = select_c(train_x, train_y, tuple(c), seed=seed)[0]
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    model.fit(train_x, train_y)
    return _expand(model.predict_proba(test_x), model.classes_, n_classes)


def select_c(
    train_x: np.ndarray, train_y: np.ndarray, cs: Sequence[float] = PROBE_C, holdout: float = 0.2, seed: int = 0
) -> tuple[float, dict[float, float]]:
    """The linear probe's ``C`` from ``cs`` with the best macro-F1 on a ``holdout`` fraction of the training data.

    The split is stratified when every class has ≥ 2 samples. Returns (best C, {C: holdout macro-F1});
    ties go to the earlier C, and so does a split that leaves fewer than 2 classes to fit.
    """
    if not cs:
        raise ValueError("cs must hold at least one C")
    counts = np.unique(train_y, return_counts=True)[1]
    stratify = train_y if counts.min() >= 2 and round(holdout * len(train_y)) >= len(counts) else None
    fit, val = train_test_split(np.arange(len(train_y)), test_size=holdout, stratify=stratify, random_state=seed)
    if len(np.unique(train_y[fit])) < 2:
        return cs[0], {}
    n_classes = int(train_y.max()) + 1
    f1 = {c: float(f1_score(train_y[val], linear_probe_scores(train_x[fit], train_y[fit], train_x[val], n_classes, c, seed).argmax(1),
                            average="macro", zero_division=0)) for c in cs}
    return max(f1, key=f1.__getitem__), f1


def mlp_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int, hidden: int = 256, seed: int = 0) -> np.ndarray:
    """2-layer MLP (one hidden ReLU layer, early stopping when there is enough data)."""
    mlp = MLPClassifier((hidden,), max_iter=300, early_stopping=len(train_x) >= 50, random_state=seed)
    model = make_pipeline(StandardScaler(), mlp)
    model.fit(train_x, train_y)
    return _expand(model.predict_proba(test_x), model.classes_, n_classes)


def classification_metrics(y: np.ndarray, scores: np.ndarray, pred: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy, macro-F1 (over classes present in ``y``) and macro mAP (one-vs-rest AP)."""
    pred = scores.argmax(axis=1) if pred is None else pred
    present = np.unique(y)
    onehot = label_binarize(y, classes=np.arange(scores.shape[1])).reshape(len(y), -1)
    return {
        "accuracy": float(np.mean(pred == y)),
        "macro_f1": float(f1_score(y, pred, labels=present, average="macro", zero_division=0)),
        "mAP": float(average_precision_score(onehot[:, present], scores[:, present], average="macro")),
    }


def stratified_fraction(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a ``fraction`` subsample per class (at least one per class)."""
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.nonzero(y == c)[0])[: max(1, int(round(fraction * (y == c).sum())))] for c in np.unique(y)]
    return np.sort(np.concatenate(picks))


def low_shot_curve(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    probes: dict[str, Probe] | None = None,
    fractions: Sequence[float] = LOW_SHOT_FRACTIONS,
    seeds: Sequence[int] = (0, 1, 2),
) -> pd.DataFrame:
    """Macro-F1 and mAP vs fraction of training labels: one row per (probe, fraction), mean ± sd over seeds."""
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    probes = probes or {"knn": lambda a, b, c, n: knn_scores(a, b, c, n), "linear": linear_probe_scores}
    rows = []
    for name, probe in probes.items():
        for frac in fractions:
            runs = []
            for seed in seeds:
                idx = stratified_fraction(train_y, frac, seed)
                runs.append(classification_metrics(test_y, probe(train_x[idx], train_y[idx], test_x, n_classes)))
            df = pd.DataFrame(runs)
            rows.append({"probe": name, "fraction": frac, "n_train": len(idx),
                         **{f"{m}_mean": df[m].mean() for m in df}, **{f"{m}_sd": df[m].std(ddof=0) for m in df}})
    return pd.DataFrame(rows)
