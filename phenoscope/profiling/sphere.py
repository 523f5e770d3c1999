"""Sphering (whitening) fitted on control rows, robust to fewer controls than features.

Regularisations (``epsilon``, ``epsilon_mode``):

* ``epsilon_mode="absolute"`` – pycytominer 1.7.1's ``Spherize``: ``epsilon`` is added to the
  singular values of the centred control matrix, and when n ≤ d the missing singular values are
  padded with the smallest retained one. With a tiny epsilon, directions the controls barely
  sample are amplified enormously (BBBC021: NSC 0.82 → 0.28).
* ``epsilon_mode="relative"`` – shrinkage whitening: ``W = (Σ + ε·λ̄·I)^(-1/2)`` with
  Σ the control covariance and λ̄ = tr(Σ)/d its mean eigenvalue, i.e. whitening with the
  shrunk covariance ``(1-α)Σ + α·λ̄·I`` (α = ε/(1+ε)) up to a global scale. Null directions of Σ
  (always present when n ≤ d) are scaled by at most ``1/sqrt(ε·λ̄)``.
  ``epsilon="ledoit-wolf"`` picks α with the Ledoit–Wolf formula (sklearn).
* ``epsilon="rank"`` – whitening truncated to the controls' rank: directions the controls do not
  span are dropped (gain 0); ``epsilon="none"`` – no whitening (centring/rotation only).
* ``epsilon="auto"`` (default) – chooses among ``AUTO_CANDIDATES`` by a label-free criterion on the
  control rows only (``select_epsilon``): fitted on some control groups (plates), how evenly does
  each candidate spread the variation of the held-out controls over directions? The score is the
  participation ratio ``tr(C)² / (d·tr(C²))`` of the held-out whitened controls' covariance C
  (1 = perfectly white; low when a few directions dominate, whether nuisance directions left
  unshrunk or unsampled directions over-amplified), averaged over folds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.covariance import ledoit_wolf_shrinkage

from phenoscope.profiling.table import feature_matrix, require_columns, sample_mask, with_features

Method = Literal["ZCA", "ZCA-cor", "PCA", "PCA-cor"]
METHODS = ("ZCA", "ZCA-cor", "PCA", "PCA-cor")
Epsilon = float | Literal["auto", "ledoit-wolf", "rank", "none"]
AUTO_CANDIDATES: tuple[float | str, ...] = ("none", "ledoit-wolf", 0.01, 0.1, 1.0, "rank")
AUTO_FOLDS = 5


@dataclass(frozen=True)
class Spherizer:
    """A fitted sphering transform: ``y = ((x - mean) / scale) @ W``.

    Shapes: ``mean``, ``scale`` (d,), ``W`` (d, d). ``regularization`` is the resolved choice
    ("absolute", "relative", "ledoit-wolf", "rank" or "none"), ``epsilon`` the value used (NaN for
    "rank"/"none"); ``scores`` holds the ``epsilon="auto"`` criterion per candidate (else empty).
    """

    method: str
    mean: np.ndarray
    scale: np.ndarray
    W: np.ndarray
    epsilon: float
    epsilon_mode: str
    regularization: str = "relative"
    scores: dict[str, float] = field(default_factory=dict)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Apply to an array of shape (n, d)."""
        if x.shape[1] != self.W.shape[0]:
            raise ValueError(f"expected {self.W.shape[0]} features, got {x.shape[1]}")
        return ((x - self.mean) / self.scale) @ self.W


def _rank(s: np.ndarray, n: int, d: int) -> int:
    """Numerical rank of a matrix with singular values ``s`` (numpy ``matrix_rank`` tolerance)."""
    return int((s > s.max(initial=0.0) * max(n, d) * np.finfo(float).eps).sum())


def _scales(s: np.ndarray, n: int, d: int, epsilon: float | str, mode: str) -> np.ndarray:
    """Per-component multipliers (d,) from the singular values ``s`` of the centred controls."""
    if epsilon == "none":
        return np.ones(d)
    r = _rank(s, n, d)
    if r == 0:
        raise ValueError("control rows have zero variance; cannot spherize")
    if epsilon == "rank":
        return np.concatenate([np.sqrt(n - 1) / s[:r], np.zeros(d - r)])
    if mode == "absolute":
        sig = np.concatenate([s[:r], np.repeat(s[r - 1], d - r)]) if n <= d else s
        return np.sqrt(n - 1) / (sig + epsilon)
    lam = np.zeros(d)
    lam[: s.size] = s**2 / (n - 1)
    ridge = epsilon * lam.mean()
    if ridge <= 0:
        raise ValueError("relative epsilon must be > 0")
    return 1.0 / np.sqrt(lam + ridge)


def ledoit_wolf_epsilon(xc: np.ndarray) -> float:
    """Relative epsilon ε = α/(1-α) from the Ledoit–Wolf shrinkage α of centred data (n, d)."""
    alpha = float(ledoit_wolf_shrinkage(xc, assume_centered=True))
    return alpha / max(1.0 - alpha, 1e-12)


def participation_ratio(z: np.ndarray) -> float:
    """``tr(C)² / (d·tr(C²))`` of ``C = zᵀz / n`` for rows ``z`` (n, d): 1 when C ∝ I, 1/d for rank one."""
    c = z.T @ z / len(z)
    tr2 = float(np.sum(c * c))
    return float(np.trace(c) ** 2 / (c.shape[0] * tr2)) if tr2 > 0 else 0.0


def _folds(n: int, groups: np.ndarray | None, n_folds: int, seed: int) -> list[np.ndarray]:
    """Held-out row masks: whole groups per fold when ≥ 2 groups, else random rows."""
    rng = np.random.default_rng(seed)
    if groups is not None and len(np.unique(groups)) >= 2:
        names = rng.permutation(np.unique(groups))
        return [np.isin(groups, part) for part in np.array_split(names, min(n_folds, len(names)))]
    order = rng.permutation(n)
    return [np.isin(np.arange(n), part) for part in np.array_split(order, min(n_folds, n))]


def select_epsilon(
    x: np.ndarray, groups: np.ndarray | None = None, method: Method = "ZCA",
    candidates: Sequence[float | str] = AUTO_CANDIDATES, n_folds: int = AUTO_FOLDS, seed: int = 0,
) -> tuple[float | str, dict[str, float]]:
    """The relative-mode ``epsilon`` among ``candidates`` that best whitens held-out controls.

    ``x`` (n, d) holds only control rows; ``groups`` (n,) their plates (folds hold out whole
    plates). Score: mean ``participation_ratio`` of the held-out rows after the transform fitted
    on the other rows (first candidate wins ties). Returns (best, {candidate: score}).
    """
    folds = [f for f in _folds(len(x), groups, n_folds, seed) if (~f).sum() >= 2 and f.any()]
    if not folds:
        raise ValueError(f"epsilon='auto' needs at least 3 control rows, got {len(x)}")
    scores = {}
    for cand in candidates:
        fits = [(fit_spherizer(x[~f], method, cand), f) for f in folds]
        scores[str(cand)] = float(np.mean([participation_ratio(sph.transform(x[f])) for sph, f in fits]))
    best = max(range(len(candidates)), key=lambda i: scores[str(candidates[i])])
    return candidates[best], scores


def fit_spherizer(
    x: np.ndarray,
    method: Method = "ZCA",
    epsilon: Epsilon = "auto",
    epsilon_mode: Literal["relative", "absolute"] = "relative",
    center: bool = True,
    groups: np.ndarray | None = None,
) -> Spherizer:
    """Fit on control rows ``x`` (n, d); ``groups`` (n,) are their plates for ``epsilon="auto"``.

    See the module docstring for the regularisations.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if epsilon_mode not in ("relative", "absolute"):
        raise ValueError(f"epsilon_mode must be 'relative' or 'absolute', got {epsilon_mode!r}")
    if isinstance(epsilon, str) and epsilon not in ("auto", "ledoit-wolf", "rank", "none"):
        raise ValueError(f"epsilon must be a number, 'auto', 'ledoit-wolf', 'rank' or 'none', got {epsilon!r}")
    if isinstance(epsilon, str) and epsilon_mode != "relative":
        raise ValueError(f"epsilon={epsilon!r} requires epsilon_mode='relative'")
    if not np.isfinite(x).all():
        raise ValueError("spherize needs finite features in the control rows (drop NaN columns first)")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"need at least 2 control rows to spherize, got {n}")
    cor = method.endswith("-cor")
    if cor and not center:
        raise ValueError(f"{method} requires center=True")
    scores: dict[str, float] = {}
    if epsilon == "auto":
        epsilon, scores = select_epsilon(x, groups, method)
    mean = x.mean(axis=0) if center else np.zeros(d)
    scale = x.std(axis=0) if cor else np.ones(d)
    if cor and (scale == 0).any():
        raise ValueError(f"{int((scale == 0).sum())} feature(s) have zero variance in the controls; run feature_select first")
    xc = (x - mean) / scale
    regularization = epsilon if isinstance(epsilon, str) else epsilon_mode
    if epsilon == "ledoit-wolf":
        epsilon = ledoit_wolf_epsilon(xc)
    _, s, vt = np.linalg.svd(xc, full_matrices=True)
    w = vt.T * _scales(s, n, d, epsilon, epsilon_mode)
    if method.startswith("ZCA"):
        w = w @ vt
    used = float("nan") if isinstance(epsilon, str) else float(epsilon)
    return Spherizer(method, mean, scale, w, used, epsilon_mode, regularization, scores)


def spherize(
    profiles: pd.DataFrame,
    samples: str | None = None,
    method: Method = "ZCA",
    epsilon: Epsilon = "auto",
    epsilon_mode: Literal["relative", "absolute"] = "relative",
    center: bool = True,
    features: Sequence[str] | None = None,
    groups: str | None = None,
) -> pd.DataFrame:
    """Sphere all rows with a transform fitted on the rows selected by ``samples`` (e.g. DMSO).

    ``groups`` names the column (e.g. ``Metadata_Plate``) whose values ``epsilon="auto"`` holds
    out together. ZCA keeps feature names; PCA variants name columns ``PC1..PCd`` (as pycytominer).
    """
    return spherize_with(profiles, samples, method, epsilon, epsilon_mode, center, features, groups)[0]


def spherize_with(
    profiles: pd.DataFrame,
    samples: str | None = None,
    method: Method = "ZCA",
    epsilon: Epsilon = "auto",
    epsilon_mode: Literal["relative", "absolute"] = "relative",
    center: bool = True,
    features: Sequence[str] | None = None,
    groups: str | None = None,
) -> tuple[pd.DataFrame, Spherizer]:
    """``spherize`` that also returns the fitted ``Spherizer`` (its resolved regularisation)."""
    feats, x = feature_matrix(profiles, features)
    mask = sample_mask(profiles, samples)
    if groups is not None:
        require_columns(profiles, [groups], "sphering group")
    labels = profiles[groups].to_numpy()[mask] if groups is not None else None
    sph = fit_spherizer(x[mask], method, epsilon, epsilon_mode, center, labels)
    names = feats if method.startswith("ZCA") else [f"PC{i + 1}" for i in range(len(feats))]
    return with_features(profiles, sph.transform(x), names), sph
