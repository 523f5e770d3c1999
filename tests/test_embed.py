"""``phenoscope embed``: field-of-view and single-cell embeddings, outputs, metadata, resume, bad files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from phenoscope.core.checkpoint import Preprocessing, read_checkpoint
from phenoscope.core.io import imwrite_tiff
from phenoscope.datasets import synthetic_nuclei
from phenoscope.ssl import embed as emb
from phenoscope.ssl.augment import self_normalize
from phenoscope.ssl.backbone import CellViT, ViTConfig
from phenoscope.ssl.checkpoint import save_backbone


@pytest.fixture
def model_path(tmp_path):
    torch.manual_seed(0)
    vit = CellViT(ViTConfig(arch="vit_tiny", depth=2, in_chans=2, patch_size=8, img_size=32, embed_dim=48, num_heads=3))
    path = tmp_path / "backbone.safetensors"
    save_backbone(vit, path)
    return path


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    images, masks = [], []
    for seed in range(4):
        img, lab = synthetic_nuclei((96, 96), n=6, seed=seed)
        two = np.stack([img, img[::-1]]).astype(np.uint16)  # (C, H, W)
        imwrite_tiff(root / f"im{seed}.tif", two)
        imwrite_tiff(root / f"im{seed}_masks.tif", lab.astype(np.uint16))
        images.append(root / f"im{seed}.tif")
        masks.append(root / f"im{seed}_masks.tif")
    return images, masks


def test_single_cell_rows_features_and_anndata(tmp_path, model_path, data):
    import anndata as ad
    import tifffile

    images, masks = data
    cfg = emb.EmbedConfig(crop_size=32, batch_size=5)
    meta = pd.DataFrame({"Metadata_Image": [p.stem for p in images], "Metadata_Well": ["A01", "A02", "B01", "B02"]})
    out = emb.embed_images(images, model_path, tmp_path / "out", cfg, masks, meta, progress=False)
    n_cells = sum(len(np.unique(tifffile.imread(m))) - 1 for m in masks)
    table = pd.read_parquet(tmp_path / "out" / "embeddings.parquet")
    assert out["rows"] == n_cells == len(table) and not out["failed"]
    assert not table.duplicated(["Metadata_Image", "Metadata_Label"]).any()
    assert table.groupby("Metadata_Image")["Metadata_Well"].first().tolist() == ["A01", "A02", "B01", "B02"]
    feats = [c for c in table if c.startswith("f")]
    assert len(feats) == 2 * 48  # CLS ⊕ mean patch
    # features equal the backbone's embedding of the self-normalised crop
    vit = emb.load_embedder(model_path)[0].eval()
    crops, ids, _ = emb.cell_crops(tifffile.imread(images[0]).astype(np.float32), tifffile.imread(masks[0]), 32)
    with torch.no_grad():
        direct = vit.embed(self_normalize(torch.from_numpy(crops))).numpy()
    rows = table[table.Metadata_Image == "im0"]
    assert rows.Metadata_Label.tolist() == ids.tolist()
    np.testing.assert_allclose(rows[feats].to_numpy(), direct, atol=1e-5)
    adata = ad.read_h5ad(tmp_path / "out" / "embeddings.h5ad")
    assert adata.shape == (n_cells, 96) and "Metadata_Well" in adata.obs
    np.testing.assert_array_equal(adata.X, table[feats].to_numpy(np.float32))


def test_field_of_view_last_blocks_and_bad_file(tmp_path, model_path, data):
    images, _ = data
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff")
    cfg = emb.EmbedConfig(center_crop=64, n_last_blocks=2, output_format="zarr")
    out = emb.embed_images([images[0], bad, images[1]], model_path, tmp_path / "out", cfg, progress=False)
    assert out["rows"] == 2 and len(out["failed"]) == 1 and "bad.tif" in out["failed"][0]
    table = pd.read_parquet(tmp_path / "out" / "embeddings.parquet")
    assert table.shape[1] - 4 == 3 * 48  # two class tokens ⊕ mean patch
    assert (tmp_path / "out" / "embeddings.zarr").is_dir()


def test_killed_run_resumes_to_the_same_rows(tmp_path, model_path, data, monkeypatch):
    images, masks = data
    cfg = emb.EmbedConfig(crop_size=32, batch_size=4)
    emb.embed_images(images, model_path, tmp_path / "full", cfg, masks, progress=False)
    real, calls = emb.embed_crops, []

    def crash_after_two(*a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt  # the process dies in the middle of the third image
        return real(*a, **k)

    monkeypatch.setattr(emb, "embed_crops", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        emb.embed_images(images, model_path, tmp_path / "resumed", cfg, masks, progress=False)
    assert len(list((tmp_path / "resumed" / "parts").glob("*.parquet"))) == 2
    monkeypatch.setattr(emb, "embed_crops", real)
    out = emb.embed_images(images, model_path, tmp_path / "resumed", cfg, masks, progress=False)
    assert out["already_done"] == 2 and out["embedded"] == 2
    full = pd.read_parquet(tmp_path / "full" / "embeddings.parquet")
    resumed = pd.read_parquet(tmp_path / "resumed" / "embeddings.parquet")
    pd.testing.assert_frame_equal(full, resumed)
    with pytest.raises(ValueError, match="other inputs"):  # a resume must not mix runs
        emb.embed_images(images[:2], model_path, tmp_path / "resumed", cfg, masks[:2], progress=False)


@pytest.mark.slow  # spawned workers import torch: ~15-50 s on 2 shared cores
def test_worker_processes_give_the_rows_of_one_process(tmp_path, model_path, data):
    images, masks = data
    serial = emb.embed_images(images, model_path, tmp_path / "serial", emb.EmbedConfig(crop_size=32), masks, progress=False)
    cfg = emb.EmbedConfig(crop_size=32, num_workers=2)
    pooled = emb.embed_images(images, model_path, tmp_path / "pooled", cfg, masks, progress=False)
    assert pooled["embedded"] == serial["embedded"] == 4 and not pooled["failed"]
    a, b = (pd.read_parquet(tmp_path / d / "embeddings.parquet") for d in ("serial", "pooled"))
    pd.testing.assert_frame_equal(a, b, rtol=0, atol=1e-5)  # other processes may sum in another order


def test_cli_embed(tmp_path, model_path, data):
    from phenoscope.cli import main

    images, _ = data
    (tmp_path / "meta.csv").write_text("image,plate\n" + "".join(f"{p.name},P{i % 2}\n" for i, p in enumerate(images)))
    args = ["embed", str(images[0].parent), "--model", str(model_path), "--out", str(tmp_path / "out"),
            "--masks", str(images[0].parent), "--crop-size", "32", "--metadata", str(tmp_path / "meta.csv")]
    assert main(args) == 0
    table = pd.read_parquet(tmp_path / "out" / "embeddings.parquet")
    assert set(table.Metadata_plate) == {"P0", "P1"} and set(table.Metadata_Image) == {p.stem for p in images}
    assert main(args) == 0  # a finished run is all "already done"
    assert len(pd.read_parquet(tmp_path / "out" / "embeddings.parquet")) == len(table)
    assert main(["embed", str(images[0]), "--model", str(model_path), "--out", str(tmp_path / "o2"), "--crop-size", "32"]) == 2
    # inputs and the output folder are checked before any model loads: exit code 2
    assert main(["embed", str(tmp_path / "nothing"), "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o3")]) == 2
    (tmp_path / "a_file").write_text("")
    assert main(["embed", str(images[0]), "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "a_file" / "o")]) == 2


def _dataset_normalised_backbone(path, mean, std):
    torch.manual_seed(1)
    vit = CellViT(ViTConfig(arch="vit_tiny", depth=2, in_chans=2, patch_size=8, img_size=32, embed_dim=48, num_heads=3))
    save_backbone(vit, path, Preprocessing(normalize="dataset", channel_mean=mean, channel_std=std, input_size=32))
    return vit.eval()


def test_embed_applies_the_recorded_dataset_normalisation(tmp_path, data):
    """The CLI path (phenoscope embed) normalises with the checkpoint's dataset statistics, <= 1e-5; the
    self-normalisation every crop used to get gives other features."""
    import tifffile

    from phenoscope.cli import main

    images, masks = data
    mean, std = [300.0, 250.0], [120.0, 90.0]
    vit = _dataset_normalised_backbone(tmp_path / "dataset_norm.safetensors", mean, std)
    out = tmp_path / "out"
    rc = main(["embed", *map(str, images), "--model", str(tmp_path / "dataset_norm.safetensors"), "--out", str(out),
               "--masks", str(images[0].parent), "--crop-size", "32"])
    assert rc == 0
    table = pd.read_parquet(out / "embeddings.parquet")
    feats = table[[c for c in table if c.startswith("f")]].to_numpy()
    rows = (table.Metadata_Image == "im0").to_numpy()
    crops, _, _ = emb.cell_crops(tifffile.imread(images[0]).astype(np.float32), tifffile.imread(masks[0]), 32)
    x = torch.from_numpy(crops)
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    with torch.no_grad():
        expected = vit.embed((x - m) / s).numpy()
        old_behaviour = vit.embed(self_normalize(x)).numpy()
    np.testing.assert_allclose(feats[rows], expected, atol=1e-5)
    assert np.abs(feats[rows] - old_behaviour).max() > 1e-2  # what embed computed before it read the checkpoint


def test_earlier_backbone_format_reads_its_pretraining_config(tmp_path):
    """A backbone saved with only ``vit_config`` metadata still loads; its normalisation comes from the
    ``config.json`` of its pretraining run beside it, else per-channel self-normalisation."""
    import json

    from safetensors.torch import save_file

    from phenoscope.config import to_dict

    vit = CellViT(ViTConfig(arch="vit_tiny", depth=1, in_chans=2, patch_size=8, img_size=32, embed_dim=48, num_heads=3))
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path), metadata={"vit_config": json.dumps(to_dict(vit.cfg))})
    model, prep = emb.load_embedder(path)
    assert prep == Preprocessing() and model.cfg == vit.cfg
    (tmp_path / "config.json").write_text(json.dumps({"bag_of_channels": False, "augment": {
        "normalize": "dataset", "channel_mean": [1.0, 2.0], "channel_std": [3.0, 4.0], "global_size": 32}}))
    prep = emb.load_embedder(path)[1]
    assert (prep.normalize, prep.channel_mean, prep.channel_std, prep.input_size) == ("dataset", [1.0, 2.0], [3.0, 4.0], 32)


def test_bag_of_channels_pretrain_save_embed(tmp_path, data):
    """Bag-of-channels end to end: pretrain a 1-channel ViT, the checkpoint records it, embed gives
    every channel's features side by side."""
    from phenoscope.cli import main

    images, masks = data
    np.savez(tmp_path / "x.npz", images=np.random.default_rng(0).random((8, 2, 32, 32), dtype=np.float32))
    (tmp_path / "c.toml").write_text(
        'bag_of_channels = true\n[vit]\narch = "vit_tiny"\npatch_size = 8\nimg_size = 32\ndepth = 1\n'
        "[augment]\nglobal_size = 32\nn_local = 0\n[train]\nepochs = 1\nbatch_size = 4\nwarmup_epochs = 0\nprogress_bar = false\n"
        "[dino]\nn_prototypes = 64\nhead_hidden_dim = 32\nhead_bottleneck_dim = 16\n"
    )
    assert main(["pretrain", "--method", "dino", "--data", str(tmp_path / "x.npz"), "--out", str(tmp_path / "p"),
                 "--config", str(tmp_path / "c.toml")]) == 0
    ckpt = read_checkpoint(tmp_path / "p" / "backbone.safetensors")
    assert ckpt.preprocessing.bag_of_channels and ckpt.preprocessing.input_size == 32
    assert "pretrain" in ckpt.provenance["command"] or ckpt.provenance["config"]["bag_of_channels"]
    model, _ = emb.load_embedder(tmp_path / "p" / "backbone.safetensors")
    assert isinstance(model, emb.BagOfChannels)
    out = emb.embed_images(images[:1], tmp_path / "p" / "backbone.safetensors", tmp_path / "e", emb.EmbedConfig(crop_size=32),
                           masks[:1], progress=False)
    table = pd.read_parquet(tmp_path / "e" / "embeddings.parquet")
    assert out["rows"] == len(table) > 0
    assert sum(c.startswith("f") for c in table) == 2 * 2 * 192  # 2 channels x (CLS + mean patch) x ViT-tiny width
