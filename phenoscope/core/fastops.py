"""Inference-time kernels shared by our networks (CPU fast paths that stay exact to float32 tolerance)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _use_mkldnn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # oneDNN's linear is ~20 % faster than MKL sgemm on AMD CPUs and fuses GELU; inference only.
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
    )


def linear(x: torch.Tensor, layer: nn.Linear, gelu: bool = False) -> torch.Tensor:
    """``layer(x)`` (then exact-erf GELU if asked), through oneDNN on CPU at inference time."""
    if _use_mkldnn(x, layer.weight):
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, layer.weight, layer.bias, "gelu" if gelu else "none", [], "none" if gelu else "")
        return out.reshape(*x.shape[:-1], -1)
    y = F.linear(x, layer.weight, layer.bias)
    return F.gelu(y) if gelu else y


def linear_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
    """``residual + x @ weight.T + bias`` with the addition fused into oneDNN's GEMM on CPU at
    inference time (one pass over the output instead of two)."""
    if _use_mkldnn(x, weight):
        flat, res = x.reshape(-1, x.shape[-1]), residual.reshape(-1, weight.shape[0])
        out = torch.ops.mkldnn._linear_pointwise.binary(flat, res, weight, bias, "add")
        return out.reshape(residual.shape)
    return residual + F.linear(x, weight, bias)
