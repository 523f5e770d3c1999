"""Profiling API: parity with pycytominer 1.7.1 and copairs, plus behaviour on synthetic tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phenoscope.profiling import (
    aggregate,
    feature_select,
    fit_spherizer,
    harmonize,
    mean_average_precision,
    moa_micro_auprc,
    normalize,
    nsc_accuracy,
    retrieval_average_precision,
    spherize,
)

pcm = pytest.importorskip("pycytominer")


def _cells(n: int = 240, d: int = 12, seed: int = 0) -> pd.DataFrame:
    """Synthetic single-cell table: 2 plates × 4 wells × 30 cells, CellProfiler-style feature names."""
    rng = np.random.default_rng(seed)
    plates = np.repeat(["P1", "P2"], n // 2)
    wells = np.tile(np.repeat(["A01", "A02", "B01", "B02"], n // 8), 2)
    treat = np.where(np.isin(wells, ["A01", "B01"]), "DMSO", "drug")
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + (treat == "drug")[:, None] * 0.7 + (plates == "P2")[:, None]
    feats = {f"Cells_F{i:02d}": x[:, i] for i in range(d)}
    feats["Nuclei_Dup"] = 0.98 * x[:, 0] + 0.02 * rng.normal(size=n)  # highly correlated with Cells_F00
    feats["Nuclei_Const"] = np.full(n, 3.0)
    return pd.DataFrame({"Metadata_Plate": plates, "Metadata_Well": wells, "Metadata_Treatment": treat, **feats})


def _features(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if not c.startswith("Metadata_")]


@pytest.mark.parametrize("operation", ["mean", "median"])
def test_aggregate_matches_pycytominer(operation: str) -> None:
    cells = _cells()
    ours = aggregate(cells, ["Metadata_Plate", "Metadata_Well"], operation, keep_constant_metadata=False, count_column=None)
    ref = pcm.aggregate(cells, strata=["Metadata_Plate", "Metadata_Well"], operation=operation, output_type=None)
    assert list(ours.columns) == list(ref.columns)
    np.testing.assert_allclose(ours[_features(ref)].to_numpy(), ref[_features(ref)].to_numpy(), rtol=0, atol=1e-10)


def test_aggregate_carries_constant_metadata_and_counts() -> None:
    out = aggregate(_cells(), ["Metadata_Plate", "Metadata_Well"])
    assert (out["Metadata_Count"] == 30).all()
    assert set(out["Metadata_Treatment"]) == {"DMSO", "drug"}
    treat = aggregate(_cells(), ["Metadata_Treatment"])
    assert treat["Metadata_Plate"].isna().all()  # plate differs within each treatment → NaN


@pytest.mark.parametrize("method", ["standardize", "mad_robustize"])
@pytest.mark.parametrize("samples", ["all", "Metadata_Treatment == 'DMSO'"])
def test_normalize_per_plate_matches_pycytominer(method: str, samples: str) -> None:
    cells = _cells().drop(columns="Nuclei_Const")
    ours = normalize(cells, method, samples=samples, by="Metadata_Plate")
    ref = pd.concat(
        [pcm.normalize(g, method=method, samples=samples, output_type=None) for _, g in cells.groupby("Metadata_Plate", sort=False)]
    )
    feats = _features(cells)
    np.testing.assert_allclose(ours[feats].to_numpy(), ref.loc[ours.index, feats].to_numpy(), rtol=0, atol=1e-9)


def test_normalize_pooled_scale_centres_each_plate_on_controls() -> None:
    cells = _cells()
    out = normalize(cells, samples="Metadata_Treatment == 'DMSO'", pooled_scale=True)
    ctrl = out[out["Metadata_Treatment"] == "DMSO"]
    feats = [f for f in _features(out) if f != "Nuclei_Const"]
    np.testing.assert_allclose(ctrl.groupby("Metadata_Plate")[feats].mean().to_numpy(), 0, atol=1e-12)
    np.testing.assert_allclose(ctrl[feats].std(ddof=0).to_numpy(), 1, atol=1e-12)


def test_normalize_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="no reference rows"):
        normalize(_cells(), samples="Metadata_Treatment == 'DMSO' and Metadata_Plate == 'P1'")
    with pytest.raises(ValueError, match="method must be"):
        normalize(_cells(), method="zscore")
    with pytest.raises(ValueError, match="non-numeric"):
        normalize(_cells().assign(Plate="x"))


@pytest.mark.parametrize(
    "ops",
    [["variance_threshold"], ["correlation_threshold"], ["drop_na_columns"], ["variance_threshold", "correlation_threshold", "drop_na_columns"]],
)
def test_feature_select_matches_pycytominer(ops: list[str]) -> None:
    cells = _cells()
    cells.loc[cells.index[:20], "Cells_F05"] = np.nan  # 8 % NaN → dropped at the 5 % cutoff
    ours = feature_select(cells, ops)
    ref = pcm.feature_select(cells, operation=ops, output_type=None)
    assert sorted(_features(ours)) == sorted(_features(ref))
    assert len(_features(ours)) < len(_features(cells))


@pytest.mark.parametrize("method", ["ZCA", "ZCA-cor", "PCA", "PCA-cor"])
@pytest.mark.parametrize("n_controls", [60, 8])  # n > d, and n ≤ d (rank-deficient controls)
def test_spherize_matches_pycytominer(method: str, n_controls: int) -> None:
    if method.startswith("PCA") and n_controls <= 14:
        pytest.skip("PCA with n ≤ d: the null-space basis (hence those output columns) is arbitrary, not a definition")
    cells = _cells().drop(columns=["Nuclei_Const", "Nuclei_Dup"])
    cells["Metadata_Ref"] = np.arange(len(cells)) < n_controls
    ours = spherize(cells, "Metadata_Ref", method=method, epsilon=1e-6, epsilon_mode="absolute")
    ref = pcm.normalize(cells, method="spherize", samples="Metadata_Ref", spherize_method=method, spherize_epsilon=1e-6, output_type=None)
    feats = _features(ours)
    assert feats == _features(ref)
    np.testing.assert_allclose(ours[feats].to_numpy(), ref[feats].to_numpy(), rtol=0, atol=1e-6)


def test_shrinkage_spherize_whitens_full_rank_controls() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 5)) @ rng.normal(size=(5, 5))
    sph = fit_spherizer(x, "ZCA", epsilon=1e-9)
    np.testing.assert_allclose(np.cov(sph.transform(x), rowvar=False), np.eye(5), atol=1e-6)
    lw = fit_spherizer(x, "ZCA", epsilon="ledoit-wolf")  # tiny shrinkage with n ≫ d
    assert 0 <= lw.epsilon < 0.05


def test_spherize_fewer_controls_than_features_is_bounded() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 50))
    sph = fit_spherizer(x, "ZCA", epsilon="ledoit-wolf")
    lam = np.linalg.eigvalsh(np.cov(x, rowvar=False))
    gains = np.linalg.svd(sph.W, compute_uv=False)
    bound = np.sqrt(1 + lam.max() / (sph.epsilon * lam.mean()))  # condition number of (Σ + ελ̄I)^(-1/2)
    assert gains.max() / gains.min() <= bound * (1 + 1e-9)
    assert gains.max() <= 1 / np.sqrt(sph.epsilon * lam.mean()) * (1 + 1e-9)  # null directions bounded
    with pytest.raises(ValueError, match="zero variance"):
        fit_spherizer(np.c_[x, np.ones(20)], "ZCA-cor")


def test_harmonize_removes_batch_shift() -> None:
    rng = np.random.default_rng(3)
    batch = np.tile(np.repeat(["a", "b"], 100), 2)
    cell_type = np.repeat([0, 1], 200)
    shift = np.zeros(8)
    shift[1] = 2.0
    x = rng.normal(size=(400, 8)) + cell_type[:, None] * 6.0 * np.eye(8)[0] + (batch == "b")[:, None] * shift
    df = pd.DataFrame(x, columns=[f"f{i}" for i in range(8)]).assign(Metadata_Batch=batch)
    h = harmonize(df, "Metadata_Batch", n_components=None)
    h = h[[c for c in h if c.startswith("Harmony_")]].to_numpy()

    def batch_gap(z: np.ndarray) -> float:
        return float(np.mean([np.linalg.norm(z[(batch == "a") & (cell_type == t)].mean(0) - z[(batch == "b") & (cell_type == t)].mean(0)) for t in (0, 1)]))

    assert batch_gap(h) < 0.3 * batch_gap(x - x.mean(0))
    type_gap = np.linalg.norm(h[cell_type == 0].mean(0) - h[cell_type == 1].mean(0))
    assert type_gap > 4.0  # biology kept


def _replicates(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    compounds = np.repeat([f"c{i}" for i in range(10)] + ["DMSO"], 4)
    moa = np.array([f"m{int(c[1:]) % 3}" if c != "DMSO" else "none" for c in compounds])
    plate = np.tile(["p1", "p2", "p3", "p4"], 11)
    centres = {c: rng.normal(size=16) for c in np.unique(compounds)}
    x = np.stack([centres[c] + rng.normal(scale=1.5, size=16) for c in compounds])
    return pd.DataFrame(x, columns=[f"f{i}" for i in range(16)]).assign(
        Metadata_Compound=compounds, Metadata_MoA=moa, Metadata_Plate=plate, Metadata_Control=compounds == "DMSO"
    )


@pytest.mark.parametrize(
    "spec",
    [
        dict(pos_sameby=["Metadata_Compound"], pos_diffby=[], neg_sameby=[], neg_diffby=["Metadata_Compound"]),
        dict(pos_sameby=["Metadata_MoA"], pos_diffby=["Metadata_Compound"], neg_sameby=[], neg_diffby=["Metadata_MoA"]),
        dict(pos_sameby=["Metadata_Compound"], pos_diffby=["Metadata_Plate"], neg_sameby=["Metadata_Plate"], neg_diffby=["Metadata_Control"]),
    ],
)
def test_average_precision_matches_copairs(spec: dict) -> None:
    copairs_map = pytest.importorskip("copairs.map")
    df = _replicates()
    meta_cols = [c for c in df if c.startswith("Metadata_")]
    feats = df[[c for c in df if not c.startswith("Metadata_")]].to_numpy()
    ref = copairs_map.average_precision(df[meta_cols], feats, progress_bar=False, **spec)
    ours = retrieval_average_precision(df, **spec)
    np.testing.assert_allclose(ours["average_precision"].to_numpy(), ref["average_precision"].to_numpy(dtype=float), atol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(ours["n_pos_pairs"].to_numpy(), ref["n_pos_pairs"].to_numpy())
    ref_map = copairs_map.mean_average_precision(ref, spec["pos_sameby"], null_size=100, threshold=0.05, seed=0, progress_bar=False)
    ours_map = mean_average_precision(df, **spec)
    merged = ours_map.merge(ref_map, on=spec["pos_sameby"], suffixes=("", "_ref"))
    assert len(merged) == len(ref_map)
    np.testing.assert_allclose(merged["mean_average_precision"], merged["mean_average_precision_ref"], atol=1e-6)


def test_nsc_accuracy_excludes_same_compound_and_batch() -> None:
    # Two compounds per MoA; a duplicate of each query under the same compound must not be used.
    x = np.array([[1, 0], [1, 0.01], [0, 1], [0.01, 1], [1, 0.02], [0.02, 1]], float)
    df = pd.DataFrame(x, columns=["f0", "f1"]).assign(
        Metadata_Compound=["a", "b", "c", "d", "a", "c"],
        Metadata_MoA=["m1", "m1", "m2", "m2", "m1", "m2"],
        Metadata_Batch=["w1", "w2", "w1", "w2", "w1", "w1"],
    )
    assert nsc_accuracy(df) == 1.0
    assert nsc_accuracy(df, batch="Metadata_Batch") == 1.0
    swapped = df.assign(Metadata_MoA=["m1", "m2", "m2", "m1", "m1", "m2"])
    assert nsc_accuracy(swapped) == 0.0
    assert 0.0 <= moa_micro_auprc(df) <= 1.0
    assert moa_micro_auprc(df) > moa_micro_auprc(swapped)
