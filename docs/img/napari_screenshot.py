"""Make docs/img/napari.png: the demo sample segmented with the phenoscope napari plugin's Segment widget.

Needs a display with OpenGL; headless: ``xvfb-run -a python docs/img/napari_screenshot.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch._dynamo  # noqa: F401  (triton before Mesa's OpenGL; see tests/test_napari.py)


def main(out: Path) -> None:
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(title="phenoscope")
    viewer.window.resize(1400, 820)
    viewer.open_sample("phenoscope", "nuclei")
    _, widget = viewer.window.add_plugin_dock_widget("phenoscope", "Segment")
    widget.reset_choices()
    widget.run()
    while not widget.segment_button.enabled:  # the worker thread is running
        QApplication.processEvents()
    viewer.layers["nuclei_masks"].contour = 2
    viewer.reset_view()
    QApplication.processEvents()
    from PIL import Image

    rgba = viewer.screenshot(canvas_only=False)  # (H, W, 4) uint8
    Image.fromarray(rgba[..., :3]).save(out, optimize=True)  # RGB (palettes drop the thin mask contours)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("napari.png"))
