"""Checkpoints: import cellpose cpsam state dicts; save/load our own as safetensors + JSON.

Cellpose files are read with ``torch.load(weights_only=True)`` (no code is unpickled). Our own models
are ``<name>.safetensors`` with ``<name>.json`` beside it holding the :class:`NetConfig`.
Every load is strict; a mismatch raises ``ValueError`` listing missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from phenoscope.core.io import atomic_path, atomic_write
from phenoscope.core.state import load_state_strict
from phenoscope.segment.net import CellposeSAMNet, NetConfig

FORMAT = "phenoscope-cellpose-sam"
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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, zip errors, forbidden globals
        raise ValueError(f"{path}: not a loadable weights-only torch checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return import_cellpose_state(state)


def _json_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_model(net: CellposeSAMNet, path: str | Path) -> Path:
    """Write ``path`` (``.safetensors``) and its hyper-parameters to ``path.with_suffix('.json')`` atomically."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(".safetensors")
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "version": 1, "config": dataclasses.asdict(net.cfg)}
    with atomic_write(_json_path(path), "w") as fh:
        json.dump(meta, fh, indent=2)
    return path


def load_saved_model(path: str | Path) -> CellposeSAMNet:
    """Load a network written by :func:`save_model` (strict)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = _json_path(path)
    if not meta_path.exists():
        raise ValueError(f"{path}: hyper-parameter file {meta_path.name} is missing beside the weights")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: not a {FORMAT} model description (format={meta.get('format')!r})")
    fields = {f.name for f in dataclasses.fields(NetConfig)}
    unknown = sorted(set(meta["config"]) - fields)
    if unknown:
        raise ValueError(f"{meta_path}: unknown config field(s) {unknown}")
    cfg = NetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    net = CellposeSAMNet(cfg)
    load_state_strict(net, load_file(str(path)), str(path))
    return net


def load_network(path: str | Path) -> CellposeSAMNet:
    """Load a network from our ``.safetensors`` format or from a cellpose cpsam checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    return load_saved_model(path) if path.suffix == ".safetensors" else load_cellpose_checkpoint(path)
