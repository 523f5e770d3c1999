"""Shared core: normalisation, config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from phenoscope.config import load_config
from phenoscope.core import normalize_percentile


def test_normalize_maps_percentiles_to_0_1():
    x = np.arange(10000, dtype=np.float32).reshape(100, 100)
    y = normalize_percentile(x)
    p1, p99 = np.percentile(x, [1, 99])
    np.testing.assert_allclose(y, (x - p1) / (p99 - p1), rtol=1e-5, atol=1e-6)


def test_normalize_per_channel_guards_and_no_state():
    rng = np.random.default_rng(0)
    img = np.stack([rng.random((32, 32)) * 100, np.full((32, 32), 7.0), 5 + rng.random((32, 32)) * 1e-4], axis=-1)
    a = normalize_percentile(img, channel_axis=-1)
    assert a.dtype == np.float32 and a.shape == img.shape
    assert (a[..., 1] == 0).all()  # constant channel
    assert (a[..., 2] == 0).all()  # p99 - p1 <= 1e-3
    assert a[..., 0].min() < 0.05 and a[..., 0].max() > 0.95
    b = normalize_percentile(np.moveaxis(img, -1, 0), channel_axis=0)
    np.testing.assert_array_equal(np.moveaxis(b, 0, -1), a)
    # calling with other percentiles in between does not change later results
    normalize_percentile(img, channel_axis=-1, lower=5, upper=50)
    np.testing.assert_array_equal(normalize_percentile(img, channel_axis=-1), a)


def test_normalize_subsamples_huge_arrays_like_cellpose():
    x = np.random.default_rng(1).random((230, 230, 230)).astype(np.float32)
    y = normalize_percentile(x)
    sub = x[::1, ::1, ::1][:: max(1, 230 // 50), :: 230 // 224, :: 230 // 224]
    p1, p99 = np.percentile(sub, [1, 99])
    np.testing.assert_allclose(y[0, 0, :5], (x[0, 0, :5] - p1) / (p99 - p1), rtol=1e-5)


def test_normalize_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        normalize_percentile(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="percentiles"):
        normalize_percentile(np.ones(4), lower=50, upper=10)


@dataclasses.dataclass
class _Inner:
    lr: float = 1e-3
    steps: int = 1


@dataclasses.dataclass
class _Outer:
    name: str = "x"
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_load_config_toml_and_unknown_keys(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('name = "y"\n[inner]\nlr = 0.5\n')
    cfg = load_config(_Outer, p)
    assert cfg.name == "y" and cfg.inner.lr == 0.5
    assert load_config(_Outer, p, name="z").name == "z"
    p.write_text("nme = 1\n")
    with pytest.raises(ValueError, match="unknown option"):
        load_config(_Outer, p)


def test_load_config_extends_merges_tables_and_rejects_cycles(tmp_path):
    (tmp_path / "base.toml").write_text('name = "b"\n[inner]\nlr = 0.5\nsteps = 7\n')
    (tmp_path / "mid.toml").write_text('extends = "base.toml"\n[inner]\nlr = 0.25\n')
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "top.toml").write_text('extends = "../mid.toml"\nname = "t"\n')
    cfg = load_config(_Outer, sub / "top.toml")
    assert (cfg.name, cfg.inner.lr, cfg.inner.steps) == ("t", 0.25, 7)  # steps survives the [inner] override
    (tmp_path / "base.toml").write_text('extends = "sub/top.toml"\n')
    with pytest.raises(ValueError, match="cycle"):
        load_config(_Outer, sub / "top.toml")
    (tmp_path / "mid.toml").write_text('extends = "missing.toml"\n')
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        load_config(_Outer, tmp_path / "mid.toml")


REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = sorted([*(REPO / "configs").rglob("*.toml"), *(REPO / "experiments").rglob("*.toml")])


def _config_class(path: Path) -> type:
    """The dataclass of a shipped config: by its folder (configs/segment, configs/ssl, experiments/*_ssl,
    experiments/seg_frontier, ...)."""
    from phenoscope.segment.training import SegTrainConfig
    from phenoscope.ssl.pretrain import PretrainConfig

    folder = path.relative_to(REPO).parts[1]
    from phenoscope.fewshot.grid import FewShotConfig

    classes = {"segment": SegTrainConfig, "ssl": PretrainConfig, "jurkat_ssl": PretrainConfig, "seg_frontier": SegTrainConfig,
               "fewshot": FewShotConfig}
    if folder == "profile":
        from phenoscope.profiling.pipeline import ProfileConfig

        return ProfileConfig
    return classes[folder]


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=[str(p.relative_to(REPO)) for p in SHIPPED_CONFIGS])
def test_every_shipped_config_loads_into_its_dataclass(path):
    cls = _config_class(path)
    assert isinstance(load_config(cls, path), cls)  # raises on unknown options (a typo)


def test_shipped_jurkat_dino_recipe_is_the_measured_run():
    """configs/ssl/jurkat_dino.toml is experiment v12 (dino_depth4.toml) resolved: the figures in its header hold."""
    from phenoscope.config import to_dict
    from phenoscope.ssl.pretrain import PretrainConfig

    recipe = load_config(PretrainConfig, REPO / "configs" / "ssl" / "jurkat_dino.toml")
    measured = load_config(PretrainConfig, REPO / "experiments" / "jurkat_ssl" / "configs" / "dino_depth4.toml")
    assert to_dict(recipe) == to_dict(measured)


def test_label_file_for_prefers_masks_and_never_the_image_itself(tmp_path):
    from phenoscope.core.io import label_file_for

    img = tmp_path / "a.png"
    img.write_bytes(b"x")
    assert label_file_for(img, tmp_path) is None  # only the image itself is there
    (tmp_path / "a.tif").write_bytes(b"x")
    assert label_file_for(img, tmp_path) == tmp_path / "a.tif"
    (tmp_path / "a_masks.tif").write_bytes(b"x")
    assert label_file_for(img, tmp_path) == tmp_path / "a_masks.tif"
    assert label_file_for(tmp_path / "b.png", tmp_path) is None
