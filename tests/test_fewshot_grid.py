"""CUPre's runner: the checks made before any training, L2-SP inside segmentation training, encoders
carried between phases, a whole (tiny) grid that resumes, and the Mask R-CNN path."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from phenoscope.core.io import imwrite_tiff
from phenoscope.datasets import synthetic_nuclei
from phenoscope.fewshot.grid import FewShotConfig, check_inputs, run_grid
from phenoscope.segment.training.data import find_pairs, split_pairs

TOML = Path(__file__).resolve().parents[1] / "configs" / "fewshot" / "dsb_he.toml"


def _folder(root: Path, stems: list[str], seed: int = 0, shape=(128, 128)) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for k, stem in enumerate(stems):
        img, lab = synthetic_nuclei(shape, n=12, seed=seed + k)
        imwrite_tiff(root / "images" / f"{stem}.tif", img)
        imwrite_tiff(root / "labels" / f"{stem}_masks.tif", lab.astype(np.uint16))


def _benchmark(tmp_path: Path) -> FewShotConfig:
    """A source folder of 4 labelled images and a target folder of 8 (2 test, 2 validation, a pool of 4)."""
    _folder(tmp_path / "src", [f"s{i}" for i in range(4)])
    _folder(tmp_path / "tgt", [f"t{i}" for i in range(8)], seed=10)
    split = tmp_path / "split"
    split.mkdir()
    parts = {"target_test": ["t0", "t1"], "target_val": ["t2", "t3"], "target_pool": ["t4", "t5", "t6", "t7"],
             "labelled_50pc_seed0": ["t4", "t5"]}
    for name, ids in parts.items():
        (split / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    base = FewShotConfig()
    tiny = dict(epochs=1, batch_size=2, warmup_epochs=0.0, progress_bar=False)
    return replace(
        base, source_images=str(tmp_path / "src" / "images"), source_labels=str(tmp_path / "src" / "labels"),
        target_images=str(tmp_path / "tgt" / "images"), target_labels=str(tmp_path / "tgt" / "labels"), split=str(split),
        fractions=[50], seeds=[0],
        ssl=replace(base.ssl, mocov3=replace(base.ssl.mocov3, proj_hidden_dim=16, pred_hidden_dim=16, queue_size=8),
                    augment=replace(base.ssl.augment, global_size=128), train=replace(base.ssl.train, **tiny)),
        source=replace(base.source, min_images_per_epoch=2, train=replace(base.source.train, **tiny)),
        finetune=replace(base.finetune, min_images_per_epoch=2, train=replace(base.finetune.train, **tiny)))


def test_committed_benchmark_config_loads_and_checks_against_the_real_split(dsb_dir, monkeypatch):
    from phenoscope.config import load_config

    monkeypatch.chdir(TOML.parents[2])
    cfg = load_config(FewShotConfig, TOML)
    cfg = replace(cfg, **{k: str(dsb_dir / Path(getattr(cfg, k)).name) for k in
                          ("source_images", "source_labels", "target_images", "target_labels")})
    data = check_inputs(cfg)
    split = data.split
    assert (len(split.source), len(split.target_test), len(split.target_val), len(split.target_pool)) == (541, 30, 12, 65)
    assert data.ssl_backbone == "seg-nano" and len(data.labelled_files) == len(split.labelled) == len(cfg.fractions) * len(cfg.seeds)


@pytest.mark.parametrize("breakage, message", [
    (lambda c, t: replace(c, target_images=str(t / "empty")), "no images in the target image folder"),
    (lambda c, t: replace(c, source_images=str(t / "missing")), "source image folder not found"),
    (lambda c, t: (Path(c.target_labels, "t0_masks.tif").unlink(), c)[1], r"target_test.txt: 1 id\(s\) have no label file"),
    (lambda c, t: (Path(c.split, "labelled_50pc_seed0.txt").write_text("\n"), c)[1], "labelled_50pc_seed0.txt: lists no image"),
    (lambda c, t: replace(c, fractions=[20]), "labelled_20pc_seed0.txt"),
    (lambda c, t: replace(c, fractions=[0]), r"label fractions must be percentages in \(0, 100\]"),
    (lambda c, t: (Path(c.split, "labelled_50pc_seed0.txt").write_text("t0\n"), c)[1], "not in the target pool"),
    (lambda c, t: replace(c, inits=["scratch", "imagenet"]), "unknown init"),
    (lambda c, t: replace(c, model=str(t / "nano.safetensors"), ssl_backbone="seg-tiny"),
     "nano.safetensors: encoder config does not match the network"),
    (lambda c, t: replace(c, model=str(t / "nano_encoder.safetensors"), ssl_backbone="seg-nano"),
     "nano_encoder.safetensors: a 'seg-encoder' checkpoint, not a segmentation network"),
    (lambda c, t: replace(c, model=str(t / "nano.safetensors")), "ssl_backbone must be seg-<variant>"),
])
def test_bad_benchmark_input_is_one_clear_error_before_training(tmp_path, breakage, message):
    from phenoscope.segment.checkpoint import save_encoder, save_model
    from phenoscope.segment.net import Encoder, build_net, variant

    cfg = _benchmark(tmp_path)
    (tmp_path / "empty").mkdir()
    save_encoder(Encoder(variant("nano"), mask_token=True), tmp_path / "nano_encoder.safetensors")
    save_model(build_net(variant("nano")), tmp_path / "nano.safetensors")
    with pytest.raises(ValueError, match=message):
        check_inputs(breakage(cfg, tmp_path))


def test_cli_reports_a_bad_benchmark_in_one_line_and_writes_nothing(tmp_path, capsys):
    from phenoscope.cli import main

    cfg = _benchmark(tmp_path)
    Path(cfg.split, "target_val.txt").write_text("t2\nnot_there\n")
    toml = tmp_path / "bench.toml"
    toml.write_text("\n".join(f'{k} = "{getattr(cfg, k)}"' for k in
                              ("source_images", "source_labels", "target_images", "target_labels", "split")) + "\n")
    assert main(["fewshot", "--config", str(toml), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "target_val.txt: 1 id(s) have no image, e.g. not_there" in err[0]
    assert not (tmp_path / "out").exists()


def test_train_ids_restrict_training_and_unknown_ids_are_an_error(tmp_path):
    _folder(tmp_path, ["a", "b", "c"])
    pairs = find_pairs(tmp_path / "images", tmp_path / "labels")
    (tmp_path / "train.txt").write_text("a\nc\n")
    (tmp_path / "val.txt").write_text("b\n")
    train, val = split_pairs(pairs, str(tmp_path / "val.txt"), train_ids=str(tmp_path / "train.txt"))
    assert [p[0].stem for p in train] == ["a", "c"] and [p[0].stem for p in val] == ["b"]
    (tmp_path / "train.txt").write_text("a\nb\n")  # b is validated on
    with pytest.raises(ValueError, match="1 training id"):
        split_pairs(pairs, str(tmp_path / "val.txt"), train_ids=str(tmp_path / "train.txt"))


def test_l2sp_in_segmentation_training_anchors_the_vit_and_replaces_its_weight_decay():
    from phenoscope.segment.net import build_net, is_backbone, variant
    from phenoscope.segment.training.objective import CellposeLoss
    from phenoscope.segment.training.run import SegTrainConfig, anchored_backbone
    from phenoscope.train.loop import Progress

    torch.manual_seed(0)
    net = build_net(variant("nano"))
    reg = anchored_backbone(net, SegTrainConfig(l2sp_strength=1e-3, l2sp_alpha=1.0))
    assert reg.names == {f"net.{n}" for n, _ in net.named_parameters() if is_backbone(n)}
    objective = CellposeLoss(net, l2sp=reg)
    groups = objective.param_groups()
    anchored = [g for g in groups if set(g["names"]) & reg.names]
    assert len(anchored) == 1 and anchored[0]["wd_mult"] == 0.0 and set(anchored[0]["names"]) == reg.names
    assert any(g["wd_mult"] == 1.0 and any(n.startswith("net.encoder.neck.") for n in g["names"]) for g in groups)
    batch = {"image": torch.rand(1, 3, 128, 128), "target": torch.rand(1, 3, 128, 128)}
    assert float(objective(batch, Progress(0, 0, 1, 1))["l2sp"]) == 0.0  # alpha 1: zero at the anchor
    with torch.no_grad():
        net.encoder.pos_embed.add_(0.1)
    out = objective(batch, Progress(0, 0, 1, 1))
    expected = 1e-3 * 0.01 * net.encoder.pos_embed.numel()
    assert float(out["l2sp"]) == pytest.approx(expected, rel=1e-4)
    assert float(out["loss"]) == pytest.approx(float(out["flow_loss"] + out["prob_loss"] + out["l2sp"]), rel=1e-5)


def test_ssl_starts_from_a_network_encoder_and_a_mismatch_names_the_file(tmp_path):
    from phenoscope.segment.checkpoint import save_model
    from phenoscope.segment.net import build_net, variant
    from phenoscope.ssl.pretrain import PretrainConfig, build_backbone

    net = build_net(variant("nano"))
    save_model(net, tmp_path / "net.safetensors")
    enc = build_backbone(PretrainConfig(backbone="seg-nano", init_checkpoint=str(tmp_path / "net.safetensors")), 3)
    for k, v in net.encoder.state_dict().items():
        torch.testing.assert_close(enc.state_dict()[k], v)
    with pytest.raises(ValueError, match=r"net.safetensors: encoder config does not match the network \(depth"):
        build_backbone(PretrainConfig(backbone="seg-tiny", init_checkpoint=str(tmp_path / "net.safetensors")), 3)


def test_a_cellpose_cpsam_checkpoint_starts_the_grid_and_its_ssl_phase(tmp_path):
    """``model`` = a cellpose cpsam file (random weights): the grid's checks accept it with the ``seg-large``
    encoder, and the SSL phase starts from its encoder, weight for weight."""
    from test_network import random_cpsam

    from phenoscope.ssl.pretrain import PretrainConfig, build_backbone

    ref = random_cpsam()
    path = tmp_path / "cpsam.pt"
    torch.save(ref.state_dict(), path)
    cfg = replace(_benchmark(tmp_path), model=str(path))
    with pytest.raises(ValueError, match="ssl_backbone must be seg-<variant>"):
        check_inputs(cfg)  # a file gives no variant to name the encoder by
    assert check_inputs(replace(cfg, ssl_backbone="seg-large")).ssl_backbone == "seg-large"
    with pytest.raises(ValueError, match=r"cpsam.pt: encoder config does not match the network \(depth"):
        check_inputs(replace(cfg, ssl_backbone="seg-nano"))
    enc = build_backbone(PretrainConfig(backbone="seg-large", init_checkpoint=str(path)), 3)
    theirs = ref.state_dict()
    for name in ("patch_embed.proj.weight", "blocks.23.attn.qkv.weight", "blocks.0.attn.rel_pos_h"):
        torch.testing.assert_close(enc.state_dict()[name], theirs[f"encoder.{name}"], rtol=0, atol=0)


def test_tiny_grid_runs_every_init_caches_shared_phases_and_resumes(tmp_path):
    cfg = _benchmark(tmp_path)
    out = tmp_path / "grid"
    rows = run_grid(cfg, out, log=lambda _: None)
    assert [r["init"] for r in rows] == ["scratch", "ssl", "source", "cupre", "cupre++"]
    assert all(0.0 <= r["ap50"] <= 1.0 and 0.0 <= r["coco_ap_segm"] <= 1.0 for r in rows)
    phases = sorted(p.name for p in (out / "phases").iterdir())
    assert phases == ["cupre-source-1", "source", "ssl-1"]
    for name in ("results.csv", "summary.csv", "phases.csv", "fewshot.png", "report.html"):
        assert (out / name).stat().st_size > 0
    cupre = json.loads((out / "runs" / "cupre++" / "50pc_seed0" / "config.json").read_text())["config"]
    assert cupre["l2sp_strength"] == cfg.l2sp_strength and cupre["model"].endswith("cupre-source-1/model.safetensors")
    source = json.loads((out / "phases" / "cupre-source-1" / "config.json").read_text())["config"]
    assert source["init_backbone"].endswith("ssl-1/backbone.safetensors") and source["l2sp_strength"] > 0
    assert {Path(c["cache_dir"]) for c in (cupre, source)} == {out / "flow_cache"}  # one flow cache for the grid
    models = sorted(out.rglob("model.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in models]
    assert run_grid(cfg, out, log=lambda _: None) == rows  # nothing is retrained
    assert [p.stat().st_mtime_ns for p in models] == stamps
    from phenoscope.segment.inference import load_model

    assert load_model(str(out / "runs" / "cupre" / "50pc_seed0" / "model.safetensors")) is not None


def test_maskrcnn_targets_tokens_and_one_regularised_step():
    from phenoscope.fewshot.maskrcnn import (MaskRCNNConfig, MaskRCNNLoss, ResNetTokens, build_maskrcnn,
                                            detection_target, is_body, predict_labels)
    from phenoscope.nn.backbone import check_backbone

    labels = np.zeros((64, 64), np.int32)
    labels[2:10, 3:7], labels[20:30, 40:64] = 1, 3
    t = detection_target(labels)
    assert t["boxes"].tolist() == [[3, 2, 7, 10], [40, 20, 64, 30]] and t["labels"].tolist() == [1, 1]
    assert (t["masks"][1].numpy() == (labels == 3)).all()
    torch.manual_seed(0)
    model = build_maskrcnn(MaskRCNNConfig(min_size=64, max_size=64))
    tokens = check_backbone(ResNetTokens(model.backbone.body))
    out = tokens.forward_tokens(torch.rand(2, 3, 64, 64))
    assert out["cls"].shape == (2, 2048) and out["patches"].shape == (2, 4, 2048)
    objective = MaskRCNNLoss(model, l2sp_strength=1e-4, l2sp_alpha=1.0)
    assert objective.l2sp.names == {f"model.{n}" for n, p in model.named_parameters() if is_body(n) and p.requires_grad}
    assert [g["wd_mult"] for g in objective.param_groups() if set(g["names"]) & objective.l2sp.names] == [0.0]
    image = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)
    loss = objective([{"image": torch.from_numpy(image), "target": t}], None)
    assert torch.isfinite(loss["loss"]) and {"loss_mask", "loss_box_reg", "l2sp"} <= set(loss)
    loss["loss"].backward()
    assert model.backbone.body.conv1.weight.grad is not None
    pred, scores = predict_labels(model, image, 0.0)
    assert pred.shape == (64, 64) and len(scores) == len(np.unique(pred[pred > 0]))


@pytest.mark.slow
def test_maskrcnn_cupre_runs_end_to_end_on_real_images(dsb_dir, tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "fewshot_maskrcnn.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--source", "2", "--pool", "8", "--test", "2",
                           "--epochs", "1", "--min-size", "256"], capture_output=True, text=True, check=True)
    assert "AP_segm" in done.stdout and (tmp_path / "cupre" / "finetune" / "log.csv").is_file()
