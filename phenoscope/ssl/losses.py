"""Self-supervised losses and teacher sharpening (DINOv2 semantics, torch.distributed optional).

Shapes: ``B`` samples, ``K`` prototypes, ``D`` embedding dim. All functions are pure except
``Centering`` (an EMA buffer).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _dist():
        dist.all_reduce(x)
    return x


def dino_cls_loss(student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor], student_temp: float = 0.1) -> torch.Tensor:
    """DINO cross-entropy between teacher targets and student predictions of other views.

    Args:
        student_logits: per view (B, K); the first ``len(teacher_probs)`` are the global views.
        teacher_probs: per global view (B, K), already centred/sharpened.
    Returns:
        scalar: mean over valid (student, teacher) pairs (student view i never meets teacher view
        i) of ``-sum_k t_k log softmax(s / student_temp)_k`` averaged over the batch. This equals
        dinov2's global+local loss divided by its number of loss terms.
    """
    total, pairs = student_logits[0].new_zeros(()), 0
    for i, s in enumerate(student_logits):
        log_p = F.log_softmax(s.float() / student_temp, dim=-1)
        for j, t in enumerate(teacher_probs):
            if i == j:
                continue
            total = total - (t * log_p).sum(-1).mean()
            pairs += 1
    if pairs == 0:
        raise ValueError("DINO loss needs at least 2 views (2 global crops, or local crops)")
    return total / pairs


def ibot_patch_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor, student_temp: float = 0.1
) -> torch.Tensor:
    """iBOT masked-patch loss (dinov2 ``forward_masked``).

    Args:
        student_logits, teacher_probs: (M, K) for the M masked patches, in ``masks[masks]`` order.
        masks: bool (B, N) patch masks of the student's global crops.
    Returns:
        scalar: per image, the mean cross-entropy over its masked patches, summed over images and
        divided by B (images without masked patches count as 0).
    """
    ce = -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)
    weight = (1.0 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    return (ce * weight).sum() / masks.shape[0]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy regulariser: ``-mean_i log(min_{j≠i} ||x̂_i - x̂_j|| + eps)``.

    ``x`` (B, D) is L2-normalised first (dinov2 KoLeoLoss, pairwise distance with eps 1e-8).
    """
    if x.shape[0] < 2:
        raise ValueError("KoLeo needs at least 2 samples")
    x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
    dots = x @ x.t()
    dots.fill_diagonal_(-1.0)
    nn_idx = dots.argmax(dim=1)
    dist_nn = F.pairwise_distance(x, x[nn_idx], p=2, eps=eps)
    return -torch.log(dist_nn + eps).mean()


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets (dinov2), distributed-aware but works without a process group.

    Args:
        teacher_logits: (B, K) local batch.
    Returns:
        (B, K) targets; every row sums to 1, and prototype (column) totals over the global batch
        approach ``B_global / K`` as ``n_iterations`` grows.
    """
    world = dist.get_world_size() if _dist() else 1
    logits = teacher_logits.float()
    shift = logits.max().clone()  # for exp() overflow; cancels in the normalisation
    if _dist():
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    q = torch.exp((logits - shift) / teacher_temp).t()  # K x B
    b, k = q.shape[1] * world, q.shape[0]
    q /= _all_reduce(q.sum())
    tiny = torch.finfo(q.dtype).tiny  # guards 0/0 when exp() underflows for a whole row/column
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True)).clamp_min(tiny)
        q /= k
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)
        q /= b
    return (q * b).t()


class Centering(nn.Module):
    """Softmax centering: targets ``softmax((t - c) / T)``, with ``c`` an EMA of batch means."""

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(B, K) logits → (B, K) targets using the current centre (then call ``update``)."""
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """``c ← m c + (1 - m) mean(teacher_logits)`` over the (global) batch."""
        world = dist.get_world_size() if _dist() else 1
        batch_sum = _all_reduce(teacher_logits.float().sum(dim=0, keepdim=True))
        mean = batch_sum / (teacher_logits.shape[0] * world)
        self.center.mul_(self.momentum).add_(mean, alpha=1 - self.momentum)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR NT-Xent: each of the 2B views must pick its partner among the other 2B-1.

    ``z1``, ``z2``: (B, D) projections of two views; returns the mean cross-entropy.
    """
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    n = z1.shape[0]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def gather_keys(k: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Keys (B, D) of every DDP rank concatenated in rank order (no gradient) and the row offset
    of this rank's keys in it; ``(k, 0)`` without ``torch.distributed``."""
    if not _dist() or dist.get_world_size() == 1:
        return k, 0
    parts = [torch.empty_like(k) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, k.detach().contiguous())
    return torch.cat(parts), dist.get_rank() * k.shape[0]


def info_nce_loss(
    q: torch.Tensor, k: torch.Tensor, temperature: float, queue: torch.Tensor | None = None, offset: int = 0
) -> torch.Tensor:
    """MoCo InfoNCE: query i's positive is key ``i + offset``; negatives are the other keys (v3) or
    the queue (v2).

    ``q``: (B, D); ``k``: (B', D), B' ≥ B + offset (all ranks' keys, see ``gather_keys``) without a
    queue, (B, D) with one; ``queue``: (Q, D) normalised negatives or None. Returns ``2T · CE``
    for in-batch negatives (MoCo v3 scaling) and plain ``CE`` with a queue.
    """
    q, k = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
    if queue is None:
        logits = q @ k.t() / temperature
        return F.cross_entropy(logits, torch.arange(offset, offset + q.shape[0], device=q.device)) * 2 * temperature
    pos = (q * k).sum(-1, keepdim=True)
    logits = torch.cat([pos, q @ queue.t()], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) → (B, N, p*p*C) row-major patches (MAE layout)."""
    b, c, h, w = x.shape
    x = x[:, :, : h // p * p, : w // p * p].reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def mae_loss(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """Mean squared error over masked patches; ``norm_pix`` standardises each target patch."""
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((pred.float() - target) ** 2).mean(-1)
    return (per_patch * masked).sum() / masked.sum().clamp(min=1)
