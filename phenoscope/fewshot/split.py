"""The cross-domain few-shot benchmark split: a labelled source domain, and a target domain cut into a
fixed test set, a validation set (for choices) and a training pool with nested labelled fractions.

Built from an ``index.csv``-style table alone (image id and a domain column), so it can be recomputed
from the training data; the DSB split (source: fluorescence, target: colour H&E / bright-field) is
committed under ``configs/fewshot/dsb_he/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["FewShotSplit", "cross_domain_split", "labelled_subset", "target_split", "write_split"]


@dataclass(frozen=True)
class FewShotSplit:
    """Image ids of each part (sorted); ``labelled[(fraction, seed)]`` are the labelled target-pool ids."""

    source: tuple[str, ...]
    target_test: tuple[str, ...]
    target_val: tuple[str, ...]
    target_pool: tuple[str, ...]
    labelled: dict[tuple[float, int], tuple[str, ...]] = field(default_factory=dict)


def labelled_subset(pool: tuple[str, ...], fraction: float, seed: int) -> tuple[str, ...]:
    """The first ``ceil(fraction · n)`` ids of the pool in the order of a seeded permutation (sorted), so the
    subsets of one seed are nested as the fraction grows. ``ValueError`` if it selects nothing."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    k = int(np.ceil(fraction * len(pool) - 1e-9))
    if k == 0:
        raise ValueError(f"label fraction {fraction} of a pool of {len(pool)} images selects no image")
    order = np.random.default_rng(seed).permutation(len(pool))
    return tuple(sorted(pool[i] for i in order[:k]))


def cross_domain_split(index: pd.DataFrame, source: str, target: str, domain_column: str = "modality_heuristic",
                       id_column: str = "image_id", n_test: int = 30, n_val: int = 12,
                       fractions: tuple[float, ...] = (0.05, 0.1, 0.2, 1.0), seeds: tuple[int, ...] = (0, 1, 2),
                       split_seed: int = 0) -> FewShotSplit:
    """Source = every image of domain ``source``; the ``target`` images are permuted (``split_seed``) into
    ``n_test`` test, ``n_val`` validation and the rest, the pool. Raises ``ValueError`` naming a domain with
    no images or a target too small for its parts."""
    for name in (domain_column, id_column):
        if name not in index:
            raise ValueError(f"the index has no {name!r} column (columns: {', '.join(index.columns)})")
    ids = {d: tuple(sorted(index.loc[index[domain_column] == d, id_column].astype(str))) for d in (source, target)}
    for d, found in ids.items():
        if not found:
            raise ValueError(f"no images of domain {d!r} in the index (domains: {sorted(index[domain_column].unique())})")
    return target_split(ids[target], n_test, n_val, fractions, seeds, split_seed, source=ids[source], name=f"domain {target!r}")


def target_split(target: tuple[str, ...], n_test: int = 30, n_val: int = 12, fractions: tuple[float, ...] = (0.05, 0.1, 0.2, 1.0),
                 seeds: tuple[int, ...] = (0, 1, 2), split_seed: int = 0, source: tuple[str, ...] = (),
                 name: str = "the target") -> FewShotSplit:
    """Permute the ``target`` ids (``split_seed``) into ``n_test`` test, ``n_val`` validation and the rest, the
    pool, with its labelled subsets; ``ValueError`` if there are too few for the parts."""
    target = tuple(sorted(target))
    if len(target) < n_test + n_val + 1:
        raise ValueError(f"{name} has {len(target)} images: too few for {n_test} test + {n_val} validation + a pool")
    order = [target[i] for i in np.random.default_rng(split_seed).permutation(len(target))]
    test, val, pool = (tuple(sorted(part)) for part in (order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]))
    labelled = {(f, s): labelled_subset(pool, f, s) for f in fractions for s in seeds}
    return FewShotSplit(tuple(sorted(source)), test, val, pool, labelled)


def write_split(split: FewShotSplit, folder: str | Path) -> list[Path]:
    """One id per line: ``source.txt``, ``target_test.txt``, ``target_val.txt``, ``target_pool.txt`` and
    ``labelled_<percent>pc_seed<seed>.txt``; returns the paths."""
    from phenoscope.core.io import atomic_write

    folder = Path(folder)
    parts = {"source": split.source, "target_test": split.target_test, "target_val": split.target_val,
             "target_pool": split.target_pool}
    parts.update({f"labelled_{round(100 * f)}pc_seed{s}": ids for (f, s), ids in split.labelled.items()})
    paths = []
    for name, ids in parts.items():
        path = folder / f"{name}.txt"
        with atomic_write(path, "w") as fh:
            fh.write("".join(f"{i}\n" for i in ids))
        paths.append(path)
    return paths
