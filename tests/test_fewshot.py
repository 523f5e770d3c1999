"""CUPre foundations: the cross-domain split (deterministic, disjoint, nested fractions, committed files)
and L2-SP (analytic gradient, no plain weight decay on anchored parameters)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from phenoscope.fewshot import L2SP, cross_domain_split, l2sp_param_groups, labelled_subset

SPLIT_DIR = Path(__file__).resolve().parents[1] / "configs" / "fewshot" / "dsb_he"


def _dsb_split(dsb_dir):
    from phenoscope.datasets import dsb_index

    return cross_domain_split(dsb_index(dsb_dir), "fluorescence_gray", "color_lightbg_HE_or_brightfield")


def test_split_is_deterministic_disjoint_and_nested(dsb_dir):
    a, b = _dsb_split(dsb_dir), _dsb_split(dsb_dir)
    assert a == b
    assert len(a.source) == 541 and len(a.target_test) == 30 and len(a.target_val) == 12 and len(a.target_pool) == 65
    parts = [set(a.source), set(a.target_test), set(a.target_val), set(a.target_pool)]
    assert sum(map(len, parts)) == len(set().union(*parts))  # disjoint
    for seed in (0, 1, 2):
        sizes = [len(a.labelled[(f, seed)]) for f in (0.05, 0.1, 0.2, 1.0)]
        assert sizes == [4, 7, 13, 65]
        for small, big in ((0.05, 0.1), (0.1, 0.2), (0.2, 1.0)):
            assert set(a.labelled[(small, seed)]) <= set(a.labelled[(big, seed)])
    assert a.labelled[(0.1, 0)] != a.labelled[(0.1, 1)]


def test_committed_split_files_equal_the_recomputed_split(dsb_dir):
    split = _dsb_split(dsb_dir)
    read = lambda name: tuple((SPLIT_DIR / f"{name}.txt").read_text().split())  # noqa: E731
    assert read("source") == split.source and read("target_test") == split.target_test
    assert read("target_val") == split.target_val and read("target_pool") == split.target_pool
    assert read("labelled_5pc_seed0") == split.labelled[(0.05, 0)]


def test_split_bad_input():
    index = pd.DataFrame({"image_id": [f"i{k}" for k in range(10)], "modality_heuristic": ["a"] * 5 + ["b"] * 5})
    with pytest.raises(ValueError, match="no images of domain 'c'"):
        cross_domain_split(index, "a", "c")
    with pytest.raises(ValueError, match="too few"):
        cross_domain_split(index, "a", "b", n_test=3, n_val=2)
    with pytest.raises(ValueError, match="selects no image"):
        labelled_subset((), 0.1, 0)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        labelled_subset(("x", "y"), 0.0, 0)
    with pytest.raises(ValueError, match="no 'site' column"):
        cross_domain_split(index, "a", "b", domain_column="site")


def test_l2sp_gradient_is_analytic_and_anchored_params_get_no_weight_decay():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    backbone = [(f"0.{n}", p) for n, p in net[0].named_parameters()]
    reg = L2SP(backbone, alpha=0.3, strength=0.5)
    anchors = {n: p.detach().clone() for n, p in backbone}
    with torch.no_grad():
        for _, p in backbone:
            p.add_(torch.randn_like(p))
    reg.penalty().backward()
    for n, p in backbone:
        expected = 0.5 * (2 * 0.3 * (p.detach() - anchors[n]) + 2 * 0.7 * p.detach())
        torch.testing.assert_close(p.grad, expected)
    assert all(p.grad is None for p in net[1].parameters())  # the head is not regularised by L2-SP
    groups = l2sp_param_groups(net.named_parameters(), reg.names)
    by_param = {id(p): g["wd_mult"] for g in groups for p in g["params"]}
    assert all(by_param[id(p)] == 0.0 for _, p in backbone)
    assert by_param[id(net[1].weight)] == 1.0  # plain weight decay on the head's weights
    with pytest.raises(ValueError, match="alpha"):
        L2SP(backbone, alpha=1.5)


def test_amt2_schedule_trains_the_right_parameters_with_the_right_regulariser():
    """Each phase as the grid runs it: SSL trains the encoder alone (the objective ``pretrain`` builds for
    ``seg-<variant>``, whose weights go into ``net.encoder``); the source and fine-tuning phases train the
    whole network through ``CellposeLoss``, the backbone under L2-SP without weight decay where the phase
    says so, the neck and head with plain weight decay."""
    from dataclasses import replace

    from phenoscope.fewshot import amt2_schedule, is_backbone
    from phenoscope.fewshot.grid import FewShotConfig, _phase_l2sp
    from phenoscope.segment.net import build_net
    from phenoscope.segment.training.objective import CellposeLoss
    from phenoscope.segment.training.run import SegTrainConfig, anchored_backbone
    from phenoscope.ssl.pretrain import build_backbone, build_objective

    phases = amt2_schedule(2)
    assert [p.name for p in phases] == ["ssl-1", "source-1", "ssl-2", "source-2", "finetune"]
    assert [p.l2sp for p in phases] == [False, True, False, True, False] and amt2_schedule(1, plus=True)[-1].l2sp
    cfg = FewShotConfig(l2sp_strength=1e-3)
    net = build_net("nano")
    names = [n for n, _ in net.named_parameters()]
    backbone = {n for n in names if is_backbone(n)}
    assert backbone and "encoder.neck.0.weight" not in backbone and "out.weight" not in backbone
    for phase in phases + amt2_schedule(1, plus=True)[-1:]:
        if phase.kind == "ssl":  # the encoder (backbone + neck) only, no L2-SP
            pc = replace(cfg.ssl, backbone="seg-nano")
            objective = build_objective(pc, build_backbone(pc, 3))
            encoder = {f"encoder.{n}" for n, _ in objective.backbone.named_parameters() if n != "mask_token"}
            assert encoder == {n for n in names if n.startswith("encoder.")}
            continue
        strength = _phase_l2sp(phase, cfg)
        assert strength == (cfg.l2sp_strength if phase.l2sp else 0.0)
        loss = CellposeLoss(net, l2sp=anchored_backbone(net, SegTrainConfig(l2sp_strength=strength)))
        wd = {n.removeprefix("net."): g["wd_mult"] for g in loss.param_groups() for n in g["names"]}
        assert set(wd) == set(names)  # the whole network trains
        if phase.l2sp:  # the backbone under L2-SP without weight decay; neck and head weights decay
            assert {n.removeprefix("net.") for n in loss.l2sp.names} == backbone
            assert all(wd[n] == 0.0 for n in backbone)
            assert wd["out.weight"] == 1.0 and wd["encoder.neck.0.weight"] == 1.0
        else:
            assert loss.l2sp is None and wd["encoder.blocks.0.attn.qkv.weight"] == 1.0


def test_moco_v2_queue_and_momentum_updates_on_the_segmentation_encoder():
    """The MoCo phase of AMT² through the backbone seam: a queue that takes the newest keys at its pointer
    (wrapping round), and a key encoder that moves by θ_k ← m θ_k + (1 − m) θ_q."""
    from phenoscope.segment.net import Encoder, variant
    from phenoscope.ssl.moco import MoCo, MoCoConfig
    from phenoscope.train.loop import Progress

    torch.manual_seed(0)
    enc = Encoder(variant("nano", depth=1, dim=32, heads=2, neck_dim=16), mask_token=True)  # as `pretrain --backbone seg-*`
    moco = MoCo(enc, MoCoConfig(proj_hidden_dim=8, proj_dim=4, pred_hidden_dim=8, queue_size=6, momentum=0.9,
                                final_momentum=0.9))
    keys = torch.nn.functional.normalize(torch.randn(4, 4), dim=-1)
    moco._enqueue(keys)
    more = torch.nn.functional.normalize(torch.randn(4, 4), dim=-1)
    moco._enqueue(more)
    torch.testing.assert_close(moco.queue[0:2], more[2:])
    torch.testing.assert_close(moco.queue[2:4], keys[2:])
    torch.testing.assert_close(moco.queue[4:6], more[:2])
    assert int(moco.queue_ptr) == 2
    with torch.no_grad():
        for p in moco.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in moco.key_backbone.parameters()]
    moco.on_step_end(Progress(step=0, epoch=0, steps_per_epoch=10, total_steps=10))
    for k, q, b in zip(moco.key_backbone.parameters(), moco.backbone.parameters(), before):
        torch.testing.assert_close(k, 0.9 * b + 0.1 * q)
