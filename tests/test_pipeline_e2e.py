"""segment → pretrain → embed → profile through the CLI on real DSB images, checking the rows that pass
between the steps (per-cell table → one embedding per cell → one well per image → one profile per treatment)."""

from __future__ import annotations

import shutil

import pandas as pd

from phenoscope.cli import main
from phenoscope.datasets import dsb_index

TINY_SSL = """
[vit]
arch = "vit_tiny"
depth = 1
patch_size = 8
img_size = 32
[data]
fov_crop_size = 32
crops_per_image = 4
[augment]
global_size = 32
n_local = 0
[train]
epochs = 1
batch_size = 8
warmup_epochs = 0
progress_bar = false
[simclr]
proj_hidden_dim = 64
proj_dim = 32
"""


def test_segment_embed_profile_chain_on_real_images(dsb_dir, tmp_path):
    idx = dsb_index(dsb_dir)
    small = idx[(idx.height <= 260) & (idx.width <= 360)]
    fluo = small[small.modality_heuristic.str.startswith("fluorescence")].image_id[:4].tolist()
    colour = small[small.modality_heuristic.str.startswith("color")].image_id[:4].tolist()
    images = tmp_path / "images"
    images.mkdir()
    for image_id in fluo + colour:
        shutil.copy(dsb_dir / "images" / f"{image_id}.png", images / f"{image_id}.png")
    # one plate, one well per image; fluorescence images are the controls, colour ones two "treatments"
    compounds = ["DMSO"] * 4 + ["stain_a", "stain_a", "stain_b", "stain_b"]
    meta = pd.DataFrame({"image": fluo + colour, "Metadata_Plate": "P1", "Metadata_Well": [f"A{i:02d}" for i in range(1, 9)],
                         "Metadata_Compound": compounds, "Metadata_Concentration": 1.0})
    meta.to_csv(tmp_path / "plate_map.csv", index=False)

    assert main(["segment", str(images), "--out", str(tmp_path / "seg")]) == 0
    cells = pd.concat([pd.read_csv(tmp_path / "seg" / f"{i}_cells.csv") for i in fluo + colour])
    assert len(cells) > 8 and set(cells.image) == {f"{i}.png" for i in fluo + colour}

    (tmp_path / "ssl.toml").write_text(TINY_SSL)
    assert main(["pretrain", "--method", "simclr", "--data", str(images), "--out", str(tmp_path / "ssl"),
                 "--config", str(tmp_path / "ssl.toml")]) == 0

    assert main(["embed", str(images), "--model", str(tmp_path / "ssl" / "backbone.safetensors"), "--out", str(tmp_path / "emb"),
                 "--masks", str(tmp_path / "seg"), "--crop-size", "32", "--metadata", str(tmp_path / "plate_map.csv")]) == 0
    emb = pd.read_parquet(tmp_path / "emb" / "embeddings.parquet")
    assert len(emb) == len(cells)  # one embedding per segmented cell
    per_image = emb.groupby("Metadata_Image").size()
    assert per_image.to_dict() == cells.groupby(cells.image.str.removesuffix(".png")).size().to_dict()
    assert emb.Metadata_Compound.notna().all()

    out = tmp_path / "profile"
    assert main(["profile", str(tmp_path / "emb" / "embeddings.parquet"), "--out", str(out), "--label-column", "",
                 "--null-size", "200", "--no-figures"]) == 0
    profiles = pd.read_parquet(out / "profiles.parquet")
    assert sorted(profiles.Metadata_Compound) == ["DMSO", "stain_a", "stain_b"]  # one profile per treatment
