"""Self-supervised pretraining for cell images (Cell-DINO / DINOv2, SimCLR, MoCo v2/v3, MAE, BYOL; one module per
method, registered in :mod:`phenoscope.ssl.registry`) and embeddings of images and single cells.

The names below import torch and timm on first use, so ``import phenoscope.ssl`` stays light.
"""

from importlib import import_module

_NAMES = {
    "BagOfChannels": "backbone",
    "CellViT": "backbone",
    "ViTConfig": "backbone",
    "EmbedConfig": "embed",
    "embed_images": "embed",
    "load_embedder": "embed",
    "PretrainConfig": "pretrain",
    "get_method": "registry",
    "methods": "registry",
    "load_backbone": "checkpoint",
    "load_dinov2_backbone": "checkpoint",
    "save_backbone": "checkpoint",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(import_module(f"phenoscope.ssl.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'phenoscope.ssl' has no attribute {name!r}")
