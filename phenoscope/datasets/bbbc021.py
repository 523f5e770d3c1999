"""Reader for the shipped BBBC021 per-well CellProfiler profiles (Ljosa et al. 2013).

The per-well means lack treatment metadata; ``load_bbbc021`` joins them with the image and MoA
tables of the same folder. The documented analysis is ``configs/profile/bbbc021.toml`` run by
the one profiling pipeline (``phenoscope.profiling.pipeline``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

WELL_FILE = "ljosa_jbiomolscreen_2013_per_well_mean.csv.gz"
IMAGE_FILE = "BBBC021_v1_image.csv.gz"
MOA_FILE = "BBBC021_v1_moa.csv"
TREATMENT = ["Metadata_Compound", "Metadata_Concentration"]


def is_bbbc021_source(path: str | Path) -> bool:
    """Whether ``path`` is the shipped per-well file or a folder holding it."""
    path = Path(path)
    return path.name == WELL_FILE or (path.is_dir() and (path / WELL_FILE).exists())


def load_bbbc021(data_dir: str | Path) -> pd.DataFrame:
    """Per-well table: ``Metadata_{Plate, Well, Batch, Compound, Concentration, MoA}`` + 516 features.

    ``data_dir`` is the folder of the three files (or the per-well file itself).
    ``Metadata_Batch`` is the imaging week (plate name prefix). Wells without a MoA are dropped.
    """
    d = Path(data_dir)
    d = d.parent if d.name == WELL_FILE else d
    for name in (WELL_FILE, IMAGE_FILE, MOA_FILE):
        if not (d / name).exists():
            raise FileNotFoundError(f"BBBC021 file missing: {d / name}")
    wells = pd.read_csv(d / WELL_FILE).rename(columns={"Image_Metadata_Plate": "Metadata_Plate", "Image_Metadata_Well": "Metadata_Well"})
    images = pd.read_csv(d / IMAGE_FILE, usecols=["Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI", "Image_Metadata_Compound", "Image_Metadata_Concentration"])
    images.columns = ["Metadata_Plate", "Metadata_Well", *TREATMENT]
    moa = pd.read_csv(d / MOA_FILE).rename(columns={"compound": TREATMENT[0], "concentration": TREATMENT[1], "moa": "Metadata_MoA"})
    table = wells.merge(images.drop_duplicates(), on=["Metadata_Plate", "Metadata_Well"], how="inner", validate="one_to_one")
    table = table.merge(moa, on=TREATMENT, how="inner", validate="many_to_one")
    table.insert(2, "Metadata_Batch", table["Metadata_Plate"].str.split("_").str[0])
    meta = [c for c in table.columns if c.startswith("Metadata_")]
    return table[meta + [c for c in table.columns if c not in meta]].reset_index(drop=True)
