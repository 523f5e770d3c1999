"""Backbone checkpoints: import DINOv2 / Cell-DINO weights; save/load our own (self-describing, strict).

The dinov2 format (``torch.save`` of a state dict) may be wrapped in ``{"teacher": ...}``,
carry ``module.`` (DDP) and ``backbone.`` prefixes, head weights (``dino_head.``,
``ibot_head.``), chunked blocks ``blocks.<chunk>.<index>.`` (FSDP block chunks; the index
is global), a class-token slot in ``pos_embed`` and ``register_tokens``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch

from phenoscope.config import from_dict, to_dict
from phenoscope.core.checkpoint import Preprocessing, read_checkpoint, read_weights, save_checkpoint
from phenoscope.core.state import load_state_strict
from phenoscope.nn.cnn import CellCNN, CNNConfig
from phenoscope.ssl.backbone import ARCHS, CellViT, ViTConfig

_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
_HEAD_PREFIXES = ("dino_head.", "ibot_head.", "head.")
KIND = "vit"
CNN_KIND = "cnn"
# checkpoint kind → (network class, its config dataclass)
_BACKBONES: dict[str, tuple[type, type]] = {KIND: (CellViT, ViTConfig), CNN_KIND: (CellCNN, CNNConfig)}


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
    state = read_weights(source) if isinstance(source, (str, Path)) else source
    sd = convert_dinov2_state_dict(state)
    ckpt_chans = sd["patch_embed.proj.weight"].shape[1]
    if in_chans is not None and in_chans != ckpt_chans:
        if ckpt_chans != 3:
            raise ValueError(f"channel expansion needs a 3-channel checkpoint, this one has {ckpt_chans}")
        sd = expand_input_channels(sd, in_chans)
    model = CellViT(infer_vit_config(sd, **overrides))
    load_state_strict(model, sd, "dinov2 checkpoint")
    return model


def save_backbone(
    model: CellViT | CellCNN, path: str | Path, preprocessing: Preprocessing | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Save a backbone as a self-describing checkpoint (kind ``vit`` or ``cnn``: its config, the
    preprocessing of its training inputs and provenance; :mod:`phenoscope.core.checkpoint`), atomically."""
    kind = next(k for k, (cls, _) in _BACKBONES.items() if isinstance(model, cls))
    return save_checkpoint(path, model.state_dict(), kind, to_dict(model.cfg), preprocessing, provenance)


def load_backbone_checkpoint(path: str | Path) -> tuple[CellViT | CellCNN, Preprocessing]:
    """A backbone written by :func:`save_backbone` (or its earlier form) and the preprocessing it records."""
    ckpt = read_checkpoint(path)
    if ckpt.kind not in _BACKBONES:
        raise ValueError(f"{path}: a {ckpt.kind!r} checkpoint, not an SSL backbone ({' or '.join(map(repr, _BACKBONES))})")
    model = random_like(ckpt.kind, ckpt.config, str(path))
    load_state_strict(model, ckpt.state, str(path))
    return model, ckpt.preprocessing


def random_like(kind: str, config: Mapping[str, Any], where: str = "config") -> CellViT | CellCNN:
    """A randomly initialised backbone of checkpoint kind ``kind`` (``vit`` / ``cnn``) and ``config``."""
    cls, config_cls = _BACKBONES[kind]
    return cls(from_dict(config_cls, dict(config), f"{where}: config"))


def load_backbone(path: str | Path) -> CellViT | CellCNN:
    """The backbone of :func:`load_backbone_checkpoint`."""
    return load_backbone_checkpoint(path)[0]
