"""``phenoscope export-bioimageio``: the exported default model passes bioimageio.core's ``test_model``
(both weight formats), and its TorchScript reproduces our network within 1e-5 on the test tensor."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from phenoscope.cli import main

pytest.importorskip("bioimageio.core")

ROUND_TRIP_ATOL = 1e-5  # acceptance: |torchscript - phenoscope| on the test tensor


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    out = tmp_path_factory.mktemp("bioimageio") / "default.zip"
    assert main(["export-bioimageio", "default", "--out", str(out), "--no-test"]) == 0
    return out


def test_package_passes_bioimageio_test_model(package):
    from bioimageio.core import test_model

    summary = test_model(package)
    assert summary.status == "passed", summary.format()
    tested = {d.name for d in summary.details if d.status == "passed"}
    assert any("pytorch_state_dict" in name for name in tested) and any("torchscript" in name for name in tested)


def test_description_fields(package):
    from bioimageio.spec import load_model_description

    descr = load_model_description(package)
    assert descr.format_version.startswith("0.5")
    assert descr.weights.pytorch_state_dict is not None and descr.weights.torchscript is not None
    (inp,), (out,) = descr.inputs, descr.outputs
    assert [a.type for a in inp.axes] == ["batch", "channel", "space", "space"]
    assert [a.type for a in out.axes] == ["batch", "channel", "space", "space"]
    assert all(a.halo > 0 for a in out.axes[2:])
    (scale,) = [p for p in inp.preprocessing if p.id == "scale_range"]
    assert (scale.kwargs.min_percentile, scale.kwargs.max_percentile) == (1.0, 99.0)  # phenoscope's normalisation
    assert str(descr.license) == "BSD-3-Clause" and descr.cite and descr.covers and descr.authors
    with zipfile.ZipFile(package) as zf:
        readme = zf.read("README.md").decode()
    assert "\n# Validation\n" in readme and "AP@0.5" in readme  # the model card's held-out results


def test_torchscript_round_trip(package, tmp_path):
    from phenoscope.core.normalize import normalize_percentile
    from phenoscope.segment import load_model

    with zipfile.ZipFile(package) as zf:
        zf.extractall(tmp_path)
    raw = np.load(tmp_path / "test_input.npy")
    scripted = torch.jit.load(str(tmp_path / "weights_torchscript.pt"))
    norm = normalize_percentile(raw[0], channel_axis=0)[None]
    with torch.inference_mode():
        got = scripted(torch.from_numpy(norm)).numpy()
    ours = load_model("default", device="cpu").forward_tiles(norm)
    np.testing.assert_allclose(got, ours, rtol=0, atol=ROUND_TRIP_ATOL)
    # the stored test output is ours from the exporting process (oneDNN sums may differ in the last bits)
    np.testing.assert_allclose(np.load(tmp_path / "test_output.npy"), ours, rtol=0, atol=ROUND_TRIP_ATOL)


def test_bad_model_is_one_line(tmp_path, capsys):
    assert main(["export-bioimageio", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "m.zip")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.safetensors" in err
