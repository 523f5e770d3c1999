"""BBBC021 profiling benchmark: NSC / NSCB table (± sphering, ± Harmony) and speed vs pycytominer.

Usage: python benchmarks/bench_profiling.py [--data ../shared/data/bbbc021_profiles] [--repeats 3]

Prints NSC and NSCB per configuration with its time (median of ``--repeats`` runs after one
warm-up run; data loading excluded), the whole table's time, and the same pipeline definition
(per-plate DMSO standardisation, feature selection, mean aggregation) run by pycytominer 1.7.1
and by phenoscope, side by side, with the speed ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pandas as pd

from phenoscope.profiling import aggregate, feature_select, normalize, nsc_accuracy
from phenoscope.profiling.bbbc021 import (
    ABLATION_CONFIGS,
    CONTROLS,
    STANDARD_CONFIGS,
    TREATMENT,
    bbbc021_profiles,
    load_bbbc021,
)

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bbbc021_profiles"


def timed(fn, repeats: int) -> tuple[object, float]:
    """(result, median seconds of ``repeats`` calls after one warm-up call)."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, statistics.median(times)


def pycytominer_profiles(wells: pd.DataFrame) -> pd.DataFrame:
    """Per-plate DMSO standardisation → feature selection → treatment mean, all by pycytominer."""
    import pycytominer as pcm

    feats = [c for c in wells if not c.startswith("Metadata_")]
    norm = pd.concat(
        [pcm.normalize(g, features=feats, samples=CONTROLS, method="standardize", output_type=None) for _, g in wells.groupby("Metadata_Plate")]
    )
    sel = pcm.feature_select(norm, features=feats, operation=["variance_threshold", "correlation_threshold", "drop_na_columns"], output_type=None)
    kept = [c for c in sel if not c.startswith("Metadata_")]
    prof = pcm.aggregate(sel, strata=TREATMENT, features=kept, operation="mean", output_type=None)
    moa = wells.drop_duplicates(TREATMENT)[TREATMENT + ["Metadata_MoA", "Metadata_Batch"]]
    return prof.merge(moa, on=TREATMENT)


def phenoscope_same_definition(wells: pd.DataFrame) -> pd.DataFrame:
    x = normalize(wells, "standardize", samples=CONTROLS, by="Metadata_Plate")
    return aggregate(feature_select(x), TREATMENT)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads (1 avoids spin-waiting on a busy machine)")
    args = ap.parse_args(argv)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)

    t0 = time.perf_counter()
    wells = load_bbbc021(args.data)
    print(f"loaded {wells.shape[0]} wells × {wells.shape[1]} columns in {time.perf_counter() - t0:.2f} s")

    t_table = time.perf_counter()
    rows = []
    for group, configs in (("main", STANDARD_CONFIGS), ("ablation", ABLATION_CONFIGS)):
        for name, opts in configs.items():
            prof, sec = timed(lambda o=opts: bbbc021_profiles(wells, o), args.repeats)
            rows.append({"table": group, "configuration": name, "NSC": nsc_accuracy(prof),
                         "NSCB": nsc_accuracy(prof, batch="Metadata_Batch"), "pipeline_s": sec})
    total = time.perf_counter() - t_table
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(pd.DataFrame(rows).round(3).to_string(index=False))
    print(f"whole table (incl. warm-ups and {args.repeats} repeats each): {total:.2f} s")

    ours, t_ours = timed(lambda: phenoscope_same_definition(wells), args.repeats)
    try:
        ref, t_ref = timed(lambda: pycytominer_profiles(wells), 1)
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
