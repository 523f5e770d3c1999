"""``phenoscope fewshot``: the CUPre benchmark grid for the Cellpose-SAM flow model.

Every init is fine-tuned on every labelled target fraction with every seed, then scored on the target
test split. The inits (the rows of CUPre's Table II):

- ``scratch``: the random network;
- ``ssl`` ("Cells-MoCo"): its encoder pretrained by self-supervision on the unlabelled target pool;
- ``source``: the whole network trained on the labelled source domain;
- ``cupre``: ``rounds`` AMT² rounds, each SSL of the encoder on the target pool, then source training
  under L2-SP towards the weights SSL left (:mod:`phenoscope.fewshot.amt2`);
- ``cupre++``: the CUPre network fine-tuned under L2-SP towards its pretrained ViT.

The shared phases are trained once, cached under ``<out>/phases/<name>/`` and resumed if stopped; a
fine-tuning run is done when its ``metrics.json`` exists, so rerunning the command continues the grid.
Each phase is the one training loop (``pretrain`` or ``train_segmentation``) with its CSV + PNG logs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from phenoscope.config import to_dict
from phenoscope.core.io import IMAGE_SUFFIXES, atomic_write, label_file_for
from phenoscope.fewshot.amt2 import Phase, amt2_schedule
from phenoscope.fewshot.split import FewShotSplit
from phenoscope.segment.net import CellposeSAMNet
from phenoscope.segment.training.run import SegLoopConfig, SegTrainConfig
from phenoscope.ssl.pretrain import PretrainConfig
from phenoscope.train.loop import CHECKPOINT, TRAINER_STATE

__all__ = ["INITS", "FewShotConfig", "FewShotData", "check_inputs", "evaluate", "run_grid"]

INITS = ("scratch", "ssl", "source", "cupre", "cupre++")


def _ssl_defaults() -> PretrainConfig:
    cfg = PretrainConfig(method="mocov3")
    return replace(cfg, mocov3=replace(cfg.mocov3, queue_size=4096, proj_hidden_dim=1024, pred_hidden_dim=1024))


def _finetune_defaults() -> SegTrainConfig:
    return SegTrainConfig(size_tiles=0, val_every=0, val_fraction=0.0, min_images_per_epoch=80,
                          train=SegLoopConfig(epochs=10, batch_size=8, lr=2e-4, warmup_epochs=1.0, schedule="cosine"))


@dataclass
class FewShotConfig:
    """The benchmark: data, split, grid and the recipe of each phase (``[ssl]``: a pretraining config;
    ``[source]`` and ``[finetune]``: segmentation training configs).

    Paths are relative to the working directory. ``split`` holds ``target_test.txt``, ``target_val.txt``,
    ``target_pool.txt`` and ``labelled_<percent>pc_seed<seed>.txt`` (one image stem per line,
    :func:`phenoscope.fewshot.write_split`), and optionally ``source.txt`` (the source images to use;
    default all). The target pool needs no labels; the test, validation and labelled images do.
    """

    source_images: str = ""
    source_labels: str = ""
    target_images: str = ""
    target_labels: str = ""
    split: str = ""
    model: str = "nano"  # variant, or a network file (ours or a cellpose cpsam checkpoint) every init starts from
    ssl_backbone: str = ""  # seg-<variant> of the encoder (default: seg-<model> for a named variant)
    inits: list[str] = field(default_factory=lambda: list(INITS))
    fractions: list[int] = field(default_factory=lambda: [5, 10])  # percent of the target pool labelled
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # fine-tuning seeds (and labelled subsets)
    rounds: int = 1  # AMT² rounds of CUPre
    l2sp_alpha: float = 0.5
    l2sp_strength: float = 1e-4
    ssl: PretrainConfig = field(default_factory=_ssl_defaults)
    source: SegTrainConfig = field(default_factory=lambda: SegTrainConfig(size_tiles=0, val_every=0, val_fraction=0.0))
    finetune: SegTrainConfig = field(default_factory=_finetune_defaults)


@dataclass(frozen=True)
class FewShotData:
    """The checked inputs: the split's image stems (``split.labelled`` keyed by (percent / 100, seed)) and
    the files training reads."""

    split: FewShotSplit
    labelled_files: dict[tuple[int, int], Path]  # (percent, seed) → id file
    pool_files: tuple[Path, ...]  # images of the target pool
    source_ids: Path | None  # id file restricting the source, if any
    ssl_backbone: str


def _stems(folder: str, what: str) -> dict[str, Path]:
    path = Path(folder)
    if not folder or not path.is_dir():
        raise ValueError(f"{what} folder not found: {folder or '(not set)'}")
    found = {p.stem: p for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    if not found:
        raise ValueError(f"no images in the {what} folder {path}")
    return found


def _ids(path: Path) -> tuple[str, ...]:
    from phenoscope.segment.training.data import read_ids

    if not path.is_file():
        raise ValueError(f"split file not found: {path}")
    ids = tuple(sorted(read_ids(path)))
    if not ids:
        raise ValueError(f"{path}: lists no image (a label fraction or split part that selects zero images)")
    return ids


def _labelled(ids: tuple[str, ...], where: str, images: dict[str, Path], labels: str) -> None:
    no_image = [i for i in ids if i not in images]
    no_label = [i for i in ids if i in images and label_file_for(images[i], Path(labels)) is None]
    for missing, what in ((no_image, "image"), (no_label, f"label file in {labels}")):
        if missing:
            raise ValueError(f"{where}: {len(missing)} id(s) have no {what}, e.g. {', '.join(missing[:3])}")


def _ssl_backbone(cfg: FewShotConfig) -> str:
    """seg-<variant> of the encoder, checked against ``cfg.model`` (``ValueError`` naming a mismatched file)."""
    from phenoscope.segment.checkpoint import check_encoder_fits, load_network
    from phenoscope.segment.net import VARIANTS, variant

    name = cfg.ssl_backbone or (f"seg-{cfg.model}" if cfg.model in VARIANTS else "")
    if not name.startswith("seg-") or name.removeprefix("seg-") not in VARIANTS:
        raise ValueError(f"ssl_backbone must be seg-<variant> ({', '.join(VARIANTS)}) for model {cfg.model!r}, got {name!r}")
    if cfg.model not in VARIANTS:  # the init network must be a network, and fit the encoder
        check_encoder_fits(load_network(cfg.model).cfg, variant(name.removeprefix("seg-")), cfg.model)
    return name


def check_inputs(cfg: FewShotConfig) -> FewShotData:
    """Every check that can fail before training: folders with images, split files that list images with
    label files, non-empty labelled fractions, known inits and a model that fits the SSL encoder.
    Raises ``ValueError`` (one line naming the file and the problem)."""
    unknown = sorted(set(cfg.inits) - set(INITS))
    if unknown or not cfg.inits:
        raise ValueError(f"unknown init(s) {unknown or '(none given)'}; choose from {INITS}")
    if not cfg.fractions or any(not 0 < f <= 100 for f in cfg.fractions):
        raise ValueError(f"label fractions must be percentages in (0, 100], got {cfg.fractions}")
    if not cfg.seeds:
        raise ValueError("no seeds given")
    source_images = _stems(cfg.source_images, "source image")
    target_images = _stems(cfg.target_images, "target image")
    split = Path(cfg.split)
    if not cfg.split or not split.is_dir():
        raise ValueError(f"split folder not found: {cfg.split or '(not set)'}")
    source_file = split / "source.txt"
    source = _ids(source_file) if source_file.is_file() else tuple(source_images)
    _labelled(source, str(source_file) if source_file.is_file() else cfg.source_images, source_images, cfg.source_labels)
    parts = {name: _ids(split / f"{name}.txt") for name in ("target_test", "target_val", "target_pool")}
    for name in ("target_test", "target_val"):
        _labelled(parts[name], str(split / f"{name}.txt"), target_images, cfg.target_labels)
    missing = [i for i in parts["target_pool"] if i not in target_images]
    if missing:
        raise ValueError(f"{split / 'target_pool.txt'}: {len(missing)} id(s) have no image, e.g. {', '.join(missing[:3])}")
    labelled, files = {}, {}
    for pc in cfg.fractions:
        for seed in cfg.seeds:
            path = split / f"labelled_{pc}pc_seed{seed}.txt"
            ids = _ids(path)
            _labelled(ids, str(path), target_images, cfg.target_labels)
            outside = sorted(set(ids) - set(parts["target_pool"]))
            if outside:
                raise ValueError(f"{path}: {len(outside)} id(s) are not in the target pool, e.g. {', '.join(outside[:3])}")
            labelled[(pc / 100, seed)], files[(pc, seed)] = ids, path
    overlap = sorted(set(parts["target_test"]) & (set(parts["target_pool"]) | set(parts["target_val"])))
    if overlap:
        raise ValueError(f"{split}: {len(overlap)} test id(s) are also in the pool or validation, e.g. {', '.join(overlap[:3])}")
    return FewShotData(FewShotSplit(source, parts["target_test"], parts["target_val"], parts["target_pool"], labelled),
                       files, tuple(target_images[i] for i in parts["target_pool"]),
                       source_file if source_file.is_file() else None, _ssl_backbone(cfg))


class _Timer:
    """Wall and CPU minutes of a phase, summed over the invocations that trained it (``timing.json``)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "timing.json"
        self.spent = json.loads(self.path.read_text()) if self.path.is_file() else {"wall_min": 0.0, "cpu_min": 0.0}

    def __enter__(self) -> _Timer:
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.spent["wall_min"] += (time.perf_counter() - self.t0) / 60
        self.spent["cpu_min"] += (time.process_time() - self.c0) / 60
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.path, "w") as fh:
            json.dump(self.spent, fh)


def _unfinished(summary: dict[str, Any], folder: Path) -> None:
    if not summary.get("finished", True):
        raise KeyboardInterrupt(f"stopped before {folder} finished (max_minutes / max_steps); rerun to continue")


def _ssl_phase(cfg: FewShotConfig, data: FewShotData, folder: Path, start: str) -> Path:
    """Self-supervised phase of the encoder on the unlabelled target pool (from ``start``: a network or
    encoder file; empty: random); returns its ``backbone.safetensors``."""
    from phenoscope.ssl.pretrain import pretrain

    out = folder / "backbone.safetensors"
    if not out.is_file():
        with _Timer(folder):
            pc = replace(cfg.ssl, backbone=data.ssl_backbone, init_checkpoint=start)
            _unfinished(pretrain(pc, list(data.pool_files), folder, resume=True), folder)
    return out


def _supervised(base: SegTrainConfig, images: str, labels: str, folder: Path, cache: Path, model: str, train_ids: Path | None,
                init_backbone: str = "", l2sp: float = 0.0, alpha: float = 0.5, seed: int | None = None,
                exclude: Path | None = None) -> Path:
    """Segmentation training of ``model`` (a variant or network file) on the listed images; returns its
    ``model.safetensors`` (trained once: an existing one is kept). Flows are cached in ``cache`` unless
    ``base.cache_dir`` names another folder."""
    from phenoscope.segment.training.run import train_segmentation

    out = folder / "model.safetensors"
    if not out.is_file():
        train = base.train if seed is None else replace(base.train, seed=seed)
        c = replace(base, model=model, init_backbone=init_backbone, train_ids=str(train_ids or ""), val_ids="",
                    exclude_ids=str(exclude or ""), l2sp_strength=l2sp, l2sp_alpha=alpha, train=train,
                    cache_dir=base.cache_dir or str(cache))
        with _Timer(folder):
            _unfinished(train_segmentation(c, images, labels, folder, resume=True), folder)
    return out


def _phase_l2sp(phase: Phase, cfg: FewShotConfig) -> float:
    """The L2-SP strength a supervised phase trains under: ``cfg.l2sp_strength`` where the schedule says so."""
    return cfg.l2sp_strength if phase.l2sp else 0.0


def _starts(cfg: FewShotConfig, data: FewShotData, out: Path, inits: list[str]) -> dict[str, tuple[str, str, float]]:
    """(model, init_backbone, L2-SP strength) of each fine-tuning init, training the shared phases it needs."""
    from phenoscope.segment.net import VARIANTS

    phases = out / "phases"
    starts: dict[str, tuple[str, str, float]] = {}
    def source(folder: Path, model: str, **kw: Any) -> Path:
        return _supervised(cfg.source, cfg.source_images, cfg.source_labels, folder, out / "flow_cache", model,
                           data.source_ids, **kw)

    if "scratch" in inits:
        starts["scratch"] = (cfg.model, "", 0.0)
    if {"ssl", "cupre", "cupre++"} & set(inits):
        first = _ssl_phase(cfg, data, phases / "ssl-1", "" if cfg.model in VARIANTS else cfg.model)
        starts["ssl"] = (cfg.model, str(first), 0.0)
    if "source" in inits:
        starts["source"] = (str(source(phases / "source", cfg.model)), "", 0.0)
    if {"cupre", "cupre++"} & set(inits):
        encoder, model = str(first), cfg.model
        for phase in amt2_schedule(cfg.rounds):
            if phase.kind == "ssl" and phase.name != "ssl-1":
                encoder = str(_ssl_phase(cfg, data, phases / f"cupre-{phase.name}", model))
            elif phase.kind == "source":
                model = str(source(phases / f"cupre-{phase.name}", model, init_backbone=encoder,
                                   l2sp=_phase_l2sp(phase, cfg), alpha=cfg.l2sp_alpha))
        for name, plus in (("cupre", False), ("cupre++", True)):
            starts[name] = (model, "", _phase_l2sp(amt2_schedule(cfg.rounds, plus)[-1], cfg))
    return {k: v for k, v in starts.items() if k in inits}


def evaluate(model: CellposeSAMNet | str | Path, images: str, labels: str, ids: tuple[str, ...]) -> dict[str, float]:
    """Scores of a network (or its file) on the listed target images at their native size: AP at IoU
    0.5 / 0.75 / 0.9 (cellpose's definition, mean over images) and COCO AP_segm / AP50_segm (LIVECell limits)."""
    import torch

    from phenoscope.eval.segmentation import average_precision, coco_ap
    from phenoscope.segment.checkpoint import load_network
    from phenoscope.segment.inference import CellposeSAM
    from phenoscope.segment.training.data import find_pairs, read_pairs

    net = model if isinstance(model, CellposeSAMNet) else load_network(model)
    read = read_pairs(find_pairs(images, labels, set(ids)), net.cfg)
    seg = CellposeSAM(net, torch.device("cpu"))
    preds = [seg.segment(np.moveaxis(image, 0, -1), channel_axis=-1).masks for image, _ in read]
    truth = [lab for _, lab in read]
    ap = average_precision(truth, preds, (0.5, 0.75, 0.9))[0].mean(axis=0)
    coco = coco_ap(truth, preds)
    return {"ap50": float(ap[0]), "ap75": float(ap[1]), "ap90": float(ap[2]), "coco_ap_segm": coco["AP"],
            "coco_ap50_segm": coco["AP50"]}


def run_grid(cfg: FewShotConfig, out: str | Path, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train what is missing of the grid, score every run, and write ``results.csv``, ``summary.csv``,
    ``phases.csv``, ``fewshot.png`` and ``report.html`` under ``out``; returns the result rows."""
    from phenoscope.fewshot.report import write_report
    from phenoscope.segment.checkpoint import load_network

    out = Path(out)
    data = check_inputs(cfg)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "config.json", "w") as fh:
        json.dump(to_dict(cfg), fh, indent=2)
    starts = _starts(cfg, data, out, cfg.inits)
    rows = []
    for init in cfg.inits:
        model, backbone, l2sp = starts[init]
        for pc in cfg.fractions:
            for seed in cfg.seeds:
                folder = out / "runs" / init / f"{pc}pc_seed{seed}"
                done = folder / "metrics.json"
                if not done.is_file():
                    log(f"fine-tuning {init} on {pc} % of the target labels, seed {seed}")
                    trained = _supervised(cfg.finetune, cfg.target_images, cfg.target_labels, folder, out / "flow_cache", model,
                                          data.labelled_files[(pc, seed)], backbone, l2sp, cfg.l2sp_alpha, seed,
                                          Path(cfg.split) / "target_test.txt")
                    net = load_network(trained)
                    row = {"init": init, "percent": pc, "seed": seed,
                           "n_labelled": len(data.split.labelled[(pc / 100, seed)]),
                           **evaluate(net, cfg.target_images, cfg.target_labels, data.split.target_test),
                           **{f"val_{k}": v for k, v in evaluate(net, cfg.target_images, cfg.target_labels,
                                                                   data.split.target_val).items() if k in ("ap50", "coco_ap_segm")},
                           "finetune_cpu_min": _Timer(folder).spent["cpu_min"]}
                    with atomic_write(done, "w") as fh:
                        json.dump(row, fh, indent=1)
                    for name in (CHECKPOINT, TRAINER_STATE):  # the run is final: keep the model, not the resume state
                        (folder / name).unlink(missing_ok=True)
                rows.append(json.loads(done.read_text()))
    write_report(rows, out)
    return rows
