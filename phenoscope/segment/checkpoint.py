"""Segmentation checkpoints: import cellpose cpsam state dicts; save/load our own networks.

Cellpose files are read with ``torch.load(weights_only=True)`` (no code is unpickled). Our own models
are self-describing ``.safetensors`` checkpoints (:mod:`phenoscope.core.checkpoint`, kind ``cellpose-sam``:
the :class:`NetConfig`, percentile preprocessing and provenance in the metadata); files with the earlier
``.json`` sidecar still load. Self-supervised pretrained encoders (kind ``seg-encoder``, written by
``phenoscope pretrain --backbone seg-<variant>``) load into a network's encoder. Every load is strict; a mismatch raises ``ValueError`` listing missing,
unexpected and mis-shaped keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from phenoscope.core.checkpoint import Preprocessing, read_checkpoint, read_torch_weights, save_checkpoint
from phenoscope.core.state import load_state_strict
from phenoscope.segment.net import CellposeSAMNet, Encoder, NetConfig

KIND = "cellpose-sam"
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "default.safetensors"  # see models/default.md
ENCODER_KIND = "seg-encoder"
# NetConfig fields that shape the encoder's weights (nout, diam_mean and the channel rule do not)
_ENCODER_FIELDS = ("depth", "dim", "heads", "mlp_ratio", "patch", "tile", "in_chans", "neck_dim", "rel_pos_rows")
# keys of cellpose's CPSAM that hold no learnable state of ours
_CELLPOSE_EXTRA = ("W2", "diam_mean", "diam_labels")


def config_from_state(state: Mapping[str, torch.Tensor], diam_mean: float = 30.0) -> NetConfig:
    """Infer a :class:`NetConfig` from a (cellpose or phenoscope) state dict's tensor shapes."""
    try:
        proj = state["encoder.patch_embed.proj.weight"]  # (dim, in_chans, patch, patch)
        grid = state["encoder.pos_embed"].shape[1]
        depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.blocks."))
        head_dim = state["encoder.blocks.0.attn.rel_pos_h"].shape[1]
        rows = tuple(state[f"encoder.blocks.{i}.attn.rel_pos_h"].shape[0] for i in range(depth))
        dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
        cfg = NetConfig(
            depth=depth,
            dim=dim,
            heads=dim // head_dim,
            mlp_ratio=state["encoder.blocks.0.mlp.lin1.weight"].shape[0] / dim,
            patch=patch,
            tile=grid * patch,
            in_chans=in_chans,
            neck_dim=state["encoder.neck.0.weight"].shape[0],
            nout=state["out.weight"].shape[0] // patch**2,
            rel_pos_rows=() if set(rows) == {2 * grid - 1} else rows,
            diam_mean=diam_mean,
            skip=state["refine.stem.0.weight"].shape[0] if "refine.stem.0.weight" in state else 0,
            size_head="size.weight" in state,
            classes=state["classify.weight"].shape[0] // patch**2 - 1 if "classify.weight" in state else 0,
        )
    except (KeyError, ValueError, IndexError) as err:
        raise ValueError(f"not a Cellpose-SAM state dict (cannot infer shapes: {err!r})") from err
    return cfg


def import_cellpose_state(state: Mapping[str, torch.Tensor]) -> CellposeSAMNet:
    """Build and strictly load a network from a cellpose 4 ``CPSAM`` state dict.

    ``W2`` (the fixed readout scatter) must be the identity pattern that pixel-shuffle implements;
    ``diam_mean`` is kept in the config, ``diam_labels`` is unused by cellpose 4 inference.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "W2" not in state:
        raise ValueError("not a cellpose 4 (cpsam) state dict: key 'W2' is missing")
    if "encoder.cls_token" in state:
        raise ValueError("cellpose CPDINO checkpoints are not supported, only CPSAM")
    w2 = state["W2"]
    n = w2.shape[0]
    if w2.ndim != 4 or not torch.equal(w2.reshape(n, -1).float(), torch.eye(n)):
        raise ValueError("cpsam 'W2' is not the identity readout; this checkpoint cannot be mapped to pixel-shuffle")
    diam = float(state["diam_mean"].reshape(-1)[0]) if "diam_mean" in state else 30.0
    weights = {k: v.float() for k, v in state.items() if k not in _CELLPOSE_EXTRA}
    net = CellposeSAMNet(config_from_state(weights, diam_mean=diam))
    load_state_strict(net, weights, "cellpose checkpoint")
    return net


def load_cellpose_checkpoint(path: str | Path) -> CellposeSAMNet:
    """Read a cellpose cpsam file (``torch.save`` of a state dict) safely and import it."""
    return import_cellpose_state(read_torch_weights(path))


def save_model(net: CellposeSAMNet, path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write the network as a self-describing checkpoint (``.safetensors``, :mod:`phenoscope.core.checkpoint`)."""
    return save_checkpoint(path, net.state_dict(), KIND, dataclasses.asdict(net.cfg), Preprocessing(normalize="percentile"),
                           provenance)


def net_config(config: Mapping[str, Any], where: str) -> NetConfig:
    """:class:`NetConfig` from its JSON form (lists back to tuples); unknown fields are an error naming ``where``."""
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(NetConfig)})
    if unknown:
        raise ValueError(f"{where}: unknown config field(s) {unknown}")
    return NetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})


def load_saved_model(path: str | Path) -> CellposeSAMNet:
    """Load a network written by :func:`save_model` (or its earlier ``.json``-sidecar form), strictly."""
    ckpt = read_checkpoint(path)
    if ckpt.kind != KIND:
        raise ValueError(f"{path}: a {ckpt.kind!r} checkpoint, not a segmentation network ({KIND!r})")
    if ckpt.preprocessing.normalize != "percentile":
        raise ValueError(f"{path}: segmentation needs percentile normalisation, checkpoint records {ckpt.preprocessing.normalize!r}")
    net = CellposeSAMNet(net_config(ckpt.config, str(path)))
    load_state_strict(net, ckpt.state, str(path))
    return net


def model_path(model: str | Path) -> Path:
    """The weights file of ``model``: ``"default"`` is the shipped model, anything else a path."""
    return DEFAULT_MODEL if str(model) == "default" else Path(model)


def load_network(path: str | Path) -> CellposeSAMNet:
    """Load a network from our ``.safetensors`` format or a cellpose cpsam checkpoint (``"default"``: the shipped one)."""
    path = model_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    return load_saved_model(path) if path.suffix == ".safetensors" else load_cellpose_checkpoint(path)


def save_encoder(
    encoder: Encoder, path: str | Path, preprocessing: Preprocessing | None = None, provenance: dict[str, Any] | None = None
) -> Path:
    """Write a (pretrained) encoder as a self-describing checkpoint of kind ``seg-encoder`` (config: its :class:`NetConfig`)."""
    return save_checkpoint(path, encoder.state_dict(), ENCODER_KIND, dataclasses.asdict(encoder.cfg), preprocessing, provenance)


def encoder_weights(path: str | Path, cfg: NetConfig) -> dict[str, torch.Tensor]:
    """The encoder weights of ``path`` for an encoder of config ``cfg``: a ``seg-encoder`` checkpoint (with
    the SSL-only ``mask_token``), or the encoder of a whole network (ours or cellpose's).

    ``ValueError`` naming the file if it is another kind or if its config differs from ``cfg`` in a field
    that shapes the encoder (listing the differences)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init backbone not found: {path}")
    ckpt = read_checkpoint(path) if path.suffix == ".safetensors" else None
    if ckpt is not None and ckpt.kind == ENCODER_KIND:
        found, state = net_config(ckpt.config, str(path)), dict(ckpt.state)
    elif ckpt is None or ckpt.kind == KIND:
        net = load_network(path)
        found, state = net.cfg, net.encoder.state_dict()
    else:
        raise ValueError(f"{path}: a {ckpt.kind!r} checkpoint, not a segmentation encoder ({ENCODER_KIND!r}) or network")
    check_encoder_fits(found, cfg, path)
    return state


def check_encoder_fits(found: NetConfig, cfg: NetConfig, where: str | Path) -> None:
    """``ValueError`` naming ``where`` and listing the fields that shape the encoder's weights in which the
    config ``found`` (a file's) differs from ``cfg`` (the network's)."""
    diff = [f"{name}: checkpoint {getattr(found, name)!r}, network {getattr(cfg, name)!r}"
            for name in _ENCODER_FIELDS if getattr(found, name) != getattr(cfg, name)]
    if diff:
        raise ValueError(f"{where}: encoder config does not match the network ({'; '.join(diff)})")


def load_encoder_into(net: CellposeSAMNet, path: str | Path) -> None:
    """Copy the encoder weights of ``path`` (:func:`encoder_weights`; not its mask token, which the
    segmentation network has none of) into ``net.encoder``, strictly (``ValueError`` with the key diff)."""
    state = encoder_weights(path, net.cfg)
    state.pop("mask_token", None)
    load_state_strict(net.encoder, state, str(path))


def load_encoder(path: str | Path, cfg: NetConfig) -> Encoder:
    """A pretrainable encoder of config ``cfg`` started from the encoder weights of ``path``
    (:func:`encoder_weights`), strictly; its mask token is the file's, or fresh if the file has none."""
    enc = Encoder(cfg, mask_token=True)
    state = encoder_weights(path, cfg)
    state.setdefault("mask_token", enc.mask_token.detach().clone())
    load_state_strict(enc, state, str(path))
    return enc
