"""L2-SP (Li et al. 2018, as CUPre uses it): pull anchored weights towards a starting point instead of
towards zero, Ω(w) = λ · (α ‖w − w⁰‖² + (1 − α) ‖w‖²), and keep plain weight decay off them.

The anchor w⁰ is a snapshot taken when the regulariser is built (in AMT², the backbone weights left by
the self-supervised phase; in CUPre++'s fine-tuning, the pretrained weights).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from phenoscope.train.optim import param_groups

__all__ = ["L2SP", "l2sp_param_groups", "with_penalty"]


class L2SP:
    """Ω over the given parameters, anchored at their current values (no learnable state: not a Module).

    ``alpha`` ∈ [0, 1] weighs the pull to the anchor against the pull to zero; ``strength`` is λ.
    """

    def __init__(self, named: Iterable[tuple[str, nn.Parameter]], alpha: float = 0.5, strength: float = 1e-4) -> None:
        if not 0 <= alpha <= 1:
            raise ValueError(f"L2-SP alpha must be in [0, 1], got {alpha}")
        if strength < 0:
            raise ValueError(f"L2-SP strength must be ≥ 0, got {strength}")
        self.params = {name: p for name, p in named if p.requires_grad}
        if not self.params:
            raise ValueError("L2-SP needs at least one trainable parameter to anchor")
        self.anchors = {name: p.detach().clone() for name, p in self.params.items()}
        self.alpha, self.strength = alpha, strength

    @property
    def names(self) -> set[str]:
        """Names of the anchored parameters."""
        return set(self.params)

    def penalty(self) -> torch.Tensor:
        """Ω (a scalar tensor in the parameters' graph)."""
        total = torch.zeros((), device=next(iter(self.params.values())).device)
        for name, p in self.params.items():
            if self.anchors[name].device != p.device:  # the loop moved the model
                self.anchors[name] = self.anchors[name].to(p.device)
            total = total + self.alpha * (p - self.anchors[name]).pow(2).sum() + (1 - self.alpha) * p.pow(2).sum()
        return self.strength * total


def with_penalty(out: dict[str, torch.Tensor], reg: L2SP | None) -> dict[str, torch.Tensor]:
    """An objective's outputs with Ω added to ``loss`` and logged as ``l2sp`` (unchanged when ``reg`` is None)."""
    if reg is None:
        return out
    penalty = reg.penalty()
    return {**out, "loss": out["loss"] + penalty, "l2sp": penalty.detach()}


def l2sp_param_groups(named: Iterable[tuple[str, nn.Parameter]], anchored: set[str], **kwargs) -> list[dict]:
    """:func:`phenoscope.train.optim.param_groups` (``kwargs``) for the parameters not in ``anchored`` (plain
    weight decay as usual), plus one group of the anchored ones with ``wd_mult`` 0: L2-SP replaces it."""
    named = list(named)
    groups = param_groups([(n, p) for n, p in named if n not in anchored], **kwargs)
    reg = [(n, p) for n, p in named if n in anchored and p.requires_grad]
    if reg:
        groups.append({"params": [p for _, p in reg], "names": [n for n, _ in reg], "lr_mult": 1.0, "wd_mult": 0.0,
                       "is_last_layer": False})
    return groups
