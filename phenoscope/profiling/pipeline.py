"""Config-driven profiling run (used by ``phenoscope profile``): table in → profiles, metrics, figures, report out."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from phenoscope.config import to_dict
from phenoscope.core.io import atomic_path, atomic_write
from phenoscope.profiling.metrics import mean_average_precision, nsc_accuracy, nsc_predictions
from phenoscope.profiling.preprocess import aggregate, feature_select, harmonize, normalize
from phenoscope.profiling.sphere import spherize


@dataclass
class ProfileConfig:
    """Options of ``phenoscope profile``. Empty strings / lists switch a step off."""

    controls: str = "Metadata_Compound == 'DMSO'"  # query selecting control rows ("" = all rows)
    well_strata: list[str] = field(default_factory=lambda: ["Metadata_Plate", "Metadata_Well"])
    plate_column: str = "Metadata_Plate"
    normalize_method: str = "standardize"  # or "mad_robustize"
    pooled_scale: bool = True
    feature_ops: list[str] = field(default_factory=lambda: ["variance_threshold", "correlation_threshold", "drop_na_columns"])
    harmony_keys: list[str] = field(default_factory=list)
    sphere_method: str = "ZCA"  # "" = no sphering
    sphere_epsilon: float | str = "ledoit-wolf"
    sphere_epsilon_mode: str = "relative"
    treatment_strata: list[str] = field(default_factory=lambda: ["Metadata_Compound", "Metadata_Concentration"])
    aggregate_operation: str = "mean"
    label_column: str = "Metadata_MoA"  # "" = no evaluation
    compound_column: str = "Metadata_Compound"
    batch_column: str = ""  # NSCB batch column ("" = NSC only)
    figures: bool = True
    umap_color: str = "Metadata_MoA"


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a ``.csv``/``.csv.gz``/``.parquet`` profile table."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"profile table not found: {path}")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.name.endswith((".csv", ".csv.gz")):
        return pd.read_csv(path)
    raise ValueError(f"{path.name}: expected .csv, .csv.gz or .parquet")


def build_profiles(table: pd.DataFrame, cfg: ProfileConfig) -> pd.DataFrame:
    """Well-level table → treatment-level profiles following ``cfg``."""
    controls = cfg.controls or None
    if cfg.well_strata and len(table) > table.groupby(cfg.well_strata).ngroups:
        table = aggregate(table, cfg.well_strata, cfg.aggregate_operation)
    x = normalize(table, cfg.normalize_method, samples=controls, by=cfg.plate_column or None, pooled_scale=cfg.pooled_scale)
    if cfg.feature_ops:
        x = feature_select(x, cfg.feature_ops)
    if cfg.harmony_keys:
        x = harmonize(x, cfg.harmony_keys)
    if cfg.sphere_method:
        x = spherize(x, controls, cfg.sphere_method, cfg.sphere_epsilon, cfg.sphere_epsilon_mode)
    return aggregate(x, cfg.treatment_strata, cfg.aggregate_operation) if cfg.treatment_strata else x


def evaluate(profiles: pd.DataFrame, cfg: ProfileConfig) -> dict[str, float]:
    """NSC (and NSCB) accuracy and MoA-retrieval mAP on treatment profiles."""
    exclude = cfg.controls or None
    out = {"NSC": nsc_accuracy(profiles, cfg.label_column, cfg.compound_column, None, exclude)}
    if cfg.batch_column:
        out["NSCB"] = nsc_accuracy(profiles, cfg.label_column, cfg.compound_column, cfg.batch_column, exclude)
    kept = profiles[~profiles.eval(exclude).to_numpy(bool)] if exclude else profiles
    maps = mean_average_precision(kept, [cfg.label_column], [cfg.compound_column], [], [cfg.label_column])
    out["MoA_mAP"] = float(maps["mean_average_precision"].mean())
    return out


def run_profile(table: pd.DataFrame, cfg: ProfileConfig, out_dir: str | Path) -> dict[str, float]:
    """Write ``profiles.parquet``, ``metrics.json``, figures and ``report.html`` into ``out_dir``."""
    from phenoscope.profiling import figures

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    profiles = build_profiles(table, cfg)
    with atomic_path(out / "profiles.parquet") as tmp:
        profiles.to_parquet(tmp, index=False)
    metrics = evaluate(profiles, cfg) if cfg.label_column else {}
    with atomic_write(out / "metrics.json", "w") as fh:
        json.dump({"metrics": metrics, "config": to_dict(cfg)}, fh, indent=2)
    if cfg.figures:
        pngs = []
        shown = profiles[~profiles.eval(cfg.controls).to_numpy(bool)] if cfg.controls else profiles
        if cfg.umap_color:
            pngs.append(figures.plot_umap(shown, cfg.umap_color, out / "umap.png"))
        pngs.append(figures.plot_similarity_matrix(shown, cfg.label_column or cfg.treatment_strata[0], out / "similarity.png"))
        if cfg.label_column:
            pred = nsc_predictions(profiles, cfg.label_column, cfg.compound_column, None, cfg.controls or None)
            pngs.append(figures.plot_confusion(pred["label"], pred["predicted"], out / "confusion_nsc.png"))
        figures.write_report(pngs, out / "report.html", tables={"metrics": pd.DataFrame([metrics])} if metrics else None)
    return metrics
