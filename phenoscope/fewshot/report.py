"""The few-shot grid's outputs: per-run results, mean ± sd per (init, label fraction), the CPU time of
each shared phase, a plot of AP against the label fraction (one line per init) and an HTML summary."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from phenoscope.core.io import atomic_write

__all__ = ["phase_times", "summarise", "write_report"]

METRICS = ("ap50", "ap75", "coco_ap_segm", "val_ap50")


def summarise(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per (init, percent): the number of seeds and the mean and sd (ddof 1) of each metric."""
    df = pd.DataFrame(list(rows))
    g = df.groupby(["init", "percent"], sort=False)
    out = g.size().rename("seeds").to_frame()
    for m in (*METRICS, "finetune_cpu_min"):
        out[f"{m}_mean"] = g[m].mean()
        out[f"{m}_sd"] = g[m].std(ddof=1)
    return out.reset_index()


def phase_times(out: str | Path) -> pd.DataFrame:
    """Wall and CPU minutes of every shared phase trained under ``out/phases``."""
    rows = [{"phase": p.parent.name, **json.loads(p.read_text())} for p in sorted(Path(out, "phases").glob("*/timing.json"))]
    return pd.DataFrame(rows, columns=["phase", "wall_min", "cpu_min"])


def _plot(summary: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from phenoscope.profiling.figures import save_png

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in zip(axes, ("ap50", "coco_ap_segm"), ("AP@0.5 (cellpose)", "COCO AP_segm")):
        for init, part in summary.groupby("init", sort=False):
            ax.errorbar(part["percent"], part[f"{metric}_mean"], yerr=part[f"{metric}_sd"].fillna(0), marker="o",
                        capsize=3, label=init)
        ax.set(xlabel="labelled target images (% of the pool)", ylabel=label, xscale="log")
        ax.set_xticks(sorted(summary["percent"].unique()), [str(p) for p in sorted(summary["percent"].unique())])
        ax.set_xticks([], minor=True)
        ax.grid(alpha=0.3)
    axes[0].legend(title="init")
    fig.suptitle("Few-shot segmentation on the target test split (mean ± sd over seeds)")
    return save_png(fig, path)


def write_report(rows: Sequence[dict[str, Any]], out: str | Path) -> dict[str, Path]:
    """Write ``results.csv``, ``summary.csv``, ``phases.csv``, ``fewshot.png`` and ``report.html`` under ``out``."""
    from phenoscope.profiling.figures import write_report as html_report

    out = Path(out)
    results, summary, phases = pd.DataFrame(list(rows)), summarise(rows), phase_times(out)
    paths = {name: out / f"{name}.csv" for name in ("results", "summary", "phases")}
    for name, table in zip(paths, (results, summary, phases)):
        with atomic_write(paths[name], "w") as fh:
            table.to_csv(fh, index=False, float_format="%.4f")
    paths["plot"] = _plot(summary, out / "fewshot.png")
    shown = summary[["init", "percent", "seeds"]].copy()
    for m in ("ap50", "coco_ap_segm", "ap75", "val_ap50"):
        shown[m] = [f"{a:.3f} ± {b:.3f}" for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_sd"].fillna(0))]
    shown["finetune CPU min"] = summary["finetune_cpu_min_mean"].round(2)
    paths["html"] = html_report([paths["plot"]], out / "report.html", "phenoscope few-shot benchmark (CUPre)",
                                {"Target test split, mean ± sd over seeds": shown, "Shared phases (minutes)": phases,
                                 "Every run": results})
    return paths
