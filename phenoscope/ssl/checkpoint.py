"""Checkpoints: import DINOv2 / Cell-DINO weights, strict loading, safetensors I/O.

The dinov2 format (``torch.save`` of a state dict) may be wrapped in ``{"teacher": ...}``,
carry ``module.`` (DDP) and ``backbone.`` prefixes, head weights (``dino_head.``,
``ibot_head.``), chunked blocks ``blocks.<chunk>.<index>.`` (FSDP block chunks; the index
is global), a class-token slot in ``pos_embed`` and ``register_tokens``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from phenoscope.config import from_dict, to_dict
from phenoscope.core.io import atomic_path
from phenoscope.core.state import load_state_strict
from phenoscope.ssl.backbone import ARCHS, CellViT, ViTConfig

_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
_HEAD_PREFIXES = ("dino_head.", "ibot_head.", "head.")


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}


def convert_dinov2_state_dict(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """dinov2-format backbone weights → ``CellViT`` state dict (heads dropped)."""
    if "teacher" in state and isinstance(state["teacher"], Mapping):
        state = state["teacher"]
    sd = _strip(_strip(dict(state), "module."), "backbone.")
    sd = {k: v for k, v in sd.items() if not k.startswith(_HEAD_PREFIXES)}
    if any(".w12." in k for k in sd):
        raise ValueError("SwiGLU feed-forward blocks (ViT-g) are not supported; use an MLP-FFN checkpoint")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        key = _CHUNKED.sub(r"blocks.\2.", key)
        out["reg_token" if key == "register_tokens" else key] = value
    if "pos_embed" not in out or "cls_token" not in out:
        raise ValueError("checkpoint has no pos_embed/cls_token: not a dinov2 ViT backbone")
    pos = out["pos_embed"]
    out["cls_token"] = out["cls_token"] + pos[:, :1]
    out["pos_embed"] = pos[:, 1:]
    return out


def infer_vit_config(state: Mapping[str, torch.Tensor], **overrides: Any) -> ViTConfig:
    """Infer a ``ViTConfig`` from a converted state dict (head count assumes 64-dim heads)."""
    weight = state["patch_embed.proj.weight"]
    dim, in_chans, patch = weight.shape[0], weight.shape[1], weight.shape[2]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    grid = int(round(state["pos_embed"].shape[1] ** 0.5))
    arch = next((name for name, (d, _, _) in ARCHS.items() if d == dim), "vit_small")
    kw: dict[str, Any] = dict(
        arch=arch,
        in_chans=in_chans,
        patch_size=patch,
        img_size=grid * patch,
        num_registers=state["reg_token"].shape[1] if "reg_token" in state else 0,
        init_values=1.0 if "blocks.0.ls1.gamma" in state else None,
        embed_dim=dim,
        depth=depth,
        num_heads=dim // 64,
    )
    kw.update(overrides)
    return ViTConfig(**kw)


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """Read a ``.safetensors`` or a ``torch.save`` file safely (``weights_only=True``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def expand_input_channels(state: dict[str, torch.Tensor], in_chans: int) -> dict[str, torch.Tensor]:
    """Channel expansion ("Cell-DINO+"): 3-channel patch embedding → ``in_chans`` channels.

    Every new channel gets the mean RGB filter scaled by ``3 / in_chans``, so an image with
    identical channels gives the same patch embedding as the RGB model on a gray image.
    """
    w = state["patch_embed.proj.weight"]
    out = dict(state)
    out["patch_embed.proj.weight"] = w.mean(dim=1, keepdim=True).repeat(1, in_chans, 1, 1) * (w.shape[1] / in_chans)
    return out


def load_dinov2_backbone(source: str | Path | Mapping[str, Any], in_chans: int | None = None, **overrides: Any) -> CellViT:
    """Build a ``CellViT`` from a dinov2 / Cell-DINO checkpoint (path or state dict).

    ``in_chans`` different from the checkpoint's triggers channel expansion (3 → N).
    ``overrides`` go to ``ViTConfig`` (e.g. ``num_heads``, ``drop_path_rate``).
    """
    state = read_state_dict(source) if isinstance(source, (str, Path)) else source
    sd = convert_dinov2_state_dict(state)
    ckpt_chans = sd["patch_embed.proj.weight"].shape[1]
    if in_chans is not None and in_chans != ckpt_chans:
        if ckpt_chans != 3:
            raise ValueError(f"channel expansion needs a 3-channel checkpoint, this one has {ckpt_chans}")
        sd = expand_input_channels(sd, in_chans)
    model = CellViT(infer_vit_config(sd, **overrides))
    load_state_strict(model, sd, "dinov2 checkpoint")
    return model


def save_backbone(model: CellViT, path: str | Path) -> None:
    """Save weights and ``ViTConfig`` (as metadata) to a safetensors file, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"vit_config": json.dumps(to_dict(model.cfg))})


def load_backbone(path: str | Path) -> CellViT:
    """Load a backbone written by ``save_backbone``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "vit_config" not in meta:
        raise ValueError(f"{path}: no vit_config metadata; not written by save_backbone")
    model = CellViT(from_dict(ViTConfig, json.loads(meta["vit_config"])))
    load_state_strict(model, load_file(str(path)), str(path))
    return model
