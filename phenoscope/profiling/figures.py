"""Profiling figures written as PNG (atomically) and gathered into one HTML report.

UMAP coloured by a metadata column, clustered cosine-similarity matrix, low-shot curves,
confusion matrix, and patch-token maps (PCA → RGB, query-token similarity) from token arrays.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from phenoscope.core.io import atomic_path, atomic_write  # noqa: E402
from phenoscope.profiling.metrics import cosine_similarity_matrix  # noqa: E402
from phenoscope.profiling.table import feature_matrix, require_columns  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def plot_umap(profiles: pd.DataFrame, color: str, path: str | Path, seed: int = 0, features: Sequence[str] | None = None) -> Path:
    """2-D UMAP (umap-learn, cosine metric) of the profiles, points coloured by ``color``."""
    import umap

    require_columns(profiles, [color])
    _, x = feature_matrix(profiles, features)
    emb = umap.UMAP(n_neighbors=min(15, len(x) - 1), metric="cosine", random_state=seed).fit_transform(x)
    fig, ax = plt.subplots(figsize=(7, 6))
    for value, rows in profiles.groupby(color, sort=True, dropna=False).indices.items():
        ax.scatter(emb[rows, 0], emb[rows, 1], s=12, label=str(value))
    ax.set(xlabel="UMAP 1", ylabel="UMAP 2", title=f"UMAP coloured by {color}")
    ax.legend(fontsize=6, markerscale=1.5, bbox_to_anchor=(1.01, 1), loc="upper left")
    return _save(fig, path)


def plot_similarity_matrix(profiles: pd.DataFrame, label: str, path: str | Path, features: Sequence[str] | None = None) -> Path:
    """Cosine-similarity matrix with rows/columns reordered by average-linkage clustering."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    require_columns(profiles, [label])
    _, x = feature_matrix(profiles, features)
    sim = cosine_similarity_matrix(x)
    dist = np.clip(1 - sim, 0, 2)
    np.fill_diagonal(dist, 0)
    order = leaves_list(linkage(squareform(dist, checks=False), "average"))
    fig, ax = plt.subplots(figsize=(9, 8))
    im = ax.imshow(sim[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1)
    names = profiles[label].astype(str).to_numpy()[order]
    if len(names) <= 120:
        ax.set_yticks(range(len(names)), names, fontsize=4)
        ax.set_xticks([])
    fig.colorbar(im, ax=ax, label="cosine similarity")
    ax.set_title(f"Clustered cosine similarity ({label})")
    return _save(fig, path)


def plot_low_shot(curve: pd.DataFrame, path: str | Path, metric: str = "macro_f1") -> Path:
    """Low-shot curve (``classify.low_shot_curve`` output): ``metric`` mean ± sd vs label fraction."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for probe, df in curve.groupby("probe"):
        ax.errorbar(df["fraction"] * 100, df[f"{metric}_mean"], yerr=df[f"{metric}_sd"], marker="o", capsize=3, label=probe)
    ax.set(xscale="log", xlabel="% of training labels", ylabel=metric, title="Low-shot evaluation")
    ax.legend()
    return _save(fig, path)


def plot_confusion(y_true: Sequence, y_pred: Sequence, path: str | Path, labels: Sequence | None = None) -> Path:
    """Row-normalised confusion matrix (sklearn) with counts in the cells."""
    from sklearn.metrics import confusion_matrix

    labels = sorted(set(y_true) | set(y_pred)) if labels is None else list(labels)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(0.5 * len(labels) + 3, 0.5 * len(labels) + 2))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i, j in zip(*np.nonzero(cm)):
        ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7, color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), [str(v) for v in labels], rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), [str(v) for v in labels], fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    return _save(fig, path)


def patch_pca_rgb(tokens: np.ndarray) -> np.ndarray:
    """Patch tokens (n_images, h, w, D) → RGB maps (n_images, h, w, 3) in [0, 1].

    The first 3 principal components over all patches of all images, min-max scaled per component.
    """
    if tokens.ndim != 4:
        raise ValueError(f"tokens must have shape (n_images, h, w, D), got {tokens.shape}")
    flat = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)
    flat = flat - flat.mean(axis=0)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    pcs = flat @ vt[:3].T
    pcs = (pcs - pcs.min(axis=0)) / np.maximum(np.ptp(pcs, axis=0), 1e-12)
    return pcs.reshape(*tokens.shape[:3], 3)


def query_similarity_map(tokens: np.ndarray, query: tuple[int, int]) -> np.ndarray:
    """Cosine similarity (h, w) of every patch token of one image (h, w, D) to the token at ``query`` (row, col)."""
    if tokens.ndim != 3:
        raise ValueError(f"tokens must have shape (h, w, D), got {tokens.shape}")
    u = tokens / np.maximum(np.linalg.norm(tokens, axis=-1, keepdims=True), 1e-12)
    return u @ u[query]


def plot_token_maps(tokens: np.ndarray, path: str | Path, query: tuple[int, int] | None = None) -> Path:
    """One column per image: PCA→RGB map and (if ``query``) the query-token similarity map."""
    rgb = patch_pca_rgb(tokens)
    rows = 2 if query is not None else 1
    fig, axes = plt.subplots(rows, len(tokens), figsize=(2.5 * len(tokens), 2.5 * rows), squeeze=False)
    for i in range(len(tokens)):
        axes[0, i].imshow(rgb[i])
        axes[0, i].set_axis_off()
        if query is not None:
            axes[1, i].imshow(query_similarity_map(tokens[i], query), cmap="magma", vmin=-1, vmax=1)
            axes[1, i].plot(query[1], query[0], "c+")
            axes[1, i].set_axis_off()
    return _save(fig, path)


def write_report(pngs: Sequence[str | Path], path: str | Path, title: str = "phenoscope profiling report", tables: dict[str, pd.DataFrame] | None = None) -> Path:
    """HTML page with the given tables and PNGs (linked relative to the report's folder)."""
    path = Path(path)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for name, table in (tables or {}).items():
        parts += [f"<h2>{html.escape(name)}</h2>", table.to_html(index=False, float_format="{:.3f}".format)]
    for png in pngs:
        rel = Path(png).resolve().relative_to(path.parent.resolve()) if Path(png).resolve().is_relative_to(path.parent.resolve()) else Path(png).resolve()
        parts.append(f"<figure><img src='{html.escape(str(rel))}' style='max-width:100%'><figcaption>{html.escape(Path(png).stem)}</figcaption></figure>")
    parts.append("</body></html>")
    with atomic_write(path, "w") as fh:
        fh.write("\n".join(parts))
    return path
