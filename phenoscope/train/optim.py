"""Parameter groups: no weight decay on biases/norms/layer-scale, layer-wise LR decay for ViTs."""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

_NO_WD = ("bias", "norm", "gamma", "cls_token", "reg_token", "pos_embed", "mask_token")


def vit_layer_id(name: str, depth: int) -> int:
    """dinov2 layer id inside a ViT: embeddings/tokens 0, block i → i+1, everything else depth+1."""
    if re.search(r"(^|\.)(pos_embed|patch_embed|mask_token|cls_token|reg_token)", name):
        return 0
    m = re.search(r"(^|\.)blocks\.(\d+)\.", name)
    return int(m.group(2)) + 1 if m else depth + 1


def param_groups(
    named: Iterable[tuple[str, nn.Parameter]],
    vit_depth: int = 0,
    layer_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    vit_prefix: str = "",
) -> list[dict]:
    """Optimiser groups (parameters sharing multipliers) with ``lr_mult``, ``wd_mult`` and ``is_last_layer`` flags.

    Parameters whose names start with ``vit_prefix`` (a ViT of ``vit_depth`` blocks) get the
    layer-wise LR decay ``layer_decay ** (depth + 1 - layer_id)``; ``patch_embed`` gets an extra
    ``patch_embed_lr_mult``. Frozen parameters are skipped. The loop turns the multipliers into
    per-step ``lr`` / ``weight_decay``.
    """
    groups: dict[tuple[float, float, bool], dict] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        lr_mult = 1.0
        if vit_depth and name.startswith(vit_prefix):
            local = name[len(vit_prefix) :]
            lr_mult = layer_decay ** (vit_depth + 1 - vit_layer_id(local, vit_depth))
            if "patch_embed" in local:
                lr_mult *= patch_embed_lr_mult
        no_wd = p.ndim == 1 or any(key in name for key in _NO_WD)
        key = (lr_mult, 0.0 if no_wd else 1.0, "last_layer" in name)
        group = groups.setdefault(key, {"params": [], "names": [], "lr_mult": key[0], "wd_mult": key[1], "is_last_layer": key[2]})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())
