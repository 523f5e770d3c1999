"""Permutation p-values for mean average precision, as copairs defines them.

The null of one profile's AP is the AP of a random ranking with the same number of positive
pairs ``k`` and of pairs in all ``n``: ``null_size`` draws per distinct (k, n). The null of a
group's mAP averages its members' draws index by index (members that share a (k, n) share its
draws, as in copairs). The one-sided p-value is ``(#{null > mAP} + 1) / (null_size + 1)``;
Benjamini–Hochberg corrects over groups.

Draws of the configuration (k, n) come from ``numpy.random.default_rng([seed, k, n])``, so a
configuration's null depends only on the seed, never on which other configurations exist.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control

_CHUNK = 1 << 22  # elements per temporary array (32 MiB of float64)


def _floyd_positions(k: int, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, k) distinct positions in [0, n) per row, uniform k-subsets (Floyd's algorithm)."""
    out = np.empty((size, k), dtype=np.int64)
    for i, j in enumerate(range(n - k, n)):
        t = rng.integers(0, j + 1, size=size)
        if i:
            t = np.where((out[:, :i] == t[:, None]).any(axis=1), j, t)
        out[:, i] = t
    return out


def _key_positions(k: int, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, k) distinct positions in [0, n) per row: the k smallest of n uniform keys."""
    rows = max(1, _CHUNK // n)
    return np.concatenate(
        [np.argpartition(rng.random((min(rows, size - s), n)), k - 1, axis=1)[:, :k] for s in range(0, size, rows)]
    )


def random_ap(n_pos: int, n_total: int, null_size: int, seed: int = 0) -> np.ndarray:
    """(null_size,) APs of random rankings of ``n_pos`` positives among ``n_total`` pairs.

    AP = mean over positives of (positives ranked so far) / rank. Small ``n_pos`` draws the
    positions by Floyd's algorithm (cost ∝ n_pos²), larger ones by partial sorts of random keys
    (cost ∝ n_total).
    """
    if not 0 < n_pos <= n_total:
        raise ValueError(f"need 0 < n_pos ≤ n_total, got n_pos={n_pos}, n_total={n_total}")
    if null_size < 1:
        raise ValueError(f"null_size must be ≥ 1, got {null_size}")
    rng = np.random.default_rng([seed, n_pos, n_total])
    draw = _floyd_positions if n_pos * n_pos <= 8 * n_total else _key_positions
    ranks = np.sort(draw(n_pos, n_total, null_size, rng), axis=1) + 1.0
    return np.mean(np.arange(1, n_pos + 1) / ranks, axis=1)


def null_distributions(configs: np.ndarray, null_size: int, seed: int = 0) -> np.ndarray:
    """(len(configs), null_size) null APs, one row per (n_pos, n_total) row of ``configs``."""
    if not len(configs):
        return np.empty((0, null_size))
    return np.stack([random_ap(int(k), int(n), null_size, seed) for k, n in configs])


def group_p_values(map_scores: np.ndarray, weights: np.ndarray, nulls: np.ndarray) -> np.ndarray:
    """One-sided permutation p-values (groups,).

    ``map_scores`` (groups,) observed mAP; ``weights`` (groups, configs) the fraction of each
    group's profiles with each configuration; ``nulls`` (configs, null_size) from ``null_distributions``.
    """
    null_size = nulls.shape[1]
    rows = max(1, _CHUNK // null_size)  # groups per chunk of group nulls
    counts = np.zeros(len(map_scores))
    for s in range(0, len(map_scores), rows):
        counts[s : s + rows] = (weights[s : s + rows] @ nulls > map_scores[s : s + rows, None]).sum(axis=1)
    return (counts + 1.0) / (null_size + 1.0)


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (scipy ``false_discovery_control``, method "bh")."""
    p = np.asarray(p_values, dtype=np.float64)
    return false_discovery_control(p, method="bh") if p.size else p


def map_with_p_values(
    ap: pd.DataFrame, groupby: Sequence[str], null_size: int = 10000, threshold: float = 0.05, seed: int = 0
) -> pd.DataFrame:
    """Per-group mAP with permutation p-values, from a per-profile AP table.

    ``ap`` holds ``groupby`` columns, ``average_precision``, ``n_pos_pairs`` and ``n_total_pairs``
    (``retrieval_average_precision`` output); profiles without positives are skipped. Returns
    ``groupby`` + ``mean_average_precision``, ``p_value``, ``corrected_p_value`` (BH),
    ``below_p`` and ``below_corrected_p`` (``< threshold``), as ``copairs.map.mean_average_precision``.
    """
    keys = list(groupby)
    ap = ap[(ap["n_pos_pairs"] > 0) & ap["average_precision"].notna()]
    configs, config_ix = np.unique(ap[["n_pos_pairs", "n_total_pairs"]].to_numpy(dtype=np.int64).reshape(-1, 2), axis=0, return_inverse=True)
    grouped = ap.groupby(keys, sort=True, observed=True)
    group_ix = grouped.ngroup().to_numpy()
    out = grouped["average_precision"].mean().rename("mean_average_precision").reset_index()
    weights = np.zeros((len(out), len(configs)))
    np.add.at(weights, (group_ix, config_ix.ravel()), 1.0)
    weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1.0)
    out["p_value"] = group_p_values(out["mean_average_precision"].to_numpy(float), weights, null_distributions(configs, null_size, seed))
    out["corrected_p_value"] = benjamini_hochberg(out["p_value"].to_numpy())
    out["below_p"] = out["p_value"] < threshold
    out["below_corrected_p"] = out["corrected_p_value"] < threshold
    return out
