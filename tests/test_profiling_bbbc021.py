"""BBBC021 acceptance: configs/profile/bbbc021.toml over the one pipeline reaches NSC ≥ 0.90 and sphering helps."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from phenoscope.config import load_config
from phenoscope.profiling import normalize, nsc_accuracy
from phenoscope.datasets.bbbc021 import load_bbbc021
from phenoscope.profiling.pipeline import ProfileConfig, build_profiles, run_pipeline

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "profile" / "bbbc021.toml"


@pytest.fixture(scope="module")
def wells(bbbc021_dir):
    return load_bbbc021(bbbc021_dir)


@pytest.fixture(scope="module")
def cfg() -> ProfileConfig:
    return load_config(ProfileConfig, CONFIG)


def test_bbbc021_table_shape(wells) -> None:
    assert wells.shape == (632, 6 + 516)
    assert (wells["Metadata_Compound"] == "DMSO").sum() == 330


def test_documented_pipeline_reaches_nsc_090_and_sphering_helps(wells, cfg) -> None:
    result = run_pipeline(wells, cfg)
    plain = build_profiles(wells, replace(cfg, sphere_method=""))
    nsc = nsc_accuracy(result.profiles)
    assert len(result.profiles) == 104  # 103 treatments + DMSO
    assert result.summary["features after selection"] == 192
    assert nsc >= 0.90
    assert nsc > nsc_accuracy(plain)
    assert nsc_accuracy(result.profiles, batch="Metadata_Batch") > nsc_accuracy(plain, batch="Metadata_Batch")


def test_reproduces_pycytominer_reference_numbers(wells, cfg) -> None:
    # pycytominer per-plate standardisation against DMSO, no sphering: 0.825 (mean), 0.767 (median)
    for op, ref in (("mean", 0.825), ("median", 0.767)):
        prof = build_profiles(wells, replace(cfg, sphere_method="", pooled_scale=False, feature_ops=[], aggregate_operation=op))
        assert nsc_accuracy(prof) == pytest.approx(ref, abs=1e-3)


def test_sphering_with_fewer_controls_than_features(wells, cfg) -> None:
    pcm = pytest.importorskip("pycytominer")
    x = normalize(wells, samples=cfg.controls, pooled_scale=True)
    with pytest.raises(ValueError):  # pycytominer 1.7.1 refuses the 330 × 516 rank-deficient controls
        pcm.normalize(x, features=[c for c in x if not c.startswith("Metadata_")], method="spherize",
                      samples=cfg.controls, spherize_method="ZCA", output_type=None)
    plain = nsc_accuracy(build_profiles(wells, replace(cfg, feature_ops=[], sphere_method="")))
    for eps, floor in (("ledoit-wolf", 0.90), ("auto", plain)):
        prof = build_profiles(wells, replace(cfg, feature_ops=[], sphere_epsilon=eps))
        assert np.isfinite(prof.filter(regex="^(?!Metadata_)").to_numpy()).all()
        assert nsc_accuracy(prof) >= floor
