"""Frozen-feature probes (phenoscope.eval.probes): kNN, linear and MLP probes, low-shot curves."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from phenoscope.eval import probes


def _blobs(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    return rng.normal(size=(3, 8))[y] * 2 + rng.normal(size=(n, 8)), y


def test_probes_learn_and_chance_on_shuffled_labels() -> None:
    x, y = _blobs()
    for probe in (probes.knn_scores, probes.linear_probe_scores, probes.mlp_scores):
        good = probes.classification_metrics(y[200:], probe(x[:200], y[:200], x[200:], 3))
        bad = probes.classification_metrics(y[200:], probe(x[:200], np.random.default_rng(1).permutation(y[:200]), x[200:], 3))
        assert good["macro_f1"] > 0.9 > bad["macro_f1"] + 0.3


def test_select_c_picks_the_best_held_out_c_and_the_probe_uses_it() -> None:
    x, y = _blobs()
    best, f1 = probes.select_c(x[:200], y[:200], cs=(1e-7, 1.0))  # C = 1e-7 shrinks every weight to ~0
    assert best == 1.0 and f1[1.0] > f1[1e-7] + 0.3
    grid = probes.linear_probe_scores(x[:200], y[:200], x[200:], 3, c=(1e-7, 1.0))
    np.testing.assert_array_equal(grid, probes.linear_probe_scores(x[:200], y[:200], x[200:], 3, c=1.0))
    idx = np.concatenate([np.nonzero(y == k)[0][:n] for k, n in ((0, 6), (1, 3), (2, 1))])  # a class with 1 sample
    assert probes.select_c(x[idx], y[idx])[0] in probes.PROBE_C
    with pytest.raises(ValueError, match="at least one C"):
        probes.select_c(x, y, cs=())


def test_low_shot_curve() -> None:
    x, y = _blobs()
    curve = probes.low_shot_curve(x[:200], y[:200], x[200:], y[200:], fractions=(0.02, 1.0), seeds=(0, 1))
    assert set(curve["probe"]) == {"knn", "linear"} and (curve["macro_f1_sd"] >= 0).all()
    assert (curve.groupby("probe")["n_train"].apply(lambda s: s.is_monotonic_increasing)).all()


def test_majority_knn_matches_scikit_learn() -> None:
    x, y = _blobs(seed=3)
    y = np.where(np.random.default_rng(2).random(len(y)) < 0.3, (y + 1) % 3, y)  # noisy labels: real votes
    ours = probes.knn_scores(x[:200], y[:200], x[200:], 3, k=20, temperature=None).argmax(1)
    ref = KNeighborsClassifier(n_neighbors=20, metric="cosine").fit(x[:200], y[:200]).predict(x[200:])
    np.testing.assert_array_equal(ours, ref)
    weighted = probes.knn_scores(x[:200], y[:200], x[200:], 3, k=20, temperature=0.07)
    np.testing.assert_allclose(weighted.sum(1), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        probes.knn_scores(x[:200], y[:200], x[200:], 3, temperature=0.0)
