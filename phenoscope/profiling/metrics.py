"""Retrieval and MoA-prediction metrics on profile tables.

* ``retrieval_average_precision`` / ``mean_average_precision`` – copairs' definitions (cosine
  similarity, positive pairs share ``pos_sameby`` and differ in every ``pos_diffby`` column;
  negatives share ``neg_sameby`` and differ in every ``neg_diffby`` column; ties rank positives
  first), with copairs' permutation p-values and BH FDR (``significance``).
* ``replicate_map`` – phenotypic activity: each treatment's replicates retrieved against controls.
* ``nsc_accuracy`` – BBBC021 1-NN MoA accuracy, "not same compound" (NSC), optionally also
  "not same batch" (NSCB).
* ``moa_micro_auprc`` – multi-label MoA micro-AUPRC (LINCS protocol).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from phenoscope.profiling.significance import map_with_p_values
from phenoscope.profiling.table import drop_rows, feature_matrix, require_columns, sample_mask

_BLOCK = 256  # query rows per block of the similarity matrix


def cosine_similarity_matrix(x: np.ndarray) -> np.ndarray:
    """(n, n) cosine similarities of the rows of ``x`` (n, d); zero rows raise ``ValueError``."""
    u = _unit_rows(x)
    return u @ u.T


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (n, d) scaled to unit length; zero or non-finite rows raise ``ValueError``."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any() or not np.isfinite(norms).all():
        raise ValueError("cosine similarity needs finite, non-zero profiles")
    return x / norms


def _codes(meta: pd.DataFrame, sameby: Sequence[str], diffby: Sequence[str]) -> list[tuple[np.ndarray, bool]]:
    """Integer codes of each pair-rule column with its rule (True = must be equal)."""
    if set(sameby) & set(diffby):
        raise ValueError("sameby and diffby must be disjoint")
    if not (sameby or diffby):
        raise ValueError("at least one of sameby/diffby must be given")
    return [(pd.factorize(meta[c])[0], True) for c in sameby] + [(pd.factorize(meta[c])[0], False) for c in diffby]


def _pair_block(codes: list[tuple[np.ndarray, bool]], rows: np.ndarray) -> np.ndarray:
    """(len(rows), n) bool: pairs (row, j), j ≠ row, that satisfy every rule of ``codes``."""
    n = len(codes[0][0])
    mask = np.arange(n)[None, :] != rows[:, None]
    for code, same in codes:
        eq = code[rows, None] == code[None, :]
        mask &= eq if same else ~eq
    return mask


def _pair_mask(meta: pd.DataFrame, sameby: Sequence[str], diffby: Sequence[str]) -> np.ndarray:
    """(n, n) bool: rows i≠j equal on every ``sameby`` column and different on every ``diffby`` one."""
    return _pair_block(_codes(meta, sameby, diffby), np.arange(len(meta)))


def _block_ap(sim: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AP (rows,) of ranked lists ordered by ``1 - sim``, positives first on ties; NaN without positives."""
    key = np.where(pos | neg, 1.0 - sim, np.inf)
    order = np.lexsort((~pos, key), axis=-1)
    rel = np.take_along_axis(pos, order, axis=1)
    rank = np.cumsum(np.take_along_axis(pos | neg, order, axis=1), axis=1)
    hits = np.cumsum(rel, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rel, hits / np.maximum(rank, 1), 0.0).sum(axis=1) / pos.sum(axis=1)


def retrieval_average_precision(
    profiles: pd.DataFrame,
    pos_sameby: Sequence[str],
    pos_diffby: Sequence[str] = (),
    neg_sameby: Sequence[str] = (),
    neg_diffby: Sequence[str] = (),
    features: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Per-profile retrieval AP, as ``copairs.map.average_precision`` (cosine similarity).

    Each profile queries all others, ranked by similarity; positives and negatives follow the
    pair rules. Rows are processed in blocks, so memory grows as n·block, not n², and only the
    similarities of ranked pairs are computed.
    Returns the metadata columns used plus ``average_precision`` (NaN without positive pairs),
    ``n_pos_pairs`` and ``n_total_pairs``.
    """
    cols = list(dict.fromkeys([*pos_sameby, *pos_diffby, *neg_sameby, *neg_diffby]))
    require_columns(profiles, cols)
    _, x = feature_matrix(profiles, features)
    u = _unit_rows(x)
    meta = profiles[cols].reset_index(drop=True)
    pos_codes, neg_codes = _codes(meta, pos_sameby, pos_diffby), _codes(meta, neg_sameby, neg_diffby)
    ap, n_pos, n_neg = np.full(len(meta), np.nan), np.zeros(len(meta), np.int64), np.zeros(len(meta), np.int64)
    for start in range(0, len(meta), _BLOCK):
        rows = np.arange(start, min(start + _BLOCK, len(meta)))
        pos, neg = _pair_block(pos_codes, rows), _pair_block(neg_codes, rows)
        n_pos[rows], n_neg[rows] = pos.sum(axis=1), neg.sum(axis=1)
        ranked = np.flatnonzero((pos | neg).any(axis=0))  # only ranked profiles need similarities
        ap[rows] = _block_ap(u[rows] @ u[ranked].T, pos[:, ranked], neg[:, ranked])
    out = meta.copy()
    out["average_precision"] = np.where(n_pos > 0, ap, np.nan)
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
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """mAP per group (default ``pos_sameby``) with copairs' permutation p-values.

    E.g. replicate retrieval: ``pos_sameby=["Metadata_Compound"], neg_diffby=["Metadata_Compound"]``;
    MoA retrieval on treatment profiles: ``pos_sameby=["Metadata_MoA"], pos_diffby=["Metadata_Compound"],
    neg_diffby=["Metadata_MoA"]``. Columns: see ``significance.map_with_p_values``.
    """
    ap = retrieval_average_precision(profiles, pos_sameby, pos_diffby, neg_sameby, neg_diffby, features)
    return map_with_p_values(ap, list(groupby or pos_sameby), null_size, threshold, seed)


REFERENCE = "Metadata_reference_index"


def with_reference_index(profiles: pd.DataFrame, controls: str) -> pd.DataFrame:
    """Add ``Metadata_reference_index``: the row number for control rows, -1 for the others.

    With it, copairs' phenotypic-activity pair rules retrieve a treatment's replicates against
    the controls only (see ``replicate_map``).
    """
    is_control = sample_mask(profiles, controls)
    return profiles.assign(**{REFERENCE: np.where(is_control, np.arange(len(profiles)), -1)})


def replicate_map(
    profiles: pd.DataFrame,
    treatment: Sequence[str],
    controls: str,
    features: Sequence[str] | None = None,
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """Phenotypic activity (copairs): per treatment, mAP of retrieving its replicates among the controls.

    Positives: other rows of the same ``treatment``; negatives: the rows matching ``controls``.
    Controls are not queries. One row per treatment with ≥ 2 replicates (see ``mean_average_precision``).
    """
    keys = [*treatment, REFERENCE]
    table = with_reference_index(profiles, controls)
    return mean_average_precision(table, keys, [], [], keys, list(treatment), features, null_size, threshold, seed)


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
    table = drop_rows(profiles, exclude)
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
    table = drop_rows(profiles, exclude)
    y = MultiLabelBinarizer().fit_transform(table[label].astype(str).str.split(sep, regex=False))
    _, x = feature_matrix(table, features)
    sim = np.where(_pair_mask(table, [], [compound]), cosine_similarity_matrix(x), -np.inf)
    scores = np.stack([np.where(y[None, :, m] > 0, sim, -np.inf).max(axis=1) for m in range(y.shape[1])], axis=1)
    scores = np.where(np.isfinite(scores), scores, -2.0)  # MoA with no other-compound member: lowest score
    return float(average_precision_score(y, scores, average="micro"))
