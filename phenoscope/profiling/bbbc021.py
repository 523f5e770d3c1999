"""BBBC021 per-well CellProfiler profiles: loading and the documented MoA pipeline.

Pipeline (``bbbc021_profiles``): per-plate normalisation against DMSO (centre on each plate's
DMSO wells, scale by the pooled DMSO spread) → feature selection (variance, |r| > 0.9, NaN) →
optional Harmony (batch = plate) → optional ZCA
sphering fitted on all DMSO wells (Ledoit–Wolf shrinkage) → treatment-level (compound ×
concentration) aggregation. Evaluated with NSC / NSCB 1-NN MoA accuracy (batch = week).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from phenoscope.profiling.metrics import nsc_accuracy
from phenoscope.profiling.preprocess import aggregate, feature_select, harmonize, normalize
from phenoscope.profiling.sphere import spherize

WELL_FILE = "ljosa_jbiomolscreen_2013_per_well_mean.csv.gz"
IMAGE_FILE = "BBBC021_v1_image.csv.gz"
MOA_FILE = "BBBC021_v1_moa.csv"
CONTROLS = "Metadata_Compound == 'DMSO'"
TREATMENT = ["Metadata_Compound", "Metadata_Concentration"]


def load_bbbc021(data_dir: str | Path) -> pd.DataFrame:
    """Per-well table: ``Metadata_{Plate, Well, Compound, Concentration, MoA, Batch}`` + 516 features.

    ``Metadata_Batch`` is the imaging week (plate name prefix). Wells without a MoA are dropped.
    """
    d = Path(data_dir)
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


@dataclass(frozen=True)
class Bbbc021Options:
    """One configuration of the BBBC021 pipeline."""

    sphere: bool = True
    harmony: bool = False
    operation: str = "mean"
    normalize_method: str = "standardize"
    pooled_scale: bool = True
    select_features: bool = True
    epsilon: float | str = "ledoit-wolf"
    epsilon_mode: str = "relative"


def bbbc021_profiles(wells: pd.DataFrame, opts: Bbbc021Options = Bbbc021Options()) -> pd.DataFrame:
    """Well table (``load_bbbc021``) → treatment-level profiles for one configuration."""
    x = normalize(wells, opts.normalize_method, samples=CONTROLS, by="Metadata_Plate", pooled_scale=opts.pooled_scale)
    if opts.select_features:
        x = feature_select(x)
    if opts.harmony:
        x = harmonize(x, "Metadata_Plate")
    if opts.sphere:
        x = spherize(x, samples=CONTROLS, method="ZCA", epsilon=opts.epsilon, epsilon_mode=opts.epsilon_mode)
    return aggregate(x, TREATMENT, operation=opts.operation)


def bbbc021_table(wells: pd.DataFrame, configs: dict[str, Bbbc021Options]) -> pd.DataFrame:
    """NSC, NSCB (batch = week) and seconds per configuration (time excludes loading)."""
    rows = []
    for name, opts in configs.items():
        t0 = time.perf_counter()
        prof = bbbc021_profiles(wells, opts)
        nsc = nsc_accuracy(prof)
        nscb = nsc_accuracy(prof, batch="Metadata_Batch")
        rows.append({"config": name, "NSC": nsc, "NSCB": nscb, "seconds": time.perf_counter() - t0})
    return pd.DataFrame(rows)


STANDARD_CONFIGS = {
    "no sphering, no Harmony": Bbbc021Options(sphere=False),
    "sphering (Ledoit-Wolf), no Harmony": Bbbc021Options(),
    "no sphering, Harmony (plate)": Bbbc021Options(sphere=False, harmony=True),
    "sphering + Harmony (plate)": Bbbc021Options(harmony=True),
}

ABLATION_CONFIGS = {
    "sphering, pycytominer epsilon (absolute 1e-6)": Bbbc021Options(epsilon=1e-6, epsilon_mode="absolute"),
    "sphering, relative epsilon 1e-6": Bbbc021Options(epsilon=1e-6),
    "no feature selection, no sphering": Bbbc021Options(sphere=False, select_features=False),
    "no feature selection, sphering": Bbbc021Options(select_features=False),
    "per-plate DMSO sd (pycytominer), no sphering": Bbbc021Options(sphere=False, pooled_scale=False, select_features=False),
    "per-plate DMSO sd (pycytominer), median, no sphering": Bbbc021Options(sphere=False, pooled_scale=False, select_features=False, operation="median"),
    "per-plate DMSO sd (pycytominer), sphering": Bbbc021Options(pooled_scale=False, select_features=False),
}
