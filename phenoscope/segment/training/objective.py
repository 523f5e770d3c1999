"""The segmentation objective for the training loop: cellpose's loss with seeded layer drop (plus the class
loss of :mod:`phenoscope.segment.semantic` for batches with class targets), and validation AP."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from phenoscope.segment.net import CellposeSAMNet
from phenoscope.segment.semantic import class_loss
from phenoscope.segment.training.data import Sample
from phenoscope.train.l2sp import L2SP, l2sp_param_groups, with_penalty


def cellpose_loss(y: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cellpose ``_loss_fn_seg``: (MSE(y[:, :2], 5·flows) / 2, BCE-with-logits(y[:, 2], foreground)).

    y: (B, ≥ 3, H, W) network output (dY, dX, cellprob logits, then any class maps, which are not used here);
    target: (B, 3, H, W) (foreground, dY, dX).
    """
    flow = F.mse_loss(y[:, :2], 5.0 * target[:, 1:]) / 2.0
    prob = F.binary_cross_entropy_with_logits(y[:, 2], (target[:, 0] > 0.5).to(y.dtype))
    return flow, prob


class CellposeLoss(nn.Module):
    """Objective for the generic loop: the cellpose loss with per-step seeded layer drop, plus validation.

    A batch with ``classes`` (B, H, W) class targets adds the class loss
    (:func:`phenoscope.segment.semantic.class_loss`, batch inverse-frequency weights) of the network's class maps.
    With ``l2sp`` (over parameter names of this module, ``net.*``) its penalty joins the loss and its
    parameters get no plain weight decay."""

    find_unused_parameters = True  # layer drop skips blocks

    def __init__(self, net: CellposeSAMNet, layer_drop: float = 0.0, seed: int = 0,
                 val: list[Sample] | None = None, val_every: int = 0, l2sp: L2SP | None = None) -> None:
        super().__init__()
        self.net, self.layer_drop, self.seed = net, layer_drop, seed
        self.val, self.val_every, self.l2sp = val or [], val_every, l2sp

    def param_groups(self) -> list[dict]:
        return l2sp_param_groups(self.named_parameters(), self.l2sp.names if self.l2sp else set())

    def forward(self, batch: dict[str, torch.Tensor], progress) -> dict[str, torch.Tensor]:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + progress.step) * 64 + rank)
        y = self.net(batch["image"], self.layer_drop, gen)
        flow, prob = cellpose_loss(y.float(), batch["target"])
        out = {"loss": flow + prob, "flow_loss": flow.detach(), "prob_loss": prob.detach()}
        if "classes" in batch:
            cls = class_loss(y[:, self.net.cfg.nout:].float(), batch["classes"])
            out.update(loss=out["loss"] + cls, class_loss=cls.detach())
        return with_penalty(out, self.l2sp)

    def on_epoch_end(self, epoch: int) -> dict[str, float] | None:
        last = epoch + 1
        if not self.val or not self.val_every or last % self.val_every:
            return None
        return validate(self.net, self.val)


def validate(net: CellposeSAMNet, samples: list[Sample], thresholds=(0.5, 0.75, 0.9)) -> dict[str, float]:
    """Mean AP (cellpose definition) of ``net`` on validation samples, at their native size."""
    from phenoscope.eval.segmentation import average_precision
    from phenoscope.segment.inference import CellposeSAM

    device = next(net.parameters()).device
    model = CellposeSAM(net, device)
    preds = [model.segment(np.moveaxis(s.image, 0, -1), channel_axis=-1).masks for s in samples]
    ap = average_precision([s.labels for s in samples], preds, thresholds)[0].mean(axis=0)
    return {f"val_ap{int(round(100 * t))}": float(a) for t, a in zip(thresholds, ap)}
