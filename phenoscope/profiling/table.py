"""Column conventions for profile tables (pycytominer style: metadata columns start with ``Metadata_``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

META_PREFIX = "Metadata_"


def metadata_columns(profiles: pd.DataFrame) -> list[str]:
    """Names of the ``Metadata_*`` columns, in table order."""
    return [c for c in profiles.columns if str(c).startswith(META_PREFIX)]


def feature_columns(profiles: pd.DataFrame, features: Sequence[str] | None = None) -> list[str]:
    """Feature column names: ``features`` if given (checked), else every non-``Metadata_`` column.

    Raises ``ValueError`` naming missing or non-numeric columns.
    """
    cols = list(features) if features is not None else [c for c in profiles.columns if not str(c).startswith(META_PREFIX)]
    missing = [c for c in cols if c not in profiles.columns]
    if missing:
        raise ValueError(f"feature column(s) not in table: {missing[:10]}")
    if not cols:
        raise ValueError("profile table has no feature columns (all columns start with 'Metadata_')")
    bad = [c for c in cols if not pd.api.types.is_numeric_dtype(profiles[c])]
    if bad:
        raise ValueError(f"non-numeric feature column(s): {bad[:10]}; prefix metadata columns with 'Metadata_'")
    return cols


def require_columns(profiles: pd.DataFrame, columns: Sequence[str], what: str = "metadata") -> None:
    """Raise ``ValueError`` if any of ``columns`` is missing."""
    missing = [c for c in columns if c not in profiles.columns]
    if missing:
        raise ValueError(f"{what} column(s) {missing} not in table; available metadata: {metadata_columns(profiles)}")


def sample_mask(profiles: pd.DataFrame, samples: str | None, allow_empty: bool = False) -> np.ndarray:
    """Boolean row mask from a ``DataFrame.query`` expression (``None`` or ``"all"`` = every row).

    Example: ``"Metadata_Compound == 'DMSO'"``; the expression sees the metadata columns only.
    Raises ``ValueError`` for an expression that does not evaluate to one boolean per row, and
    (unless ``allow_empty``) if no row matches.
    """
    if samples is None or samples == "all":
        return np.ones(len(profiles), dtype=bool)
    try:
        mask = np.asarray(profiles[metadata_columns(profiles)].eval(samples), dtype=bool)
    except Exception as err:  # pandas raises many types for a bad expression
        raise ValueError(f"cannot evaluate samples query {samples!r}: {err}") from err
    if mask.shape != (len(profiles),):
        raise ValueError(f"samples query {samples!r} is not a row-wise boolean condition")
    if not (allow_empty or mask.any()):
        raise ValueError(f"samples query {samples!r} matches no rows")
    return mask


def drop_rows(profiles: pd.DataFrame, query: str | None) -> pd.DataFrame:
    """``profiles`` without the rows matching ``query`` (e.g. the controls); ``None`` keeps every row.

    The query is validated as in ``sample_mask``; matching no row is allowed.
    """
    if query is None:
        return profiles
    return profiles.loc[~sample_mask(profiles, query, allow_empty=True)]


def feature_matrix(profiles: pd.DataFrame, features: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """(feature names, float64 array of shape (rows, features))."""
    cols = feature_columns(profiles, features)
    return cols, profiles[cols].to_numpy(dtype=np.float64)


def with_features(profiles: pd.DataFrame, values: np.ndarray, columns: Sequence[str]) -> pd.DataFrame:
    """Metadata columns of ``profiles`` followed by ``values`` under ``columns`` (same row index)."""
    meta = profiles[metadata_columns(profiles)]
    feats = pd.DataFrame(values, columns=list(columns), index=profiles.index)
    return pd.concat([meta, feats], axis=1)
