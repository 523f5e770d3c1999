"""One self-describing checkpoint format for every model kind, and safe reading of third-party weights.

A phenoscope checkpoint is one ``.safetensors`` file. Its string metadata holds:

- ``format`` = ``"phenoscope"``, ``version`` = ``"2"``;
- ``kind``: what the weights are (``cellpose-sam`` network, ``vit`` backbone, ``seg-encoder`` backbone, ...);
- ``config``: the model's hyper-parameters (JSON of its config dataclass);
- ``preprocessing``: how inputs must be prepared (JSON of :class:`Preprocessing`);
- ``provenance``: the command, config and data that produced it (JSON, free form).

Files written before this format still load: a safetensors with ``vit_config`` metadata (SSL backbone;
its preprocessing is read from the ``config.json`` that ``phenoscope pretrain`` wrote beside it, if
any) and a ``phenoscope-cellpose-sam`` safetensors with its ``.json`` sidecar (segmentation network).
Torch files (cellpose, dinov2) are read with ``weights_only=True``: no code in them runs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from phenoscope.core.io import atomic_path

FORMAT = "phenoscope"
VERSION = "2"
NORMALIZE_MODES = ("percentile", "channel", "image", "dataset")
_LEGACY_SEG_FORMAT = "phenoscope-cellpose-sam"


@dataclass
class Preprocessing:
    """How a model's inputs are prepared (recorded at training, applied at inference).

    normalize: ``percentile`` (per-channel 1–99 %, segmentation), ``channel`` / ``image``
        (self-normalisation of every crop to zero mean, unit variance per channel / over the crop),
        or ``dataset`` (fixed ``channel_mean`` / ``channel_std``).
    channel_names: names of the input channels in order, if known.
    bag_of_channels: the backbone is 1-channel and embeds every channel separately.
    input_size: side in pixels of the images the model was trained on (0: unknown).
    """

    normalize: str = "channel"
    channel_mean: list[float] | None = None
    channel_std: list[float] | None = None
    channel_names: list[str] | None = None
    bag_of_channels: bool = False
    input_size: int = 0

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {self.normalize!r}")
        if self.normalize == "dataset":
            if not self.channel_mean or not self.channel_std or len(self.channel_mean) != len(self.channel_std):
                raise ValueError("normalize='dataset' needs channel_mean and channel_std of equal length")
            if min(self.channel_std) <= 0:
                raise ValueError(f"channel_std must be > 0, got {self.channel_std}")


@dataclass
class Checkpoint:
    """A checkpoint read back: weights, kind, model config, preprocessing and provenance."""

    state: dict[str, torch.Tensor]
    kind: str
    config: dict[str, Any]
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    provenance: dict[str, Any] = field(default_factory=dict)


def provenance(**extra: Any) -> dict[str, Any]:
    """The command line and phenoscope version, plus ``extra`` (e.g. ``config=``, ``data=``)."""
    from phenoscope import __version__

    return {"command": " ".join(sys.argv), "phenoscope": __version__, **extra}


def save_weights(path: str | Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Write tensors (made contiguous, on CPU) to a safetensors file atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))
    return Path(path)


def save_checkpoint(
    path: str | Path,
    state: Mapping[str, torch.Tensor],
    kind: str,
    config: Mapping[str, Any],
    preprocessing: Preprocessing | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write a self-describing checkpoint (see the module docstring); returns its path (``.safetensors``)."""
    import dataclasses

    path = Path(path).with_suffix(".safetensors")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "config": json.dumps(dict(config)),
        "preprocessing": json.dumps(dataclasses.asdict(preprocessing or Preprocessing())),
        "provenance": json.dumps(dict(provenance or {})),
    }
    return save_weights(path, state, meta)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file; ``ValueError`` naming the file if it is not one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: corrupt or not a safetensors file ({err})") from None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a phenoscope checkpoint (current or earlier format); ``ValueError`` naming the file otherwise."""
    from safetensors.torch import load_file

    from phenoscope.config import from_dict

    path = Path(path)
    meta = read_metadata(path)
    if meta.get("format") == FORMAT:
        kind, config = meta["kind"], json.loads(meta["config"])
        prep = from_dict(Preprocessing, json.loads(meta.get("preprocessing", "{}")), f"{path}: preprocessing")
        prov = json.loads(meta.get("provenance", "{}"))
    elif "vit_config" in meta:  # SSL backbone written by earlier save_backbone
        kind, config, prov = "vit", json.loads(meta["vit_config"]), {}
        prep = _legacy_pretrain_preprocessing(path)
    elif meta.get("format") == _LEGACY_SEG_FORMAT:  # segmentation network with a .json sidecar
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            raise ValueError(f"{path}: hyper-parameter file {sidecar.name} is missing beside the weights")
        description = json.loads(sidecar.read_text())
        if description.get("format") != _LEGACY_SEG_FORMAT:
            raise ValueError(f"{sidecar}: not a {_LEGACY_SEG_FORMAT} model description (format={description.get('format')!r})")
        kind, config, prov = "cellpose-sam", description["config"], {}
        prep = Preprocessing(normalize="percentile")
    else:
        raise ValueError(f"{path}: a safetensors file without phenoscope metadata (not written by phenoscope)")
    return Checkpoint(load_file(str(path)), kind, config, prep, prov)


def _legacy_pretrain_preprocessing(path: Path) -> Preprocessing:
    """Preprocessing of an earlier-format backbone: from the ``config.json`` of its pretraining run
    beside it (``augment.normalize`` and channel statistics, ``bag_of_channels``), else self-normalisation."""
    run_config = path.parent / "config.json"
    if not run_config.is_file():
        return Preprocessing()
    cfg = json.loads(run_config.read_text())
    aug = cfg.get("augment", {})
    return Preprocessing(
        normalize=aug.get("normalize", "channel"),
        channel_mean=aug.get("channel_mean"),
        channel_std=aug.get("channel_std"),
        bag_of_channels=bool(cfg.get("bag_of_channels", False)),
        input_size=int(aug.get("global_size", 0)),
    )


def read_torch_weights(path: str | Path) -> dict[str, Any]:
    """A ``torch.save`` state dict read with ``weights_only=True``; a file that needs code to unpickle is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and forbidden-global errors all mean: not plain weights
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise ValueError(f"{path}: contains non-tensor objects; refused (weights are loaded without executing code)") from None
        raise ValueError(f"{path}: not a readable torch weights file ({type(err).__name__})") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return dict(state)


def read_weights(path: str | Path) -> dict[str, Any]:
    """Tensors of a ``.safetensors`` file or of a ``torch.save`` state dict (see :func:`read_torch_weights`)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        read_metadata(path)  # a clear error for missing or corrupt files
        return load_file(str(path))
    return read_torch_weights(path)
