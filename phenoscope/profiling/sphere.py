"""Sphering (whitening) fitted on control rows, robust to fewer controls than features.

Two regularisations:

* ``epsilon_mode="absolute"`` – pycytominer 1.7.1's ``Spherize``: ``epsilon`` is added to the
  singular values of the centred control matrix, and when n ≤ d the missing singular values are
  padded with the smallest retained one. With a tiny epsilon, directions the controls barely
  sample are amplified enormously (BBBC021: NSC 0.82 → 0.28).
* ``epsilon_mode="relative"`` (default) – shrinkage whitening: ``W = (Σ + ε·λ̄·I)^(-1/2)`` with
  Σ the control covariance and λ̄ = tr(Σ)/d its mean eigenvalue, i.e. whitening with the
  shrunk covariance ``(1-α)Σ + α·λ̄·I`` (α = ε/(1+ε)) up to a global scale. Null directions of Σ
  (always present when n ≤ d) are scaled by at most ``1/sqrt(ε·λ̄)``.
  ``epsilon="ledoit-wolf"`` picks α with the Ledoit–Wolf formula (sklearn), a data-driven choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.covariance import ledoit_wolf_shrinkage

from phenoscope.profiling.table import feature_matrix, sample_mask, with_features

Method = Literal["ZCA", "ZCA-cor", "PCA", "PCA-cor"]
METHODS = ("ZCA", "ZCA-cor", "PCA", "PCA-cor")


@dataclass(frozen=True)
class Spherizer:
    """A fitted sphering transform: ``y = ((x - mean) / scale) @ W``.

    Shapes: ``mean``, ``scale`` (d,), ``W`` (d, d). ``epsilon`` is the value actually used.
    """

    method: str
    mean: np.ndarray
    scale: np.ndarray
    W: np.ndarray
    epsilon: float
    epsilon_mode: str

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Apply to an array of shape (n, d)."""
        if x.shape[1] != self.W.shape[0]:
            raise ValueError(f"expected {self.W.shape[0]} features, got {x.shape[1]}")
        return ((x - self.mean) / self.scale) @ self.W


def _scales(s: np.ndarray, n: int, d: int, epsilon: float, mode: str) -> np.ndarray:
    """Per-component multipliers (d,) from the singular values ``s`` of the centred controls."""
    if mode == "absolute":
        r = int((s > s.max(initial=0.0) * max(n, d) * np.finfo(float).eps).sum())  # numpy matrix_rank tol
        if r == 0:
            raise ValueError("control rows have zero variance; cannot spherize")
        sig = np.concatenate([s[:r], np.repeat(s[r - 1], d - r)]) if n <= d else s
        return np.sqrt(n - 1) / (sig + epsilon)
    lam = np.zeros(d)
    lam[: s.size] = s**2 / (n - 1)
    ridge = epsilon * lam.mean()
    if ridge <= 0:
        raise ValueError("relative epsilon must be > 0 (and controls must vary)")
    return 1.0 / np.sqrt(lam + ridge)


def ledoit_wolf_epsilon(xc: np.ndarray) -> float:
    """Relative epsilon ε = α/(1-α) from the Ledoit–Wolf shrinkage α of centred data (n, d)."""
    alpha = float(ledoit_wolf_shrinkage(xc, assume_centered=True))
    return alpha / max(1.0 - alpha, 1e-12)


def fit_spherizer(
    x: np.ndarray,
    method: Method = "ZCA",
    epsilon: float | Literal["ledoit-wolf"] = "ledoit-wolf",
    epsilon_mode: Literal["relative", "absolute"] = "relative",
    center: bool = True,
) -> Spherizer:
    """Fit on control rows ``x`` (n, d). See the module docstring for the regularisations."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if epsilon_mode not in ("relative", "absolute"):
        raise ValueError(f"epsilon_mode must be 'relative' or 'absolute', got {epsilon_mode!r}")
    if not np.isfinite(x).all():
        raise ValueError("spherize needs finite features in the control rows (drop NaN columns first)")
    n, d = x.shape
    if n < 2:
        raise ValueError(f"need at least 2 control rows to spherize, got {n}")
    cor = method.endswith("-cor")
    if cor and not center:
        raise ValueError(f"{method} requires center=True")
    mean = x.mean(axis=0) if center else np.zeros(d)
    scale = x.std(axis=0) if cor else np.ones(d)
    if cor and (scale == 0).any():
        raise ValueError(f"{int((scale == 0).sum())} feature(s) have zero variance in the controls; run feature_select first")
    xc = (x - mean) / scale
    if epsilon == "ledoit-wolf":
        if epsilon_mode != "relative":
            raise ValueError("epsilon='ledoit-wolf' requires epsilon_mode='relative'")
        epsilon = ledoit_wolf_epsilon(xc)
    _, s, vt = np.linalg.svd(xc, full_matrices=True)
    w = vt.T * _scales(s, n, d, float(epsilon), epsilon_mode)
    if method.startswith("ZCA"):
        w = w @ vt
    return Spherizer(method, mean, scale, w, float(epsilon), epsilon_mode)


def spherize(
    profiles: pd.DataFrame,
    samples: str | None = None,
    method: Method = "ZCA",
    epsilon: float | Literal["ledoit-wolf"] = "ledoit-wolf",
    epsilon_mode: Literal["relative", "absolute"] = "relative",
    center: bool = True,
    features: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Sphere all rows with a transform fitted on the rows selected by ``samples`` (e.g. DMSO).

    ZCA keeps feature names; PCA variants name columns ``PC1..PCd`` (as pycytominer).
    """
    feats, x = feature_matrix(profiles, features)
    sph = fit_spherizer(x[sample_mask(profiles, samples)], method, epsilon, epsilon_mode, center)
    names = feats if method.startswith("ZCA") else [f"PC{i + 1}" for i in range(len(feats))]
    return with_features(profiles, sph.transform(x), names)
