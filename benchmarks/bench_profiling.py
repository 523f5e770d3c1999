"""BBBC021 profiling benchmark: NSC / NSCB table, sphering-default validation, speed vs pycytominer.

Usage: python benchmarks/bench_profiling.py [--data ../shared/data/bbbc021_profiles] [--repeats 3] [--weeks]

1. NSC and NSCB per configuration of ``configs/profile/bbbc021.toml`` (± sphering, ± Harmony and
   ablations) with its time (median of ``--repeats`` runs after one warm-up; loading excluded).
2. Sphering default validation: on each validation table, fitted and scored on that table alone,
   replicate mAP against DMSO (and NSC where MoAs allow) without sphering, with Ledoit–Wolf, and
   with the default (``epsilon="auto"``, chosen on the control wells only). Tables: BBBC021;
   BBBC021 split by imaging weeks 1–4 / 5–10; the shipped MAD-robustised, feature-selected BBBC021
   table (other features and normalisation); with ``--weeks``, each imaging week alone.
3. The same pipeline definition (per-plate DMSO standardisation, feature selection, mean
   aggregation) run by pycytominer 1.7.1 and by phenoscope, side by side, with the speed ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pandas as pd

from phenoscope.config import load_config
from phenoscope.datasets import data_root
from phenoscope.datasets.bbbc021 import TREATMENT, load_bbbc021
from phenoscope.profiling import (
    aggregate,
    feature_select,
    normalize,
    nsc_accuracy,
    replicate_map,
)
from phenoscope.profiling.pipeline import (
    ProfileConfig,
    build_profiles,
    read_table,
    run_pipeline,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = data_root() / "bbbc021_profiles"
CONFIG = REPO / "configs" / "profile" / "bbbc021.toml"
MORPHEUS_FILE = "BBBC021_feature_selected_mad_robustize.csv"
LW = {"sphere_epsilon": "ledoit-wolf"}

STANDARD = {
    "no sphering, no Harmony": {"sphere_method": ""},
    "sphering (Ledoit-Wolf), no Harmony": LW,
    "sphering (default: auto), no Harmony": {},
    "no sphering, Harmony (plate)": {"sphere_method": "", "harmony_keys": ["Metadata_Plate"]},
    "sphering (Ledoit-Wolf) + Harmony (plate)": {**LW, "harmony_keys": ["Metadata_Plate"]},
}
ABLATION = {
    "sphering, pycytominer epsilon (absolute 1e-6)": {"sphere_epsilon": 1e-6, "sphere_epsilon_mode": "absolute"},
    "sphering, relative epsilon 1e-6": {"sphere_epsilon": 1e-6},
    "no feature selection, no sphering": {"sphere_method": "", "feature_ops": []},
    "no feature selection, sphering (Ledoit-Wolf)": {**LW, "feature_ops": []},
    "no feature selection, sphering (auto)": {"feature_ops": []},
    "per-plate DMSO sd (pycytominer), no sphering": {"sphere_method": "", "pooled_scale": False, "feature_ops": []},
    "per-plate DMSO sd (pycytominer), median, no sphering": {"sphere_method": "", "pooled_scale": False, "feature_ops": [], "aggregate_operation": "median"},
    "per-plate DMSO sd (pycytominer), sphering (Ledoit-Wolf)": {**LW, "pooled_scale": False, "feature_ops": []},
}
SPHERING = {"none": {"sphere_method": ""}, "Ledoit-Wolf": LW, "default (auto)": {}}


def timed(fn: Callable[[], object], repeats: int, warm_up: bool = True) -> tuple[object, float]:
    """(result, median seconds of ``repeats`` calls, after one warm-up call if ``warm_up``)."""
    result = fn() if warm_up else None
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, statistics.median(times)


def nsc_table(wells: pd.DataFrame, cfg: ProfileConfig, repeats: int) -> pd.DataFrame:
    rows = []
    for group, configs in (("main", STANDARD), ("ablation", ABLATION)):
        for name, overrides in configs.items():
            prof, sec = timed(lambda c=replace(cfg, **overrides): build_profiles(wells, c), repeats)
            rows.append({"table": group, "configuration": name, "NSC": nsc_accuracy(prof),
                         "NSCB": nsc_accuracy(prof, batch="Metadata_Batch"), "pipeline_s": sec})
    return pd.DataFrame(rows)


def validation_tables(wells: pd.DataFrame, data: Path, weeks: bool) -> dict[str, tuple[pd.DataFrame, dict]]:
    """name → (table, config overrides) of the sphering validation."""
    week = wells["Metadata_Batch"].str.removeprefix("Week").astype(int)
    tables = {
        "BBBC021": (wells, {}),
        "BBBC021 weeks 1-4": (wells[week <= 4].reset_index(drop=True), {}),
        "BBBC021 weeks 5-10": (wells[week > 4].reset_index(drop=True), {}),
    }
    if (data / MORPHEUS_FILE).exists():
        tables["BBBC021 MAD-robustised (Morpheus)"] = (read_table(data / MORPHEUS_FILE), {"label_column": "Metadata_moa"})
    if weeks:
        for w in sorted(week.unique()):
            tables[f"week {w} alone"] = (wells[week == w].reset_index(drop=True), {})
    return tables


def _nsc_or_none(profiles: pd.DataFrame, label: str) -> float | None:
    try:
        return nsc_accuracy(profiles, label=label)
    except ValueError:  # no MoA with two compounds in this table
        return None


def sphering_validation(tables: dict[str, tuple[pd.DataFrame, dict]], cfg: ProfileConfig, null_size: int) -> pd.DataFrame:
    rows = []
    for name, (table, overrides) in tables.items():
        row: dict[str, object] = {"table": name, "wells": len(table), "DMSO wells": int((table["Metadata_Compound"] == "DMSO").sum())}
        for variant, sph in SPHERING.items():
            c = replace(cfg, **overrides, **sph)
            result = run_pipeline(table, c)
            rep = replicate_map(result.wells, c.treatment_strata, c.controls, null_size=null_size)
            row[f"mAP {variant}"] = rep["mean_average_precision"].mean()
            row[f"NSC {variant}"] = _nsc_or_none(result.profiles, c.label_column)
            if variant == "default (auto)":
                row["auto chose"] = result.summary["sphering"]
        row["default >= none (mAP)"] = row["mAP default (auto)"] >= row["mAP none"]
        rows.append(row)
    return pd.DataFrame(rows)


def pycytominer_profiles(wells: pd.DataFrame, controls: str) -> pd.DataFrame:
    """Per-plate DMSO standardisation → feature selection → treatment mean, all by pycytominer."""
    import pycytominer as pcm

    feats = [c for c in wells if not c.startswith("Metadata_")]
    norm = pd.concat(
        [pcm.normalize(g, features=feats, samples=controls, method="standardize", output_type=None) for _, g in wells.groupby("Metadata_Plate")]
    )
    sel = pcm.feature_select(norm, features=feats, operation=["variance_threshold", "correlation_threshold", "drop_na_columns"], output_type=None)
    kept = [c for c in sel if not c.startswith("Metadata_")]
    prof = pcm.aggregate(sel, strata=TREATMENT, features=kept, operation="mean", output_type=None)
    moa = wells.drop_duplicates(TREATMENT)[TREATMENT + ["Metadata_MoA", "Metadata_Batch"]]
    return prof.merge(moa, on=TREATMENT)


def phenoscope_same_definition(wells: pd.DataFrame, controls: str) -> pd.DataFrame:
    x = normalize(wells, "standardize", samples=controls, by="Metadata_Plate")
    return aggregate(feature_select(x), TREATMENT)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--null-size", type=int, default=1000, help="null size of the validation's replicate mAP (p-values unused there)")
    ap.add_argument("--weeks", action="store_true", help="also validate on each imaging week alone")
    ap.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads (1 avoids spin-waiting on a busy machine)")
    args = ap.parse_args(argv)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    cfg = load_config(ProfileConfig, CONFIG)

    t0 = time.perf_counter()
    wells = load_bbbc021(args.data)
    print(f"loaded {wells.shape[0]} wells × {wells.shape[1]} columns in {time.perf_counter() - t0:.2f} s")
    pd.set_option("display.width", 250)
    pd.set_option("display.max_colwidth", 60)

    t_table = time.perf_counter()
    print(nsc_table(wells, cfg, args.repeats).round(3).to_string(index=False))
    print(f"whole table (incl. warm-ups and {args.repeats} repeats each): {time.perf_counter() - t_table:.2f} s")

    print("\nsphering default validation (replicate mAP vs DMSO; NSC where a MoA has two compounds):")
    print(sphering_validation(validation_tables(wells, args.data, args.weeks), cfg, args.null_size).round(3).to_string(index=False))

    ours, t_ours = timed(lambda: phenoscope_same_definition(wells, cfg.controls), args.repeats)
    try:
        ref, t_ref = timed(lambda: pycytominer_profiles(wells, cfg.controls), 1)
    except ImportError:
        print("pycytominer not installed: no side-by-side timing")
        return 0
    print("\nsame definition (per-plate DMSO standardise → feature_select → treatment mean):")
    print(f"  pycytominer 1.7.1: NSC {nsc_accuracy(ref):.3f}  NSCB {nsc_accuracy(ref, batch='Metadata_Batch'):.3f}  {t_ref:.2f} s")
    print(f"  phenoscope       : NSC {nsc_accuracy(ours):.3f}  NSCB {nsc_accuracy(ours, batch='Metadata_Batch'):.3f}  {t_ours:.3f} s")
    print(f"  speed-up: {t_ref / t_ours:.1f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
