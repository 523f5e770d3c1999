"""mAP permutation p-values against copairs 0.5.5 on the same inputs, and the null's exact distribution.

Both implementations draw their nulls with different random streams, so per-group p-values agree
only within Monte-Carlo error. A p-value estimated from m null draws has standard deviation
sqrt(p(1-p)/m); the difference of two independent estimates has sqrt(2p(1-p)/m). The tolerance is
5 of those plus 2/(m+1) (the p-value grid): a false failure has probability < 1e-5 per group.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phenoscope.profiling import benjamini_hochberg, mean_average_precision, random_ap, replicate_map
from phenoscope.profiling.metrics import REFERENCE, with_reference_index

copairs_map = pytest.importorskip("copairs.map")

NULL_SIZE = 10000


def _mc_tolerance(p_ours: np.ndarray, p_ref: np.ndarray, null_size: int) -> np.ndarray:
    p = (p_ours + p_ref) / 2
    return 5 * np.sqrt(2 * p * (1 - p) / null_size) + 2 / (null_size + 1)


def _copairs_map(df: pd.DataFrame, spec: dict, groupby: list[str], tmp_path, null_size: int = NULL_SIZE) -> pd.DataFrame:
    meta = df[[c for c in df if c.startswith("Metadata_")]]
    feats = df[[c for c in df if not c.startswith("Metadata_")]].to_numpy()
    ap = copairs_map.average_precision(meta, feats, progress_bar=False, **spec)
    return copairs_map.mean_average_precision(ap, groupby, null_size=null_size, threshold=0.05, seed=0, progress_bar=False, cache_dir=tmp_path)


def _assert_agrees(ours: pd.DataFrame, ref: pd.DataFrame, keys: list[str], null_size: int = NULL_SIZE) -> None:
    merged = ours.merge(ref, on=keys, suffixes=("", "_ref"))
    assert len(merged) == len(ref) == len(ours)
    np.testing.assert_allclose(merged["mean_average_precision"], merged["mean_average_precision_ref"], atol=1e-6)
    p, q = merged["p_value"].to_numpy(), merged["p_value_ref"].to_numpy(dtype=float)
    assert (np.abs(p - q) <= _mc_tolerance(p, q, null_size)).all(), merged[[*keys, "p_value", "p_value_ref"]]
    assert merged["below_corrected_p"].mean() == merged["below_corrected_p_ref"].mean()


def _replicates(n_compounds: int = 24, n_rep: int = 4, seed: int = 0) -> pd.DataFrame:
    """Compounds of graded effect size (0 = inactive) over DMSO wells, 4 plates."""
    rng = np.random.default_rng(seed)
    compounds = np.repeat([f"c{i:02d}" for i in range(n_compounds)] + ["DMSO"] * 4, n_rep)
    strength = {f"c{i:02d}": 0.25 * (i % 6) for i in range(n_compounds)}
    centres = {c: rng.normal(size=16) * strength.get(c, 0.0) for c in np.unique(compounds)}
    x = np.stack([centres[c] + rng.normal(size=16) for c in compounds])
    return pd.DataFrame(x, columns=[f"f{i}" for i in range(16)]).assign(
        Metadata_Compound=compounds, Metadata_Plate=np.tile([f"p{i}" for i in range(n_rep)], len(compounds) // n_rep)
    )


def test_random_ap_has_the_exact_null_distribution() -> None:
    # 1 positive among 3: AP = 1, 1/2, 1/3 with probability 1/3 each
    ap = random_ap(1, 3, NULL_SIZE, seed=0)
    for value in (1, 1 / 2, 1 / 3):
        assert abs(np.isclose(ap, value).mean() - 1 / 3) < 5 * np.sqrt(2 / 9 / NULL_SIZE)
    # 2 positives among 4: the mean AP over the 6 equally likely position pairs
    rankings = [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]
    exact = np.mean([(1 / a + 2 / b) / 2 for a, b in rankings])
    ap2 = random_ap(2, 4, NULL_SIZE, seed=1)
    assert abs(ap2.mean() - exact) < 5 * ap2.std() / np.sqrt(NULL_SIZE)
    np.testing.assert_array_equal(random_ap(3, 50, 100, seed=2), random_ap(3, 50, 100, seed=2))
    with pytest.raises(ValueError, match="n_pos"):
        random_ap(0, 5, 10)


@pytest.mark.parametrize(("k", "n"), [(3, 333), (12, 40), (30, 60)])  # Floyd draws and random-key draws
def test_random_ap_matches_copairs_null(k: int, n: int) -> None:
    from scipy.stats import ks_2samp

    from copairs.compute import random_ap as copairs_random_ap

    ours = random_ap(k, n, NULL_SIZE, seed=0)
    ref = copairs_random_ap(NULL_SIZE, k, n, 0)
    assert ks_2samp(ours, ref).pvalue > 1e-4
    assert abs(ours.mean() - ref.mean()) < 5 * np.sqrt(2 / NULL_SIZE) * ref.std()


def test_benjamini_hochberg_matches_statsmodels() -> None:
    multipletests = pytest.importorskip("statsmodels.stats.multitest").multipletests
    p = np.random.default_rng(0).uniform(size=200) ** 3
    np.testing.assert_allclose(benjamini_hochberg(p), multipletests(p, method="fdr_bh")[1], rtol=0, atol=1e-12)


def test_replicate_map_p_values_match_copairs(tmp_path) -> None:
    df = _replicates()
    controls = "Metadata_Compound == 'DMSO'"
    keys = ["Metadata_Compound", REFERENCE]
    ref = _copairs_map(with_reference_index(df, controls), dict(pos_sameby=keys, pos_diffby=[], neg_sameby=[], neg_diffby=keys),
                       ["Metadata_Compound"], tmp_path)
    ours = replicate_map(df, ["Metadata_Compound"], controls, null_size=NULL_SIZE)
    _assert_agrees(ours, ref, ["Metadata_Compound"])
    assert 0 < ours["below_corrected_p"].mean() < 1  # inactive compounds are not significant, strong ones are


def test_moa_retrieval_p_values_match_copairs(tmp_path) -> None:
    df = _replicates(seed=3)
    df["Metadata_MoA"] = df["Metadata_Compound"].map(lambda c: "none" if c == "DMSO" else f"m{int(c[1:]) % 6}")
    spec = dict(pos_sameby=["Metadata_MoA"], pos_diffby=["Metadata_Compound"], neg_sameby=[], neg_diffby=["Metadata_MoA"])
    ref = _copairs_map(df, spec, ["Metadata_MoA"], tmp_path)
    _assert_agrees(mean_average_precision(df, **spec), ref, ["Metadata_MoA"])


def test_p_values_track_the_signal_and_the_null_size() -> None:
    df = _replicates()
    controls = "Metadata_Compound == 'DMSO'"
    small = replicate_map(df, ["Metadata_Compound"], controls, null_size=99)
    assert small["p_value"].min() >= 1 / 100  # (0 + 1) / (null_size + 1)
    shuffled = df.assign(Metadata_Compound=np.random.default_rng(1).permutation(df["Metadata_Compound"].to_numpy()))
    null = replicate_map(shuffled, ["Metadata_Compound"], controls, null_size=NULL_SIZE)
    assert null["below_corrected_p"].mean() <= 0.1  # no signal: (almost) nothing significant
    np.testing.assert_array_equal(null["p_value"], replicate_map(shuffled, ["Metadata_Compound"], controls, null_size=NULL_SIZE)["p_value"])


def test_bbbc021_replicate_significance_matches_copairs(bbbc021_dir, tmp_path) -> None:
    from phenoscope.profiling import feature_select, normalize
    from phenoscope.datasets.bbbc021 import load_bbbc021

    controls = "Metadata_Compound == 'DMSO'"
    wells = feature_select(normalize(load_bbbc021(bbbc021_dir), samples=controls, pooled_scale=True))
    wells = wells.assign(Metadata_Treatment=wells["Metadata_Compound"] + "@" + wells["Metadata_Concentration"].astype(str))
    keys = ["Metadata_Treatment", REFERENCE]
    ref = _copairs_map(with_reference_index(wells, controls), dict(pos_sameby=keys, pos_diffby=[], neg_sameby=[], neg_diffby=keys),
                       ["Metadata_Treatment"], tmp_path)
    ours = replicate_map(wells, ["Metadata_Treatment"], controls, null_size=NULL_SIZE)
    _assert_agrees(ours, ref, ["Metadata_Treatment"])
