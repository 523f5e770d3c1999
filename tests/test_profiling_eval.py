"""Evaluation probes, figures and the ``phenoscope profile`` CLI."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from phenoscope.cli import main
from phenoscope.profiling import figures


def test_confusion_and_report(tmp_path) -> None:
    pngs = [figures.plot_confusion(["a", "b", "a"], ["a", "a", "a"], tmp_path / "cm.png")]
    report = figures.write_report(pngs, tmp_path / "report.html")
    assert "cm.png" in report.read_text() and all(p.stat().st_size > 1000 for p in pngs)


def test_profile_cli_on_bbbc021(bbbc021_dir, tmp_path, capsys) -> None:
    from phenoscope.datasets.bbbc021 import load_bbbc021

    table = tmp_path / "wells.parquet"
    load_bbbc021(bbbc021_dir).to_parquet(table)
    assert main(["profile", str(table), "--out", str(tmp_path / "out"), "--batch-column", "Metadata_Batch", "--no-figures"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert metrics["NSC"] >= 0.90 and 0 < metrics["NSCB"] < metrics["NSC"]
    assert len(pd.read_parquet(tmp_path / "out" / "profiles.parquet")) == 104


@pytest.mark.slow
def test_profile_cli_figures(bbbc021_dir, tmp_path) -> None:
    from phenoscope.datasets.bbbc021 import load_bbbc021

    table = tmp_path / "wells.csv"
    load_bbbc021(bbbc021_dir).to_csv(table, index=False)
    assert main(["profile", str(table), "--out", str(tmp_path / "out")]) == 0
    for name in ("umap.png", "similarity.png", "confusion_nsc.png", "report.html"):
        assert (tmp_path / "out" / name).stat().st_size > 0
