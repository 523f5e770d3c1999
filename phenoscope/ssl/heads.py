"""Projection heads: the DINO/iBOT prototype head and a small MLP projector."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def mlp(in_dim: int, hidden_dim: int, out_dim: int, n_layers: int, batch_norm: bool = False) -> nn.Sequential:
    """``n_layers`` Linear layers with GELU (and optional BatchNorm) between them."""
    dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < n_layers - 1:
            if batch_norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINOv2 head: MLP (in→hidden→hidden→bottleneck), L2 normalisation, weight-normed prototypes.

    ``forward``: (B, in_dim) → (B, n_prototypes) logits. The prototype layer's norm (``g``) is
    fixed at 1, as in dinov2; its parameters are named ``last_layer.*`` (frozen in epoch 1).
    """

    def __init__(
        self, in_dim: int, n_prototypes: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256, n_layers: int = 3
    ) -> None:
        super().__init__()
        self.mlp = mlp(in_dim, hidden_dim, bottleneck_dim, n_layers)
        self.apply(_trunc_normal_init)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, n_prototypes, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-6)
        return self.last_layer(x)


def _trunc_normal_init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
