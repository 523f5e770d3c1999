"""The "Segment" dock widget: Cellpose-SAM (or the classical baseline) on an image layer, in a worker thread.

The widget's buttons start napari thread workers (with napari's progress bar) and return at once, so
the viewer never freezes. "Recompute masks" reruns only the dynamics (``CellposeSAM.masks``, i.e.
:func:`phenoscope.segment.compute_masks`) on the flows and cell probability cached from the last run,
with the current thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, PushButton, SpinBox, create_widget

from phenoscope.segment.files import SegmentParams
from phenoscope.segment.options import MaskOptions

if TYPE_CHECKING:
    import napari

MODELS = ("default", "classic", "file")


@dataclass(frozen=True)
class SegmentOptions:
    """Widget settings: the model, and the run's parameters as ``phenoscope segment`` takes them (the
    channel axis comes from the layer, not from here)."""

    model: str = "default"  # "default", "classic" or a weights file path
    params: SegmentParams = SegmentParams()


@dataclass
class SegmentOutput:
    """One run's result: (H, W) masks, and for network models the model, (2, H, W) flows, (H, W) cellprob
    and the diameter used (px or None), which "Recompute masks" reuses."""

    masks: np.ndarray
    model: Any = None
    flows: np.ndarray | None = None
    cellprob: np.ndarray | None = None
    diameter: float | None = None


def channel_axis_of(data: np.ndarray, rgb: bool) -> int | None:
    """Channel axis of a napari image layer's data: last for RGB(A) layers, else guessed (None)."""
    return data.ndim - 1 if rgb else None


def segment_image(image: np.ndarray, options: SegmentOptions, channel_axis: int | None, models: dict[str, Any]) -> SegmentOutput:
    """Run one segmentation (no Qt; called in the worker thread). ``models`` caches loaded networks by name."""
    p = options.params
    if options.model == "classic":
        from phenoscope.segment import segment_classic

        return SegmentOutput(masks=segment_classic(image, channel_axis=channel_axis, min_size=p.options.min_size))
    from phenoscope.segment import load_model

    if options.model not in models:
        models[options.model] = load_model(options.model)
    model = models[options.model]
    res = model.segment(image, channel_axis, p.diameter, p.options, p.tile_overlap, p.batch_size, p.tta)
    return SegmentOutput(masks=res.masks, model=model, flows=res.flows, cellprob=res.cellprob, diameter=res.diameter)


def recompute_masks(cached: SegmentOutput, options: SegmentOptions) -> np.ndarray:
    """Masks from the cached flows and cellprob with new thresholds (the dynamics only)."""
    return cached.model.masks(cached.flows, cached.cellprob, cached.diameter, options.params.options)


class SegmentWidget(Container):
    """Dock widget: image layer, model, diameter, thresholds, tiling; Segment and Recompute masks."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.image = create_widget(annotation="napari.layers.Image", label="image")
        self.model = ComboBox(choices=MODELS, value="default", label="model")
        self.model_file = FileEdit(mode="r", label="model file", visible=False)
        self.diameter = FloatSpinBox(value=0.0, min=0.0, max=10_000.0, step=1.0, label="diameter (px, 0 = the model's estimate)")
        self.auto_diameter = CheckBox(value=False, text="estimate the diameter (auto)")
        self.flow_threshold = FloatSpinBox(value=0.4, min=0.0, max=10.0, step=0.05, label="flow threshold")
        self.cellprob_threshold = FloatSpinBox(value=0.0, min=-12.0, max=12.0, step=0.1, label="cellprob threshold")
        self.min_size = SpinBox(value=15, min=0, max=1_000_000, label="min size (px)")
        self.tile_overlap = FloatSpinBox(value=0.1, min=0.0, max=0.5, step=0.05, label="tile overlap")
        self.batch_size = SpinBox(value=8, min=1, max=512, label="tiles per batch")
        self.tta = CheckBox(value=False, text="flip test-time augmentation")
        self.show_flows = CheckBox(value=False, text="add a flows layer")
        self.show_cellprob = CheckBox(value=False, text="add a cellprob layer")
        self.segment_button = PushButton(text="Segment")
        self.recompute_button = PushButton(text="Recompute masks", enabled=False)
        self.extend([
            self.image, self.model, self.model_file, self.diameter, self.auto_diameter, self.flow_threshold,
            self.cellprob_threshold, self.min_size, self.tile_overlap, self.batch_size, self.tta,
            self.show_flows, self.show_cellprob, self.segment_button, self.recompute_button,
        ])
        self.model.changed.connect(self._model_changed)
        self.segment_button.changed.connect(self.run)
        self.recompute_button.changed.connect(self.recompute)
        self._models: dict[str, Any] = {}
        self._cached: SegmentOutput | None = None
        self._cached_layer: str | None = None
        self.worker = None  # the last started worker (tests and callers may wait on it)

    def _model_changed(self, value: str) -> None:
        self.model_file.visible = value == "file"

    def options(self) -> SegmentOptions:
        """The current settings; raises ``ValueError`` for a missing model file."""
        model = self.model.value
        if model == "file":
            path = Path(self.model_file.value)
            if not path.is_file():
                raise ValueError(f"model file not found: {path}")
            model = str(path)
        diameter: float | str | None = "auto" if self.auto_diameter.value else (self.diameter.value or None)
        masks = MaskOptions(flow_threshold=self.flow_threshold.value, cellprob_threshold=self.cellprob_threshold.value,
                            min_size=self.min_size.value)
        params = SegmentParams(diameter=diameter, options=masks, tile_overlap=self.tile_overlap.value, tta=self.tta.value,
                               batch_size=self.batch_size.value)
        return SegmentOptions(model=model, params=params)

    def _start(self, func, *args, desc: str, on_done):
        from napari.qt.threading import create_worker

        worker = create_worker(func, *args, _progress={"desc": desc}, _ignore_errors=True)
        worker.returned.connect(on_done)
        worker.errored.connect(self._failed)
        worker.finished.connect(self._idle)
        self.segment_button.enabled = self.recompute_button.enabled = False
        self.worker = worker
        worker.start()
        return worker

    def _failed(self, err: Exception) -> None:
        from napari.utils.notifications import show_error

        show_error(f"phenoscope: {str(err).splitlines()[0] if str(err) else type(err).__name__}")

    def _idle(self) -> None:
        self.segment_button.enabled = True
        self.recompute_button.enabled = self._cached is not None and self._cached.flows is not None

    def run(self):
        """Segment the selected image layer in a worker thread; returns the started worker (or None)."""
        from napari.utils.notifications import show_error

        layer = self.image.value
        if layer is None:
            show_error("phenoscope: choose an image layer to segment")
            return None
        if layer.multiscale or layer.data.ndim > 3 or (layer.data.ndim == 3 and not layer.rgb and layer.data.shape[0] > 3):
            show_error(f"phenoscope: layer {layer.name!r} is not a 2D image (shape {layer.data.shape}); "
                       "segment one plane or a channel stack of at most 3 channels")
            return None
        try:
            options = self.options()
        except ValueError as err:
            show_error(f"phenoscope: {err}")
            return None
        data = np.asarray(layer.data)
        name = layer.name
        return self._start(segment_image, data, options, channel_axis_of(data, layer.rgb), self._models,
                           desc=f"Segmenting {name}", on_done=lambda out: self._show(name, out, layer.scale[-2:],
                                                                                      layer.translate[-2:]))

    def recompute(self):
        """Rerun only the dynamics on the cached flows with the current thresholds; returns the worker."""
        if self._cached is None or self._cached.flows is None:
            return None
        cached, name = self._cached, self._cached_layer
        return self._start(recompute_masks, cached, self.options(), desc="Recomputing masks",
                           on_done=lambda masks: self._update_masks(name, masks))

    def _show(self, name: str, out: SegmentOutput, scale, translate) -> None:
        from phenoscope.segment.outputs import flow_rgb

        self._cached, self._cached_layer = out, name
        self._update_masks(name, out.masks, scale=scale, translate=translate)
        if out.flows is not None and self.show_flows.value:
            self._set_layer(f"{name}_flows", flow_rgb(out.flows), "image", rgb=True, scale=scale, translate=translate)
        if out.cellprob is not None and self.show_cellprob.value:
            self._set_layer(f"{name}_cellprob", out.cellprob, "image", colormap="magma", scale=scale, translate=translate)

    def _update_masks(self, name: str, masks: np.ndarray, **kwargs) -> None:
        self._set_layer(f"{name}_masks", masks, "labels", **kwargs)

    def _set_layer(self, name: str, data: np.ndarray, kind: str, **kwargs) -> None:
        if name in self.viewer.layers:
            self.viewer.layers[name].data = data
            return
        add = self.viewer.add_labels if kind == "labels" else self.viewer.add_image
        add(data, name=name, **kwargs)
