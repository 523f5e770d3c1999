"""``phenoscope embed`` inputs: channel selection, alpha, gray replication and ``.npz`` crop stacks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from phenoscope.ssl import embed as emb
from phenoscope.ssl.backbone import CellViT, ViTConfig
from phenoscope.ssl.checkpoint import save_backbone


def test_select_channels_orders_replicates_and_drops_alpha():
    rgb = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    rgba = np.concatenate([rgb, np.full((1, 8, 8), 255, np.float32)])
    np.testing.assert_array_equal(emb.select_channels(rgba, None, 3), rgb)  # constant alpha dropped
    np.testing.assert_array_equal(emb.select_channels(rgb, [2, 0], 2), rgb[[2, 0]])
    gray = rgb[:1]
    np.testing.assert_array_equal(emb.select_channels(gray, [0, 0, 0], 3), np.repeat(gray, 3, axis=0))
    with pytest.raises(ValueError, match=r"image has 1 channels .* the model needs 3: choose them with channels \(--channels 0,0,0\)"):
        emb.select_channels(gray, None, 3)
    with pytest.raises(ValueError, match=r"channels \[5\] do not exist"):
        emb.select_channels(rgb, [5], None)


def test_npz_of_crops_gives_one_row_per_crop(tmp_path):
    torch.manual_seed(0)
    vit = CellViT(ViTConfig(arch="vit_tiny", depth=1, in_chans=2, patch_size=8, img_size=32, embed_dim=48, num_heads=3))
    save_backbone(vit, tmp_path / "b.safetensors")
    crops = np.random.default_rng(1).random((5, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "cells.npz", images=crops)
    cfg = emb.EmbedConfig(channels=[1, 2])
    out = emb.embed_images([tmp_path / "cells.npz"], tmp_path / "b.safetensors", tmp_path / "o", cfg, progress=False)
    table = pd.read_parquet(tmp_path / "o" / "embeddings.parquet")
    assert out["rows"] == 5 and table.Metadata_Label.tolist() == [1, 2, 3, 4, 5]
    with torch.no_grad():
        direct = vit.eval().embed(emb.normalize_input(torch.from_numpy(crops[:, 1:]), "channel")).numpy()
    np.testing.assert_allclose(table[[c for c in table if c.startswith("f")]].to_numpy(), direct, atol=1e-5)
