"""Profiling figures written as PNG (atomically) and gathered into one HTML report.

UMAP coloured by a metadata column, clustered cosine-similarity matrix and confusion matrix.
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


def save_png(fig: plt.Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (120 dpi) atomically and close it; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def palette(n: int) -> list[tuple[tuple[float, float, float, float], str]]:
    """``n`` distinct (colour, marker) styles: 20 colours (tab10, then tab20's light shades, which
    also change the marker so a light shade is not read as its dark twin), then the colours again
    with further markers."""
    tab20 = plt.get_cmap("tab20").colors
    colours = [*tab20[0::2], *tab20[1::2]]
    return [((*colours[i % len(colours)], 1.0), MARKERS[(i // 10) % len(MARKERS)]) for i in range(n)]


def plot_umap(profiles: pd.DataFrame, color: str, path: str | Path, seed: int = 0, features: Sequence[str] | None = None) -> Path:
    """2-D UMAP (umap-learn, cosine metric) of the profiles, points styled by ``color`` (see ``palette``)."""
    import umap

    require_columns(profiles, [color])
    _, x = feature_matrix(profiles, features)
    emb = umap.UMAP(n_neighbors=min(15, len(x) - 1), metric="cosine", random_state=seed).fit_transform(x)
    groups = profiles.groupby(color, sort=True, dropna=False).indices
    fig, ax = plt.subplots(figsize=(7, 6))
    for (value, rows), (colour, marker) in zip(groups.items(), palette(len(groups))):
        ax.scatter(emb[rows, 0], emb[rows, 1], s=18, color=colour, marker=marker, label=str(value), edgecolors="none")
    ax.set(xlabel="UMAP 1", ylabel="UMAP 2", title=f"UMAP coloured by {color}")
    ax.legend(fontsize=7, markerscale=1.3, bbox_to_anchor=(1.01, 1), loc="upper left")
    return save_png(fig, path)


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
    return save_png(fig, path)


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
    return save_png(fig, path)


REPORT_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}"
    "th{background:#f0f0f0}figure{margin:1em 0}figcaption{color:#555;font-size:13px}"
)


def write_report(pngs: Sequence[str | Path], path: str | Path, title: str = "phenoscope profiling report", tables: dict[str, pd.DataFrame] | None = None) -> Path:
    """HTML page with the given tables (in order) and PNGs (linked relative to the report's folder)."""
    path = Path(path)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{REPORT_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for name, table in (tables or {}).items():
        parts += [f"<h2>{html.escape(name)}</h2>", table.to_html(index=False, float_format="{:.3f}".format)]
    for png in pngs:
        rel = Path(png).resolve().relative_to(path.parent.resolve()) if Path(png).resolve().is_relative_to(path.parent.resolve()) else Path(png).resolve()
        parts.append(f"<figure><img src='{html.escape(str(rel))}' style='max-width:100%'><figcaption>{html.escape(Path(png).stem)}</figcaption></figure>")
    parts.append("</body></html>")
    with atomic_write(path, "w") as fh:
        fh.write("\n".join(parts))
    return path
