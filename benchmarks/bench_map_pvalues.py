"""mAP with permutation p-values: phenoscope vs copairs 0.5.5, side by side on the BBBC021 well table.

Usage: python benchmarks/bench_map_pvalues.py [--data ../shared/data/bbbc021_profiles] [--null-size 10000] [--repeats 3]

Replicate retrieval against DMSO (copairs' phenotypic activity) on the 632 normalised,
feature-selected BBBC021 wells: per-profile AP, null distributions, p-values and BH FDR. copairs
is timed with an empty null cache (its first run on a data set) and with the cache it wrote
(later runs). Also prints the agreement (fraction with corrected p < 0.05, largest p-value
difference) and phenoscope's time on a synthetic 384-well plate and on 10⁴ profiles.
Times: median of ``--repeats`` runs after one warm-up, 1 BLAS thread.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from bench_profiling import timed  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from phenoscope.datasets import data_root
from phenoscope.datasets.bbbc021 import load_bbbc021
from phenoscope.profiling import feature_select, normalize, replicate_map
from phenoscope.profiling.metrics import REFERENCE, with_reference_index

DEFAULT_DATA = data_root() / "bbbc021_profiles"
CONTROLS = "Metadata_Compound == 'DMSO'"


def copairs_replicate_map(wells: pd.DataFrame, null_size: int, cache_dir: Path) -> pd.DataFrame:
    """The same replicate mAP by copairs: average_precision + mean_average_precision."""
    import copairs.map as cm

    table = with_reference_index(wells, CONTROLS)
    keys = ["Metadata_Treatment", REFERENCE]
    meta = table[[c for c in table if c.startswith("Metadata_")]]
    feats = table[[c for c in table if not c.startswith("Metadata_")]].to_numpy()
    ap = cm.average_precision(meta, feats, pos_sameby=keys, pos_diffby=[], neg_sameby=[], neg_diffby=keys, progress_bar=False)
    return cm.mean_average_precision(ap, ["Metadata_Treatment"], null_size=null_size, threshold=0.05, seed=0,
                                     progress_bar=False, cache_dir=cache_dir)


def synthetic_plate(n_wells: int, n_rep: int = 4, n_controls: int = 32, d: int = 300, seed: int = 0) -> pd.DataFrame:
    """``n_wells`` profiles: ``n_controls`` DMSO wells, the rest compounds in ``n_rep`` replicates."""
    rng = np.random.default_rng(seed)
    n_cpd = (n_wells - n_controls) // n_rep
    compounds = np.r_[np.repeat([f"c{i}" for i in range(n_cpd)], n_rep), ["DMSO"] * (n_wells - n_cpd * n_rep)]
    centres = rng.normal(size=(n_cpd + 1, d)) * 0.3
    codes = pd.factorize(compounds)[0]
    x = centres[codes] * (compounds != "DMSO")[:, None] + rng.normal(size=(n_wells, d))
    return pd.DataFrame(x, columns=[f"f{i}" for i in range(d)]).assign(Metadata_Treatment=compounds, Metadata_Compound=compounds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--null-size", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    wells = feature_select(normalize(load_bbbc021(args.data), samples=CONTROLS, pooled_scale=True))
    wells = wells.assign(Metadata_Treatment=wells["Metadata_Compound"] + "@" + wells["Metadata_Concentration"].astype(str))
    print(f"BBBC021: {len(wells)} wells × {wells.shape[1] - sum(c.startswith('Metadata_') for c in wells)} features, null_size {args.null_size}")

    ours, t_ours = timed(lambda: replicate_map(wells, ["Metadata_Treatment"], CONTROLS, null_size=args.null_size), args.repeats)
    try:
        import copairs  # noqa: F401
    except ImportError:
        print(f"phenoscope: {t_ours:.3f} s (copairs not installed: no side-by-side timing)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        cold_runs = [Path(tmp) / f"cold{i}" for i in range(args.repeats)]
        runs = iter(cold_runs)
        ref, t_cold = timed(lambda: copairs_replicate_map(wells, args.null_size, next(runs)), args.repeats, warm_up=False)
        _, t_warm = timed(lambda: copairs_replicate_map(wells, args.null_size, cold_runs[0]), args.repeats)
    merged = ours.merge(ref, on="Metadata_Treatment", suffixes=("", "_copairs"))
    print(f"  treatments: {len(merged)}; fraction with corrected p < 0.05: phenoscope {merged['below_corrected_p'].mean():.4f}, "
          f"copairs {merged['below_corrected_p_copairs'].mean():.4f}; largest |Δp| {np.abs(merged['p_value'] - merged['p_value_copairs']).max():.2e}")
    print(f"  copairs 0.5.5, empty null cache: {t_cold:.3f} s  ({t_cold / t_ours:.1f}× phenoscope)")
    print(f"  copairs 0.5.5, warm null cache : {t_warm:.3f} s  ({t_warm / t_ours:.1f}× phenoscope)")
    print(f"  phenoscope                     : {t_ours:.3f} s")
    for n in (384, 10_000):
        plate = synthetic_plate(n)
        res, sec = timed(lambda p=plate: replicate_map(p, ["Metadata_Treatment"], CONTROLS, null_size=args.null_size), 1)
        print(f"phenoscope, synthetic {n} profiles × 300 features, {len(res)} compounds: {sec:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
