"""Evaluation probes, figures and the ``phenoscope profile`` CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from phenoscope.cli import main
from phenoscope.profiling import classify, figures


def _blobs(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    return rng.normal(size=(3, 8))[y] * 2 + rng.normal(size=(n, 8)), y


def test_probes_learn_and_chance_on_shuffled_labels() -> None:
    x, y = _blobs()
    for probe in (classify.knn_scores, classify.linear_probe_scores, classify.mlp_scores):
        good = classify.classification_metrics(y[200:], probe(x[:200], y[:200], x[200:], 3))
        bad = classify.classification_metrics(y[200:], probe(x[:200], np.random.default_rng(1).permutation(y[:200]), x[200:], 3))
        assert good["macro_f1"] > 0.9 > bad["macro_f1"] + 0.3


def test_select_c_picks_the_best_held_out_c_and_the_probe_uses_it() -> None:
    x, y = _blobs()
    best, f1 = classify.select_c(x[:200], y[:200], cs=(1e-7, 1.0))  # C = 1e-7 shrinks every weight to ~0
    assert best == 1.0 and f1[1.0] > f1[1e-7] + 0.3
    grid = classify.linear_probe_scores(x[:200], y[:200], x[200:], 3, c=(1e-7, 1.0))
    np.testing.assert_array_equal(grid, classify.linear_probe_scores(x[:200], y[:200], x[200:], 3, c=1.0))
    idx = np.concatenate([np.nonzero(y == k)[0][:n] for k, n in ((0, 6), (1, 3), (2, 1))])  # a class with 1 sample
    assert classify.select_c(x[idx], y[idx])[0] in classify.PROBE_C
    with pytest.raises(ValueError, match="at least one C"):
        classify.select_c(x, y, cs=())


def test_per_class_thresholds_and_low_shot_curve() -> None:
    x, y = _blobs()
    scores = classify.knn_scores(x[:200], y[:200], x[200:], 3)
    t = classify.fit_class_thresholds(scores, y[200:])
    assert t.shape == (3,) and np.all((0 <= t) & (t <= 1))
    curve = classify.low_shot_curve(x[:200], y[:200], x[200:], y[200:], fractions=(0.02, 1.0), seeds=(0, 1))
    assert set(curve["probe"]) == {"knn", "linear"} and (curve["macro_f1_sd"] >= 0).all()
    assert (curve.groupby("probe")["n_train"].apply(lambda s: s.is_monotonic_increasing)).all()


def test_confusion_and_report(tmp_path) -> None:
    pngs = [figures.plot_confusion(["a", "b", "a"], ["a", "a", "a"], tmp_path / "cm.png")]
    report = figures.write_report(pngs, tmp_path / "report.html")
    assert "cm.png" in report.read_text() and all(p.stat().st_size > 1000 for p in pngs)


def test_profile_cli_on_bbbc021(bbbc021_dir, tmp_path, capsys) -> None:
    from phenoscope.profiling.bbbc021 import load_bbbc021

    table = tmp_path / "wells.parquet"
    load_bbbc021(bbbc021_dir).to_parquet(table)
    assert main(["profile", str(table), "--out", str(tmp_path / "out"), "--batch-column", "Metadata_Batch", "--no-figures"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert metrics["NSC"] >= 0.90 and 0 < metrics["NSCB"] < metrics["NSC"]
    assert len(pd.read_parquet(tmp_path / "out" / "profiles.parquet")) == 104


@pytest.mark.slow
def test_profile_cli_figures(bbbc021_dir, tmp_path) -> None:
    from phenoscope.profiling.bbbc021 import load_bbbc021

    table = tmp_path / "wells.csv"
    load_bbbc021(bbbc021_dir).to_csv(table, index=False)
    assert main(["profile", str(table), "--out", str(tmp_path / "out")]) == 0
    for name in ("umap.png", "similarity.png", "confusion_nsc.png", "report.html"):
        assert (tmp_path / "out" / name).stat().st_size > 0
