"""``phenoscope profile`` on the shipped BBBC021 tables, its flags, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from phenoscope.cli import main
from phenoscope.profiling import figures

REPO = Path(__file__).resolve().parents[1]
MORPHEUS = "BBBC021_feature_selected_mad_robustize.csv"


def _small_table(path: Path) -> Path:
    """A per-well table: 2 plates × (4 DMSO + 2 compounds × 2 wells), MoA labels."""
    rng = np.random.default_rng(0)
    rows = []
    for plate in ("P1", "P2"):
        for i, (cpd, moa) in enumerate([("DMSO", "DMSO")] * 4 + [("a", "m1")] * 2 + [("b", "m1")] * 2 + [("c", "m2")] * 2 + [("d", "m2")] * 2):
            rows.append({"Metadata_Plate": plate, "Metadata_Well": f"W{i:02d}", "Metadata_Compound": cpd, "Metadata_Concentration": 1.0,
                         "Metadata_MoA": moa, **{f"f{j}": rng.normal() + (moa == "m1") * (j == 0) * 3 + (moa == "m2") * (j == 1) * 3 for j in range(6)}})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "phenoscope", "profile", *args], capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.parametrize(
    ("edit", "flags", "message"),
    [
        (lambda t: t.drop(columns=["Metadata_MoA"]), [], "Metadata_MoA"),
        (lambda t: t.rename(columns={"Metadata_MoA": "Metadata_moa"}), [], "did you mean 'Metadata_moa'"),
        (lambda t: t.drop(columns=["Metadata_Plate"]), [], "Metadata_Plate"),
        (lambda t: t, ["--controls", "Metadata_Compound == 'PBS'"], "matches no rows"),
        (lambda t: t, ["--controls", "Metadata_Nope == 1"], "cannot evaluate"),
        (lambda t: t.assign(Metadata_Compound=t["Metadata_Compound"].where(t["Metadata_Plate"] == "P1", "x")), [], "'P2'} has no reference rows"),
        (lambda t: t, ["--null-size", "0"], "null_size must be"),
    ],
    ids=["no-label", "label-case", "no-plate", "controls-match-nothing", "controls-bad-column", "plate-without-controls", "null-size-0"],
)
def test_bad_table_gives_one_error_line_and_exit_2(tmp_path, capsys, edit, flags, message) -> None:
    table = tmp_path / "wells.csv"
    edit(pd.read_csv(_small_table(tmp_path / "ok.csv"))).to_csv(table, index=False)
    assert main(["profile", str(table), "--out", str(tmp_path / "out"), "--no-figures", *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {table}:") and message in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a fresh interpreter imports the whole CLI
def test_errors_in_a_real_process_have_no_traceback(tmp_path) -> None:
    table = _small_table(tmp_path / "ok.csv")
    res = _run(str(table), "--out", str(tmp_path / "out"), "--controls", "Metadata_Compound == 'PBS'")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"error: {table}: samples query \"Metadata_Compound == 'PBS'\" matches no rows"]


def test_missing_file_and_unknown_config_key(tmp_path, capsys) -> None:
    assert main(["profile", str(tmp_path / "absent.csv"), "--out", str(tmp_path / "out")]) == 2
    assert "not found" in capsys.readouterr().err
    cfg = tmp_path / "bad.toml"
    cfg.write_text("sphere_epsilonn = 0.1\n")
    assert main(["profile", str(_small_table(tmp_path / "ok.csv")), "--out", str(tmp_path / "out"), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cfg}: unknown option") and len(err.splitlines()) == 1


def test_flags_reach_the_pipeline(tmp_path) -> None:
    table = tmp_path / "wells.csv"
    pd.read_csv(_small_table(tmp_path / "ok.csv")).rename(columns={"Metadata_MoA": "Metadata_moa", "Metadata_Compound": "Metadata_Drug"}).to_csv(table, index=False)
    out = tmp_path / "out"
    assert main(["profile", str(table), "--out", str(out), "--no-figures", "--label-column", "Metadata_moa", "--compound-column",
                 "Metadata_Drug", "--controls", "Metadata_Drug == 'DMSO'", "--null-size", "99"]) == 2  # treatment_strata still names Metadata_Compound
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('treatment_strata = ["Metadata_Drug", "Metadata_Concentration"]\n')
    assert main(["profile", str(table), "--out", str(out), "--no-figures", "--config", str(cfg), "--label-column", "Metadata_moa",
                 "--compound-column", "Metadata_Drug", "--controls", "Metadata_Drug == 'DMSO'", "--null-size", "99"]) == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["config"]["label_column"] == "Metadata_moa" and saved["config"]["null_size"] == 99
    assert saved["metrics"]["NSC"] == 1.0 and saved["input"]["treatments"] == 4 and saved["input"]["control wells"] == 8
    assert 0 <= saved["metrics"]["replicate_significant_fraction"] <= 1


def test_per_cell_table_is_aggregated_to_wells(tmp_path) -> None:
    wells = pd.read_csv(_small_table(tmp_path / "ok.csv"))
    cells = wells.loc[wells.index.repeat(3)].reset_index(drop=True)  # 3 "cells" per well, as embed writes them
    cells.insert(0, "Metadata_Label", np.tile([1, 2, 3], len(wells)))
    feats = [c for c in cells if not c.startswith("Metadata_")]
    cells[feats] += np.random.default_rng(1).normal(scale=0.1, size=(len(cells), len(feats)))
    cells.to_parquet(tmp_path / "embeddings.parquet")
    assert main(["profile", str(tmp_path / "embeddings.parquet"), "--out", str(tmp_path / "out"), "--no-figures", "--null-size", "99"]) == 0
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())["input"]
    assert summary["input rows"] == 3 * len(wells) and summary["wells"] == len(wells)


def test_profile_reads_the_shipped_bbbc021_tables(bbbc021_dir, tmp_path) -> None:
    out = tmp_path / "ljosa"
    assert main(["profile", str(bbbc021_dir), "--out", str(out), "--config", str(REPO / "configs" / "profile" / "bbbc021.toml"), "--no-figures"]) == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["NSC"] >= 0.90 and 0 < saved["metrics"]["NSCB"] < saved["metrics"]["NSC"]
    assert saved["input"] == {"input rows": 632, "wells": 632, "plates": 55, "treatments": 103, "control wells": 330,
                              "features": 516, "features after selection": 192, "sphering": saved["input"]["sphering"]}
    per_moa = pd.read_csv(out / "per_MoA_NSC_accuracy.csv")
    assert len(per_moa) == 12 and per_moa["queries"].sum() == 103
    assert np.isclose((per_moa["accuracy"] * per_moa["queries"]).sum() / 103, saved["metrics"]["NSC"])
    out2 = tmp_path / "morpheus"
    assert main(["profile", str(bbbc021_dir / MORPHEUS), "--out", str(out2), "--label-column", "Metadata_moa", "--no-figures"]) == 0
    assert json.loads((out2 / "metrics.json").read_text())["metrics"]["NSC"] >= 0.90


def test_palette_is_distinct_for_20_classes_then_adds_markers() -> None:
    styles = figures.palette(28)
    assert len({c for c, _ in styles[:20]}) == 20 and len(set(styles)) == 28
    assert {m for _, m in styles[:10]} == {"o"} and styles[10][1] != "o" and styles[20][1] not in {"o", styles[10][1]}
