"""Cell-DINO: the DINOv2 objective (DINO CLS + iBOT masked patches + KoLeo) with an EMA teacher.

Batch (from ``phenoscope.ssl.data.MultiCropCollate``): ``global`` (2B, C, H, W) view-major,
``local`` (nL*B, C, h, w) or absent, ``masks`` bool (2B, N) iBOT masks of the global crops.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from phenoscope.nn.backbone import Backbone
from phenoscope.ssl.heads import DINOHead
from phenoscope.ssl.losses import (
    Centering,
    dino_cls_loss,
    ibot_patch_loss,
    koleo_loss,
    mae_loss,
    patchify,
    sinkhorn_knopp,
)
from phenoscope.ssl.registry import Method, register
from phenoscope.train.loop import Progress
from phenoscope.train.optim import param_groups
from phenoscope.train.schedules import cosine_schedule, ema_update, linear_warmup

N_GLOBAL = 2


@dataclass
class DINOConfig:
    """DINOv2 / Cell-DINO defaults."""

    n_prototypes: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    ibot_separate_head: bool = False
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30.0
    centering: str = "softmax"  # or "sinkhorn"
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    # > 0 adds a linear head regressing the pixels of the masked global-view patches (no per-patch
    # normalisation) from the student's patch tokens (SimMIM-style), so tokens keep absolute
    # intensity; 0 = dinov2
    pixel_loss_weight: float = 0.0
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2


class DINO(nn.Module):
    """Student (backbone + heads, trained) and EMA teacher (same architecture, no gradients)."""

    def __init__(self, backbone: Backbone, cfg: DINOConfig) -> None:
        super().__init__()
        if cfg.centering not in ("softmax", "sinkhorn"):
            raise ValueError(f"centering must be 'softmax' or 'sinkhorn', got {cfg.centering!r}")
        self.cfg = cfg
        dim = backbone.embed_dim

        def head() -> DINOHead:
            return DINOHead(dim, cfg.n_prototypes, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_layers)

        heads: dict[str, nn.Module] = {"dino_head": head()}
        if cfg.ibot_separate_head:
            heads["ibot_head"] = head()
        self.student = nn.ModuleDict({"backbone": backbone, **heads})
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.teacher.eval()  # no drop path in the teacher
        # student-only (the teacher never regresses pixels): masked-patch tokens -> patch pixels
        self.pixel_head = nn.Linear(dim, backbone.patch_size**2 * backbone.in_chans) if cfg.pixel_loss_weight > 0 else None
        self.cls_center = Centering(cfg.n_prototypes, cfg.center_momentum)
        self.patch_center = Centering(cfg.n_prototypes, cfg.center_momentum)

    def train(self, mode: bool = True) -> DINO:
        super().train(mode)
        self.teacher.eval()  # no drop path in the teacher
        return self

    @property
    def backbone(self) -> Backbone:
        """The network to embed with after training: the teacher backbone, as in DINO."""
        return self.teacher.backbone

    def param_groups(self) -> list[dict]:
        c = self.cfg
        depth = self.student.backbone.depth
        # the teacher's parameters are frozen, so param_groups skips them
        return param_groups(self.named_parameters(), depth, c.layer_decay, c.patch_embed_lr_mult, "student.backbone.")

    def _targets(self, logits: torch.Tensor, center: Centering, temp: float) -> torch.Tensor:
        if self.cfg.centering == "sinkhorn":
            return sinkhorn_knopp(logits, temp, self.cfg.sinkhorn_iterations)
        probs = center(logits, temp)
        center.update(logits)
        return probs

    def _ibot_head(self, net: nn.ModuleDict) -> nn.Module:
        return net["ibot_head"] if self.cfg.ibot_separate_head else net["dino_head"]

    def forward(self, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        c = self.cfg
        g, masks, local = batch["global"], batch["masks"], batch.get("local")
        temp = linear_warmup(progress.step, int(c.warmup_teacher_temp_epochs * progress.steps_per_epoch), c.warmup_teacher_temp, c.teacher_temp)
        has_masks = bool(masks.any())
        with torch.no_grad():
            t = self.teacher.backbone.forward_tokens(g)
            t_cls = self._targets(self.teacher.dino_head(t["cls"]), self.cls_center, temp)
            if has_masks:
                t_patch = self._targets(self._ibot_head(self.teacher)(t["patches"][masks]), self.patch_center, temp)
        s = self.student.backbone.forward_tokens(g, masks=masks if has_masks else None)
        s_logits = list(self.student.dino_head(s["cls"]).chunk(N_GLOBAL))
        if local is not None:
            n_local = local.shape[0] // (g.shape[0] // N_GLOBAL)
            s_logits += list(self.student.dino_head(self.student.backbone.forward_tokens(local)["cls"]).chunk(n_local))
        dino = dino_cls_loss(s_logits, list(t_cls.chunk(N_GLOBAL)), c.student_temp)
        koleo = sum(koleo_loss(x) for x in s["cls"].chunk(N_GLOBAL))
        ibot = (
            ibot_patch_loss(self._ibot_head(self.student)(s["patches"][masks]), t_patch, masks, c.student_temp)
            if has_masks
            else g.new_zeros(())
        )
        loss = c.dino_loss_weight * dino + c.ibot_loss_weight * ibot + c.koleo_loss_weight * koleo
        out = {"dino": dino.detach(), "ibot": ibot.detach(), "koleo": koleo.detach(), "teacher_temp": torch.tensor(temp)}
        if self.pixel_head is not None:
            target = patchify(g, self.student.backbone.patch_size)
            pixel = mae_loss(self.pixel_head(s["patches"]), target, masks.float(), norm_pix=False)
            loss = loss + c.pixel_loss_weight * pixel
            out["pixel"] = pixel.detach()
        return {"loss": loss, **out}

    def momentum(self, progress: Progress) -> float:
        return cosine_schedule(progress.step, progress.total_steps, self.cfg.momentum_teacher, self.cfg.final_momentum_teacher)

    def on_step_end(self, progress: Progress) -> None:
        ema_update(self.teacher, self.student, self.momentum(progress))


METHOD = register(Method("dino", DINOConfig, lambda backbone, cfg, global_size: DINO(backbone, cfg), local_crops=True))
