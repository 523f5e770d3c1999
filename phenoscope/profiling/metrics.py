"""Retrieval and MoA-prediction metrics on profile tables.

* ``average_precision`` / ``mean_average_precision`` – copairs' definitions (cosine similarity,
  positive pairs share ``pos_sameby`` and differ in every ``pos_diffby`` column; negatives share
  ``neg_sameby`` and differ in every ``neg_diffby`` column; ties rank positives first).
* ``nsc_accuracy`` – BBBC021 1-NN MoA accuracy, "not same compound" (NSC), optionally also
  "not same batch" (NSCB).
* ``moa_micro_auprc`` – multi-label MoA micro-AUPRC (LINCS protocol).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from phenoscope.profiling.table import feature_matrix, require_columns


def cosine_similarity_matrix(x: np.ndarray) -> np.ndarray:
    """(n, n) cosine similarities of the rows of ``x`` (n, d); zero rows raise ``ValueError``."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any() or not np.isfinite(norms).all():
        raise ValueError("cosine similarity needs finite, non-zero profiles")
    u = x / norms
    return u @ u.T


def _pair_mask(meta: pd.DataFrame, sameby: Sequence[str], diffby: Sequence[str]) -> np.ndarray:
    """(n, n) bool: rows i≠j equal on every ``sameby`` column and different on every ``diffby`` one."""
    if set(sameby) & set(diffby):
        raise ValueError("sameby and diffby must be disjoint")
    if not (sameby or diffby):
        raise ValueError("at least one of sameby/diffby must be given")
    n = len(meta)
    mask = ~np.eye(n, dtype=bool)
    for col, same in [(c, True) for c in sameby] + [(c, False) for c in diffby]:
        codes = pd.factorize(meta[col])[0]
        eq = codes[:, None] == codes[None, :]
        mask &= eq if same else ~eq
    return mask


def _ap_row(pos: np.ndarray, neg: np.ndarray) -> float:
    """AP of one ranked list (copairs ordering: by 1 - similarity, positives first on ties)."""
    kp = np.sort(1.0 - pos)
    neg_before = np.searchsorted(np.sort(1.0 - neg), kp, side="left")
    hits = np.arange(1, kp.size + 1)
    return float(np.mean(hits / (hits + neg_before)))


def average_precision(
    profiles: pd.DataFrame,
    pos_sameby: Sequence[str],
    pos_diffby: Sequence[str] = (),
    neg_sameby: Sequence[str] = (),
    neg_diffby: Sequence[str] = (),
    features: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Per-profile AP, as ``copairs.map.average_precision`` (cosine; dense n×n, fine to ~10⁴ rows).

    Returns the metadata columns used plus ``average_precision`` (NaN without positive pairs),
    ``n_pos_pairs`` and ``n_total_pairs``.
    """
    cols = list(dict.fromkeys([*pos_sameby, *pos_diffby, *neg_sameby, *neg_diffby]))
    require_columns(profiles, cols)
    _, x = feature_matrix(profiles, features)
    meta = profiles[cols].reset_index(drop=True)
    sim = cosine_similarity_matrix(x)
    pos = _pair_mask(meta, pos_sameby, pos_diffby)
    neg = _pair_mask(meta, neg_sameby, neg_diffby)
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    ap = np.array([_ap_row(sim[i, pos[i]], sim[i, neg[i]]) if n_pos[i] else np.nan for i in range(len(meta))])
    out = meta.copy()
    out["average_precision"] = ap
    out["n_pos_pairs"] = n_pos
    out["n_total_pairs"] = n_pos + n_neg
    return out


def mean_average_precision(
    profiles: pd.DataFrame,
    pos_sameby: Sequence[str],
    pos_diffby: Sequence[str] = (),
    neg_sameby: Sequence[str] = (),
    neg_diffby: Sequence[str] = (),
    groupby: Sequence[str] | None = None,
    features: Sequence[str] | None = None,
) -> pd.DataFrame:
    """mAP per group (default ``pos_sameby``): mean of the profiles' AP, NaN APs skipped.

    E.g. replicate retrieval: ``pos_sameby=["Metadata_Compound"], neg_diffby=["Metadata_Compound"]``;
    MoA retrieval on treatment profiles: ``pos_sameby=["Metadata_MoA"], pos_diffby=["Metadata_Compound"],
    neg_diffby=["Metadata_MoA"]``. (copairs' permutation p-values are not computed.)
    """
    ap = average_precision(profiles, pos_sameby, pos_diffby, neg_sameby, neg_diffby, features)
    keys = list(groupby or pos_sameby)
    ap = ap[ap["n_pos_pairs"] > 0]
    return ap.groupby(keys, sort=True)["average_precision"].mean().rename("mean_average_precision").reset_index()


def nsc_predictions(
    profiles: pd.DataFrame,
    label: str = "Metadata_MoA",
    compound: str = "Metadata_Compound",
    batch: str | None = None,
    exclude: str | None = "Metadata_Compound == 'DMSO'",
    features: Sequence[str] | None = None,
) -> pd.DataFrame:
    """1-NN (cosine) label of each profile among profiles of *other* compounds (and other batches).

    Rows matching ``exclude`` (controls) are neither queries nor neighbours. With ``batch``, a
    query is scored only if some allowed neighbour shares its label (MoAs confined to one batch
    cannot be predicted; Ando et al. 2017 likewise drop them). Returns one row per scored query:
    ``query``/``neighbour`` index, ``label``, ``predicted``, ``correct``, ``similarity``.
    """
    require_columns(profiles, [label, compound] + ([batch] if batch else []))
    keep = ~profiles.eval(exclude).to_numpy(dtype=bool) if exclude else np.ones(len(profiles), bool)
    table = profiles.loc[keep]
    if table[label].isna().any():
        raise ValueError(f"{int(table[label].isna().sum())} profile(s) have no {label}")
    _, x = feature_matrix(table, features)
    sim = cosine_similarity_matrix(x)
    blocked = _pair_mask(table, [], [compound])
    allowed = blocked if batch is None else blocked & _pair_mask(table, [], [batch])
    labels = table[label].to_numpy()
    possible = (allowed & (labels[:, None] == labels[None, :])).any(axis=1)
    sim = np.where(allowed, sim, -np.inf)
    nn = sim.argmax(axis=1)
    rows = np.nonzero(possible)[0]
    return pd.DataFrame(
        {
            "query": table.index[rows],
            "neighbour": table.index[nn[rows]],
            "label": labels[rows],
            "predicted": labels[nn[rows]],
            "correct": labels[rows] == labels[nn[rows]],
            "similarity": sim[rows, nn[rows]],
        }
    )


def nsc_accuracy(
    profiles: pd.DataFrame,
    label: str = "Metadata_MoA",
    compound: str = "Metadata_Compound",
    batch: str | None = None,
    exclude: str | None = "Metadata_Compound == 'DMSO'",
    features: Sequence[str] | None = None,
) -> float:
    """NSC (``batch=None``) or NSCB 1-NN accuracy on treatment-level profiles; see ``nsc_predictions``."""
    pred = nsc_predictions(profiles, label, compound, batch, exclude, features)
    if pred.empty:
        raise ValueError("no scorable queries (every label is confined to one compound/batch)")
    return float(pred["correct"].mean())


def moa_micro_auprc(
    profiles: pd.DataFrame,
    label: str = "Metadata_MoA",
    compound: str = "Metadata_Compound",
    sep: str = "|",
    exclude: str | None = "Metadata_Compound == 'DMSO'",
    features: Sequence[str] | None = None,
) -> float:
    """Multi-label MoA micro-AUPRC (LINCS protocol).

    Labels are ``sep``-joined MoA sets. The score of (profile i, MoA m) is the highest cosine
    similarity between i and any profile of another compound annotated with m; micro-averaged
    average precision over all (profile, MoA) pairs (sklearn).
    """
    from sklearn.metrics import average_precision_score
    from sklearn.preprocessing import MultiLabelBinarizer

    require_columns(profiles, [label, compound])
    keep = ~profiles.eval(exclude).to_numpy(dtype=bool) if exclude else np.ones(len(profiles), bool)
    table = profiles.loc[keep]
    y = MultiLabelBinarizer().fit_transform(table[label].astype(str).str.split(sep, regex=False))
    _, x = feature_matrix(table, features)
    sim = np.where(_pair_mask(table, [], [compound]), cosine_similarity_matrix(x), -np.inf)
    scores = np.stack([np.where(y[None, :, m] > 0, sim, -np.inf).max(axis=1) for m in range(y.shape[1])], axis=1)
    scores = np.where(np.isfinite(scores), scores, -2.0)  # MoA with no other-compound member: lowest score
    return float(average_precision_score(y, scores, average="micro"))
