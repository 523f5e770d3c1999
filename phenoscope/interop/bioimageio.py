"""Export a Cellpose-SAM network as a BioImage Model Zoo (bioimage.io) model package, format 0.5.

The package holds the network (``pytorch_state_dict`` weights, built by :func:`build_network`, and
``torchscript`` weights traced from it), one test tensor pair, a cover image, a README (the model card
with a ``# Validation`` section), the license and citations. Its tensors:

- input ``raw``: (batch, channel = 3, y = tile, x = tile) float32 raw intensities; gray images go in
  channel 0 with channels 1–2 zero (as phenoscope feeds them). Preprocessing ``scale_range``: each
  channel's 1st percentile → 0 and 99th → 1 over (y, x), phenoscope's normalisation.
- output ``flows``: (batch, channel = dY, dX, cellprob, y, x) float32 at the network's scale (flows ≈ 5 ×
  unit vectors, cellprob logits), with a halo of ``tile // 8`` px to crop when tiling. Masks come from
  these with cellpose's dynamics (``phenoscope.segment.compute_masks``).
"""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from phenoscope.segment.net import CellposeSAMNet, NetConfig

CHANNELS = ("c0", "c1", "c2")
OUTPUT_CHANNELS = ("dy", "dx", "cellprob")
PERCENTILES = (1.0, 99.0)  # phenoscope.core.normalize defaults
CITATIONS = (
    ("Stringer, Wang, Michaelos, Pachitariu (2021). Cellpose: a generalist algorithm for cellular "
     "segmentation. Nature Methods 18, 100-106.", "10.1038/s41592-020-01018-x"),
    ("Pachitariu, Rariden, Stringer (2025). Cellpose-SAM: superhuman generalization for cellular "
     "segmentation. bioRxiv.", "10.1101/2025.04.28.651001"),
    ("Caicedo et al. (2019). Nucleus segmentation across imaging experiments: the 2018 Data Science "
     "Bowl. Nature Methods 16, 1247-1253 (training data).", "10.1038/s41592-019-0612-7"),
)


def build_network(**config: object) -> CellposeSAMNet:
    """The ``pytorch_state_dict`` architecture: a :class:`CellposeSAMNet` from :class:`NetConfig` fields
    (as JSON values: lists for tuples)."""
    fields = {f.name for f in dataclasses.fields(NetConfig)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"unknown NetConfig field(s) {unknown}")
    cfg = NetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    return CellposeSAMNet(cfg).eval()


@dataclass
class ExportReport:
    """What :func:`export_bioimageio` wrote and measured."""

    path: Path  # the .zip package
    max_abs_diff: float  # torchscript vs phenoscope outputs on the test tensor (all three channels)
    test_input: np.ndarray  # (1, 3, tile, tile) float32 raw
    test_output: np.ndarray  # (1, 3, tile, tile) float32 phenoscope network output


def test_tensors(net: CellposeSAMNet, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw input, normalised input, our output), each (1, 3, tile, tile) float32, on the centre crop
    of the generated demo sample (``phenoscope.datasets.synthetic_nuclei``)."""
    from phenoscope.core.normalize import normalize_percentile
    from phenoscope.datasets import synthetic_nuclei
    from phenoscope.segment.inference import CellposeSAM

    t, c = net.cfg.tile, net.cfg.in_chans
    image, _ = synthetic_nuclei(shape=(max(256, t), max(256, t)), n=max(20, t * t // 800), seed=seed)
    y0 = (image.shape[0] - t) // 2
    raw = np.zeros((1, c, t, t), np.float32)
    raw[0, 0] = image[y0 : y0 + t, y0 : y0 + t]
    lo, hi = PERCENTILES
    norm = normalize_percentile(raw[0], channel_axis=0, lower=lo, upper=hi)[None]
    out = CellposeSAM(net, "cpu").forward_tiles(norm)
    return raw, norm, out


def trace_torchscript(net: CellposeSAMNet, example: np.ndarray) -> torch.jit.ScriptModule:
    """Trace the network on its portable path (plain ``F.linear``; no CPU-only oneDNN ops), so the
    TorchScript runs on any device."""
    net = net.cpu().eval()
    x = torch.from_numpy(example)
    params = [p.requires_grad for p in net.parameters()]
    for p in net.parameters():
        p.requires_grad_(True)
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            # deprecation notice of jit.trace; shape checks recorded as constants (the input size is fixed)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(net, x, check_trace=False)
    finally:
        for p, flag in zip(net.parameters(), params):
            p.requires_grad_(flag)
    for p in traced.parameters():
        p.requires_grad_(False)
    return traced


def cover_image(raw: np.ndarray, output: np.ndarray, niter: int = 200) -> np.ndarray:
    """(tile, 2·tile, 3) uint8: the test input beside its masks (outlines on the input)."""
    from phenoscope.core.normalize import normalize_percentile
    from phenoscope.segment import compute_masks
    from phenoscope.segment.outputs import overlay_rgb

    masks = compute_masks(output[0, :2], output[0, 2], niter=niter)
    gray = (np.clip(normalize_percentile(raw[0, 0]), 0, 1) * 255).astype(np.uint8)
    left = np.repeat(gray[..., None], 3, axis=-1)
    right = overlay_rgb(raw[0, 0][..., None], masks)
    return np.concatenate([left, right], axis=1)


def readme_text(card: str | None, name: str, max_abs_diff: float, tile: int) -> str:
    """The package README: the model card (if any) and the export's own checks under ``# Validation``."""
    lines = [f"# {name}", ""]
    if card:
        body = card.split("\n", 1)[1] if card.startswith("# ") else card
        lines += [body.strip(), ""]
    lines += [
        "# Validation",
        "",
        "Accuracy: see the model card above (phenoscope's held-out evaluation), if present.",
        "",
        "Export checks, made when this package was written:",
        f"- the TorchScript weights reproduce phenoscope's network on the test tensor within "
        f"{max_abs_diff:.2e} (max absolute difference over dY, dX and cellprob);",
        "- `bioimageio.core.test_model` runs both weight formats on the test tensor.",
        "",
        "# Use",
        "",
        f"Input: raw intensities as (batch, 3, {tile}, {tile}); gray images in channel 0, channels 1-2 zero. "
        f"Tile larger images with the output halo. Output channels dY, dX, cellprob: turn them into masks "
        "with cellpose's dynamics, e.g. `phenoscope.segment.compute_masks(out[:2], out[2])`. "
        "The `pytorch_state_dict` weights need `phenoscope` installed; the TorchScript weights run alone.",
        "",
    ]
    return "\n".join(lines)


def model_description(
    folder: Path, net: CellposeSAMNet, name: str, authors: list[str], description: str, halo: int,
):
    """A ``bioimageio.spec.model.v0_5.ModelDescr`` for the files written in ``folder``."""
    from bioimageio.spec.model import v0_5 as bio

    t = net.cfg.tile
    raw_id, out_id = bio.TensorId("raw"), bio.TensorId("flows")
    preprocessing = [bio.ScaleRangeDescr(kwargs=bio.ScaleRangeKwargs(
        axes=(bio.AxisId("y"), bio.AxisId("x")), min_percentile=PERCENTILES[0], max_percentile=PERCENTILES[1]))]
    inputs = [bio.InputTensorDescr(
        id=raw_id,
        description="raw intensities; gray images in channel 0, other channels zero",
        axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier(c) for c in CHANNELS]),
              bio.SpaceInputAxis(id=bio.AxisId("y"), size=t), bio.SpaceInputAxis(id=bio.AxisId("x"), size=t)],
        test_tensor=bio.FileDescr(source=folder / "test_input.npy"),
        sample_tensor=bio.FileDescr(source=folder / "sample_input.png"),
        data=bio.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=preprocessing,
    )]
    outputs = [bio.OutputTensorDescr(
        id=out_id,
        description="flows (dY, dX; about 5 x unit vectors) and cell-probability logits",
        axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier(c) for c in OUTPUT_CHANNELS]),
              bio.SpaceOutputAxisWithHalo(id=bio.AxisId("y"), halo=halo,
                                          size=bio.SizeReference(tensor_id=raw_id, axis_id=bio.AxisId("y"))),
              bio.SpaceOutputAxisWithHalo(id=bio.AxisId("x"), halo=halo,
                                          size=bio.SizeReference(tensor_id=raw_id, axis_id=bio.AxisId("x")))],
        test_tensor=bio.FileDescr(source=folder / "test_output.npy"),
        sample_tensor=bio.FileDescr(source=folder / "sample_output.png"),
        data=bio.IntervalOrRatioDataDescr(type="float32"),
    )]
    version = bio.Version(torch.__version__.split("+")[0])
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(net.cfg).items()}
    weights = bio.WeightsDescr(
        pytorch_state_dict=bio.PytorchStateDictWeightsDescr(
            source=folder / "weights.pt", pytorch_version=version,
            architecture=bio.ArchitectureFromLibraryDescr(
                callable=bio.Identifier("build_network"), import_from="phenoscope.interop.bioimageio", kwargs=config),
        ),
        torchscript=bio.TorchscriptWeightsDescr(
            source=folder / "weights_torchscript.pt", pytorch_version=version, parent="pytorch_state_dict"),
    )
    return bio.ModelDescr(
        name=name,
        description=description,
        authors=[bio.Author(name=a) for a in authors],
        cite=[bio.CiteEntry(text=text, doi=bio.Doi(doi)) for text, doi in CITATIONS],
        license=bio.LicenseId("BSD-3-Clause"),
        documentation=bio.FileDescr(source=folder / "README.md"),
        covers=[bio.FileDescr(source=folder / "cover.png")],
        tags=["cellpose", "cellpose-sam", "instance-segmentation", "nuclei", "cells", "2d", "fluorescence", "pytorch"],
        inputs=inputs,
        outputs=outputs,
        weights=weights,
    )


def _write_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(path, format="PNG")


def export_bioimageio(
    model: str | Path = "default",
    out: str | Path = "model.zip",
    name: str | None = None,
    authors: tuple[str, ...] = ("phenoscope maintainers",),
    description: str | None = None,
    seed: int = 0,
) -> ExportReport:
    """Write a bioimage.io model package (.zip) for ``model`` ("default" or a weights file).

    The test tensors are the centre tile of the generated demo sample; the TorchScript is checked
    against phenoscope's own network on it (``ExportReport.max_abs_diff``). The zip is written
    atomically. Raises ``FileNotFoundError`` / ``ValueError`` for a missing or unloadable model.
    """
    from bioimageio.spec import save_bioimageio_package

    from phenoscope.core.io import atomic_path
    from phenoscope.segment.checkpoint import load_network, model_path

    path = model_path(model)
    net = load_network(path).cpu().eval()
    card_path = path.with_suffix(".md")
    card = card_path.read_text() if card_path.is_file() else None
    name = name or f"phenoscope Cellpose-SAM ({path.stem})"
    description = description or (
        f"Cellpose-SAM network ({net.cfg.depth} blocks x {net.cfg.dim} dims, {net.cfg.tile} px tiles) "
        "predicting flows and cell probability for cell and nucleus instance segmentation, exported by phenoscope."
    )
    raw, norm, ours = test_tensors(net, seed)
    traced = trace_torchscript(net, norm)
    with torch.inference_mode():
        scripted = traced(torch.from_numpy(norm)).numpy()
    diff = float(np.abs(scripted - ours).max())
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="phenoscope-bioimageio-") as tmp:
        folder = Path(tmp)
        np.save(folder / "test_input.npy", raw)
        np.save(folder / "test_output.npy", ours)
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, folder / "weights.pt")
        traced.save(str(folder / "weights_torchscript.pt"))
        cover = cover_image(raw, ours)
        _write_png(folder / "cover.png", cover)
        _write_png(folder / "sample_input.png", cover[:, : net.cfg.tile])
        _write_png(folder / "sample_output.png", cover[:, net.cfg.tile :])
        (folder / "README.md").write_text(readme_text(card, name, diff, net.cfg.tile))
        descr = model_description(folder, net, name, list(authors), description, halo=net.cfg.tile // 8)
        with atomic_path(out) as tmp_zip:
            tmp_zip.unlink()
            save_bioimageio_package(descr, output_path=tmp_zip)
    return ExportReport(path=out, max_abs_diff=diff, test_input=raw, test_output=ours)
