"""Aggregation, per-plate normalisation, feature selection and batch correction of profile tables.

Definitions follow pycytominer 1.7.1 where they overlap (tested against it):
``aggregate`` = ``pycytominer.aggregate``; ``normalize(..., by=None)`` = ``pycytominer.normalize``
(``by="Metadata_Plate"`` = pycytominer applied plate by plate); ``feature_select`` = ``pycytominer.feature_select``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from phenoscope.profiling.table import (
    feature_matrix,
    metadata_columns,
    require_columns,
    sample_mask,
    with_features,
)

MAD_SCALE = 1.4826  # MAD → standard deviation for a normal distribution


def aggregate(
    profiles: pd.DataFrame,
    strata: Sequence[str] = ("Metadata_Plate", "Metadata_Well"),
    operation: Literal["mean", "median"] = "mean",
    features: Sequence[str] | None = None,
    keep_constant_metadata: bool = True,
    count_column: str | None = "Metadata_Count",
) -> pd.DataFrame:
    """Collapse rows (cells → site → well → treatment) by ``strata`` with a mean or median.

    Output rows are sorted by ``strata`` (NaN groups kept). With ``keep_constant_metadata``, other
    ``Metadata_`` columns are carried over: the group's value where it is constant within the group,
    NaN where it is not (e.g. the batch of DMSO pooled over batches); ``count_column``
    (if not None) holds the number of input rows per group.
    """
    if operation not in ("mean", "median"):
        raise ValueError(f"operation must be 'mean' or 'median', got {operation!r}")
    strata = list(strata)
    require_columns(profiles, strata, "strata")
    feats, _ = feature_matrix(profiles, features)
    groups = profiles.groupby(strata, dropna=False, sort=True)
    values = getattr(profiles[strata + feats].astype({f: float for f in feats}).groupby(strata, dropna=False, sort=True), operation)()
    out = values.reset_index()
    extra = [c for c in metadata_columns(profiles) if c not in strata and c != count_column]
    if keep_constant_metadata and extra:
        constant = groups[extra].nunique(dropna=False).to_numpy() <= 1
        carried = groups[extra].first().reset_index(drop=True).where(constant)
        out = pd.concat([out[strata], carried, out[feats]], axis=1)
    if count_column is not None:
        out.insert(len(strata), count_column, groups.size().to_numpy())
    return out


def _location_scale(x: np.ndarray, method: str, mad_epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-column centre and scale of ``x`` (rows, features) for a normalisation method."""
    if method == "standardize":  # sklearn StandardScaler: population sd, zero sd → 1
        loc = np.nanmean(x, axis=0)
        sd = np.nanstd(x, axis=0)
        return loc, np.where(sd == 0, 1.0, sd)
    if method == "mad_robustize":  # pycytominer RobustMAD: (x - median) / (1.4826 MAD + eps)
        loc = np.nanmedian(x, axis=0)
        mad = np.nanmedian(np.abs(x - loc), axis=0) * MAD_SCALE
        return loc, mad + mad_epsilon
    raise ValueError(f"method must be 'standardize' or 'mad_robustize', got {method!r}")


def normalize(
    profiles: pd.DataFrame,
    method: Literal["standardize", "mad_robustize"] = "standardize",
    samples: str | None = None,
    by: str | Sequence[str] | None = "Metadata_Plate",
    pooled_scale: bool = False,
    features: Sequence[str] | None = None,
    mad_epsilon: float = 1e-18,
) -> pd.DataFrame:
    """Standardise or robust-MAD scale features per group (e.g. plate) against reference rows.

    ``samples``: ``DataFrame.query`` expression selecting the reference rows (e.g. DMSO wells);
    ``None`` = all rows. ``by``: grouping column(s), ``None`` = whole table.
    ``pooled_scale=False`` is pycytominer's definition applied per group. ``pooled_scale=True``
    centres each group on its own reference rows but divides by one scale estimated from the
    pooled, group-centred reference rows: far less noisy when each plate has few controls
    (BBBC021: 6 DMSO wells per plate).
    """
    feats, x = feature_matrix(profiles, features)
    ref = sample_mask(profiles, samples)
    keys = [by] if isinstance(by, str) else list(by or [])
    require_columns(profiles, keys, "group")
    group_ids = profiles.groupby(keys, sort=False, dropna=False).ngroup().to_numpy() if keys else np.zeros(len(profiles), int)
    out = np.empty_like(x)
    for g in np.unique(group_ids):
        rows = group_ids == g
        if not (rows & ref).any():
            label = profiles.loc[rows, keys].iloc[0].to_dict()
            raise ValueError(f"group {label} has no reference rows matching {samples!r}")
        loc, scale = _location_scale(x[rows & ref], method, mad_epsilon)
        out[rows] = x[rows] - loc if pooled_scale else (x[rows] - loc) / scale
    if pooled_scale:
        _, scale = _location_scale(out[ref], method, mad_epsilon)
        out /= scale
    return with_features(profiles, out, feats)


def _correlation_excluded(x: np.ndarray, names: list[str], threshold: float) -> set[str]:
    """pycytominer ``correlation_threshold``: for each pair with Pearson r > threshold, drop the
    member with the larger sum of absolute correlations."""
    corr = np.corrcoef(x, rowvar=False) if np.isfinite(x).all() else pd.DataFrame(x).corr().to_numpy()
    order = pd.Series(np.nansum(np.abs(corr), axis=0)).sort_values().index.to_numpy()
    rank = np.empty(len(names), int)
    rank[order] = np.arange(len(names))
    a, b = np.nonzero(np.tril(np.nan_to_num(corr, nan=-np.inf) > threshold, k=-1))
    drop = np.where(rank[a] > rank[b], a, b)
    return {names[i] for i in drop}


FeatureOp = Literal["variance_threshold", "correlation_threshold", "drop_na_columns"]


def feature_select(
    profiles: pd.DataFrame,
    operation: Sequence[FeatureOp] = ("variance_threshold", "correlation_threshold", "drop_na_columns"),
    samples: str | None = None,
    features: Sequence[str] | None = None,
    min_variance: float = 1e-6,
    corr_threshold: float = 0.9,
    na_cutoff: float = 0.05,
) -> pd.DataFrame:
    """Drop features by low variance, high pairwise correlation, or NaN fraction (pycytominer rules).

    Operations run in order on the features surviving the previous ones; statistics use the rows
    selected by ``samples`` (all rows if ``None``). Metadata columns are kept.
    """
    known = ("variance_threshold", "correlation_threshold", "drop_na_columns")
    if isinstance(operation, str):
        operation = [operation]
    bad = [op for op in operation if op not in known]
    if bad:
        raise ValueError(f"unknown feature_select operation(s) {bad}; choose from {list(known)}")
    if not 0 <= corr_threshold <= 1 or not 0 <= na_cutoff <= 1:
        raise ValueError("corr_threshold and na_cutoff must lie in [0, 1]")
    feats, _ = feature_matrix(profiles, features)
    rows = profiles.loc[sample_mask(profiles, samples)]
    for op in operation:
        x = rows[feats].to_numpy(dtype=np.float64)
        if op == "variance_threshold":  # sklearn VarianceThreshold: population variance, keep var > min
            drop = {f for f, v in zip(feats, np.nanvar(x, axis=0)) if not v > min_variance}
        elif op == "drop_na_columns":
            drop = {f for f, p in zip(feats, np.isnan(x).mean(axis=0)) if p > na_cutoff}
        else:
            drop = _correlation_excluded(x, feats, corr_threshold)
        feats = [f for f in feats if f not in drop]
    if not feats:
        raise ValueError("feature_select removed every feature")
    return pd.concat([profiles[metadata_columns(profiles)], profiles[feats]], axis=1)


def harmonize(
    profiles: pd.DataFrame,
    batch_keys: str | Sequence[str],
    n_components: int | None = 50,
    features: Sequence[str] | None = None,
    theta: float | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Harmony batch correction (harmonypy) on the top ``n_components`` PCs (None: raw features).

    Returns metadata plus columns ``Harmony_1..k``. Note: when treatments are confounded with the
    batch (each plate holds different compounds), Harmony also removes treatment signal.
    """
    import harmonypy

    keys = [batch_keys] if isinstance(batch_keys, str) else list(batch_keys)
    require_columns(profiles, keys, "batch")
    _, x = feature_matrix(profiles, features)
    if not np.isfinite(x).all():
        raise ValueError("harmonize needs finite features; run feature_select/drop NaN first")
    x = x - x.mean(axis=0)
    if n_components is not None:
        k = min(n_components, *x.shape)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        x = x @ vt[:k].T
    meta = profiles[keys].astype(str).reset_index(drop=True)
    ho = harmonypy.run_harmony(x, meta, keys, theta=theta, verbose=False, random_state=seed)
    z = np.asarray(ho.Z_corr)
    z = z if z.shape[0] == len(profiles) else z.T
    return with_features(profiles, z, [f"Harmony_{i + 1}" for i in range(z.shape[1])])
