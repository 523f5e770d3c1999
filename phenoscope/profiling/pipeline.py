"""Config-driven profiling run (used by ``phenoscope profile``): table in → profiles, metrics, figures, report out.

Steps: (cells →) wells → per-plate normalisation against the controls → feature selection →
optional Harmony → sphering fitted on the controls → treatment profiles. Evaluation: NSC / NSCB
1-NN MoA accuracy and MoA-retrieval mAP on treatment profiles; replicate mAP against the
controls on wells, with permutation p-values (copairs' phenotypic activity).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from phenoscope.config import to_dict
from phenoscope.core.io import atomic_path, atomic_write
from phenoscope.datasets.bbbc021 import is_bbbc021_source, load_bbbc021
from phenoscope.profiling.metrics import mean_average_precision, nsc_accuracy, nsc_predictions, replicate_map
from phenoscope.profiling.preprocess import aggregate, feature_select, harmonize, normalize
from phenoscope.profiling.sphere import spherize_with
from phenoscope.profiling.table import drop_rows, feature_columns, metadata_columns, sample_mask


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
    sphere_epsilon: float | str = "auto"  # "auto" (chosen on the controls), "ledoit-wolf", "rank", "none" or a number
    sphere_epsilon_mode: str = "relative"
    treatment_strata: list[str] = field(default_factory=lambda: ["Metadata_Compound", "Metadata_Concentration"])
    aggregate_operation: str = "mean"
    label_column: str = "Metadata_MoA"  # "" = no MoA evaluation
    compound_column: str = "Metadata_Compound"
    batch_column: str = ""  # NSCB batch column ("" = NSC only)
    null_size: int = 10000  # permutation null draws per (positives, pairs) configuration
    fdr: float = 0.05  # significant: BH-corrected p below this
    seed: int = 0
    figures: bool = True
    umap_color: str = ""  # "" = the label column (or the first treatment column)


@dataclass
class ProfileResult:
    """Processed wells, treatment profiles and a summary of what went in."""

    wells: pd.DataFrame  # well level, after normalisation / selection / sphering
    profiles: pd.DataFrame  # treatment level
    summary: dict[str, object]


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a ``.csv``/``.csv.gz``/``.parquet`` profile table, or the shipped BBBC021 folder / per-well file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"profile table not found: {path}")
    if is_bbbc021_source(path):
        return load_bbbc021(path)
    if not (path.suffix == ".parquet" or path.name.endswith((".csv", ".csv.gz"))):
        raise ValueError(f"{path.name}: expected .csv, .csv.gz or .parquet")
    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as err:  # pandas / pyarrow raise many types for a malformed file
        raise ValueError(f"cannot read {path.name}: {err}") from err


def _missing_hint(table: pd.DataFrame, column: str) -> str:
    """`` (did you mean 'X'?)`` when a column differs from ``column`` only in case."""
    near = [c for c in table.columns if str(c).lower() == column.lower()]
    return f" (did you mean {near[0]!r}?)" if near else ""


def check_table(table: pd.DataFrame, cfg: ProfileConfig) -> None:
    """Raise ``ValueError`` naming what is missing before any work: columns the config needs,
    feature columns, and controls that match no row."""
    needed = [*cfg.well_strata, cfg.plate_column, *cfg.treatment_strata, cfg.label_column, cfg.compound_column,
              cfg.batch_column, *cfg.harmony_keys, cfg.umap_color]
    missing = [c for c in dict.fromkeys(needed) if c and c not in table.columns]
    if missing:
        hints = "".join(_missing_hint(table, c) for c in missing)
        raise ValueError(f"column(s) {missing} not in table{hints}; metadata columns: {metadata_columns(table)}")
    feature_columns(table)
    if cfg.controls:
        sample_mask(table, cfg.controls)


def _sphering_summary(sph) -> str:
    eps = "" if math.isnan(sph.epsilon) else f" (ε = {sph.epsilon:.3g})"
    return f"{sph.method}, {sph.regularization}{eps}"


def process_wells(table: pd.DataFrame, cfg: ProfileConfig) -> tuple[pd.DataFrame, dict[str, object]]:
    """Cell- or well-level table → processed well profiles, and the input summary."""
    controls = cfg.controls or None
    summary: dict[str, object] = {"input rows": len(table)}
    if cfg.well_strata and len(table) > table.groupby(cfg.well_strata).ngroups:
        table = aggregate(table, cfg.well_strata, cfg.aggregate_operation)
    is_control = sample_mask(table, controls) if controls else None
    summary["wells"] = len(table)
    if cfg.plate_column:
        summary["plates"] = int(table[cfg.plate_column].nunique())
    treated = table if is_control is None else table.loc[~is_control]
    summary["treatments"] = int(treated.groupby(cfg.treatment_strata).ngroups) if cfg.treatment_strata else len(treated)
    summary["control wells"] = int(is_control.sum()) if is_control is not None else 0
    x = normalize(table, cfg.normalize_method, samples=controls, by=cfg.plate_column or None, pooled_scale=cfg.pooled_scale)
    summary["features"] = len(feature_columns(x))
    if cfg.feature_ops:
        x = feature_select(x, cfg.feature_ops)
    summary["features after selection"] = len(feature_columns(x))
    if cfg.harmony_keys:
        x = harmonize(x, cfg.harmony_keys)
    summary["sphering"] = "off"
    if cfg.sphere_method:
        x, sph = spherize_with(x, controls, cfg.sphere_method, cfg.sphere_epsilon, cfg.sphere_epsilon_mode, groups=cfg.plate_column or None)
        summary["sphering"] = _sphering_summary(sph)
    return x, summary


def build_profiles(table: pd.DataFrame, cfg: ProfileConfig) -> pd.DataFrame:
    """Cell- or well-level table → treatment-level profiles following ``cfg``."""
    return run_pipeline(table, cfg).profiles


def run_pipeline(table: pd.DataFrame, cfg: ProfileConfig) -> ProfileResult:
    """``process_wells`` then treatment aggregation."""
    wells, summary = process_wells(table, cfg)
    profiles = aggregate(wells, cfg.treatment_strata, cfg.aggregate_operation) if cfg.treatment_strata else wells
    return ProfileResult(wells, profiles, summary)


def per_label_accuracy(pred: pd.DataFrame) -> pd.DataFrame:
    """NSC accuracy per true label from ``nsc_predictions`` output: label, queries, accuracy."""
    out = pred.groupby("label", sort=True)["correct"].agg(queries="size", accuracy="mean").reset_index()
    return out.rename(columns={"label": "MoA"})


def evaluate(result: ProfileResult, cfg: ProfileConfig) -> tuple[dict[str, float], dict[str, pd.DataFrame]]:
    """Metrics and per-group tables.

    Metrics: NSC (and NSCB), MoA-retrieval mAP and its significant fraction (treatment profiles,
    when ``label_column``); replicate mAP against the controls and its significant fraction
    (wells, when ``controls``). Tables: per-MoA NSC accuracy, per-MoA and per-treatment mAP.
    """
    controls = cfg.controls or None
    metrics: dict[str, float] = {}
    tables: dict[str, pd.DataFrame] = {}
    sig = {"null_size": cfg.null_size, "threshold": cfg.fdr, "seed": cfg.seed}
    if cfg.label_column:
        pred = nsc_predictions(result.profiles, cfg.label_column, cfg.compound_column, None, controls)
        metrics["NSC"] = float(pred["correct"].mean())
        if cfg.batch_column:
            metrics["NSCB"] = nsc_accuracy(result.profiles, cfg.label_column, cfg.compound_column, cfg.batch_column, controls)
        tables["per-MoA NSC accuracy"] = per_label_accuracy(pred)
        label, compound = cfg.label_column, cfg.compound_column
        moa = mean_average_precision(drop_rows(result.profiles, controls), [label], [compound], [], [label], **sig)
        metrics["MoA_mAP"] = float(moa["mean_average_precision"].mean())
        metrics["MoA_significant_fraction"] = float(moa["below_corrected_p"].mean())
        tables["MoA retrieval mAP"] = moa
    if controls and cfg.treatment_strata:
        rep = replicate_map(result.wells, cfg.treatment_strata, controls, **sig)
        if len(rep):
            metrics["replicate_mAP"] = float(rep["mean_average_precision"].mean())
            metrics["replicate_significant_fraction"] = float(rep["below_corrected_p"].mean())
            tables["replicate mAP vs controls"] = rep
    return metrics, tables


def _figures(result: ProfileResult, cfg: ProfileConfig, out: Path) -> list[Path]:
    from phenoscope.profiling import figures

    shown = drop_rows(result.profiles, cfg.controls or None)
    label = cfg.label_column or cfg.treatment_strata[0]
    pngs = [figures.plot_umap(shown, cfg.umap_color or label, out / "umap.png"),
            figures.plot_similarity_matrix(shown, label, out / "similarity.png")]
    if cfg.label_column:
        pred = nsc_predictions(result.profiles, cfg.label_column, cfg.compound_column, None, cfg.controls or None)
        pngs.append(figures.plot_confusion(pred["label"], pred["predicted"], out / "confusion_nsc.png"))
    return pngs


def significance_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per retrieval task (the mAP tables of ``evaluate``): groups, significant groups, fraction, mean mAP."""
    rows = [{"retrieval": name, "groups": len(df), "significant": int(df["below_corrected_p"].sum()),
             "fraction": float(df["below_corrected_p"].mean()), "mean mAP": float(df["mean_average_precision"].mean())}
            for name, df in tables.items() if "below_corrected_p" in df]
    return pd.DataFrame(rows, columns=["retrieval", "groups", "significant", "fraction", "mean mAP"])


def run_profile(table: pd.DataFrame, cfg: ProfileConfig, out_dir: str | Path) -> dict[str, float]:
    """Write ``profiles.parquet``, ``metrics.json``, per-group CSVs, figures and ``report.html`` into ``out_dir``.

    The table is checked (``check_table``) and every number computed before anything is written.
    """
    from phenoscope.profiling import figures

    check_table(table, cfg)
    result = run_pipeline(table, cfg)
    metrics, tables = evaluate(result, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "profiles.parquet") as tmp:
        result.profiles.to_parquet(tmp, index=False)
    for name, df in tables.items():
        with atomic_write(out / f"{name.replace(' ', '_').replace('-', '_')}.csv", "w") as fh:
            df.to_csv(fh, index=False)
    with atomic_write(out / "metrics.json", "w") as fh:
        json.dump({"metrics": metrics, "input": result.summary, "config": to_dict(cfg)}, fh, indent=2)
    if cfg.figures:
        pngs = _figures(result, cfg, out)
        report_tables = {
            "Input": pd.DataFrame({"item": list(result.summary), "value": [str(v) for v in result.summary.values()]}),
            "Metrics": pd.DataFrame({"metric": list(metrics), "value": list(metrics.values())}),
        }
        report_tables[f"Significance (BH-corrected p < {cfg.fdr}, null size {cfg.null_size})"] = significance_table(tables)
        if "per-MoA NSC accuracy" in tables:
            report_tables["Per-MoA NSC accuracy"] = tables["per-MoA NSC accuracy"]
        resolved = {**{k: json.dumps(v) for k, v in to_dict(cfg).items()}, "sphering (resolved)": str(result.summary["sphering"])}
        report_tables["Resolved config"] = pd.DataFrame({"option": list(resolved), "value": list(resolved.values())})
        figures.write_report(pngs, out / "report.html", tables=report_tables)
    return metrics
