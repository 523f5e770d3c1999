"""The AMT² schedule of CUPre: K rounds of (a) self-supervised learning of the backbone on unlabelled
target images and (b) supervised segmentation of the whole model on the labelled source domain, the
backbone under L2-SP towards the weights (a) left; then (c) fine-tuning on the labelled target subset,
under L2-SP towards the pretrained backbone for CUPre++ and with plain weight decay for CUPre.

A model is split into a *backbone* (trained by every phase), a *neck* and a *head*; for the Cellpose-SAM
network the backbone is the ViT (``encoder.*`` but the neck), the neck SAM's neck (``encoder.neck.*``,
which self-supervision trains too, being the encoder's output) and the head the read-out (``out``,
``refine``, ``size``, ``classify``). The grid (:mod:`phenoscope.fewshot.grid`) runs an ``ssl`` phase with
``pretrain`` on the encoder alone and the others with ``train_segmentation`` on the whole network, its
``l2sp_strength`` set where ``Phase.l2sp`` is (:func:`phenoscope.segment.training.run.anchored_backbone`).
"""

from __future__ import annotations

from dataclasses import dataclass

from phenoscope.segment.net import is_backbone

__all__ = ["Phase", "amt2_schedule", "is_backbone"]


@dataclass(frozen=True)
class Phase:
    """One training phase and whether the backbone is held by L2-SP (anchored at its weights when the phase
    starts). ``kind`` says what trains on what: ``ssl`` the encoder (backbone + neck) on the unlabelled target
    images, ``source`` the whole model on the labelled source domain, ``finetune`` the whole model on the
    labelled target subset."""

    name: str
    kind: str  # ssl | source | finetune
    l2sp: bool


def amt2_schedule(rounds: int, plus: bool = False) -> list[Phase]:
    """The phases of CUPre (``plus``: CUPre++) with ``rounds`` ≥ 1 AMT² rounds."""
    if rounds < 1:
        raise ValueError(f"AMT² needs at least one round, got {rounds}")
    phases = []
    for k in range(1, rounds + 1):
        phases.append(Phase(f"ssl-{k}", "ssl", False))
        phases.append(Phase(f"source-{k}", "source", True))
    phases.append(Phase("finetune", "finetune", plus))
    return phases

