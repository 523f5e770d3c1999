"""Training feedback on the console: validation metrics when computed, and warnings for runs that cannot learn."""

from __future__ import annotations

import csv

import torch
from torch import nn

from phenoscope.train.loop import TrainConfig, train


class _Toy(nn.Module):
    """Least squares on random data; ``val`` is what on_epoch_end reports."""

    def __init__(self, val: dict[str, float] | None) -> None:
        super().__init__()
        self.w = nn.Linear(4, 1)
        self.val = val

    def forward(self, batch, progress):
        return {"loss": ((self.w(batch["x"]) - batch["y"]) ** 2).mean()}

    def on_epoch_end(self, epoch: int):
        return self.val


class _Data(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(4, generator=g), "y": torch.randn(1, generator=g)}


def _run(tmp_path, val, **cfg):
    config = TrainConfig(**{"epochs": 2, "batch_size": 4, "lr": 1e-2, "warmup_epochs": 0.0, "progress_bar": False, **cfg})
    return train(_Toy(val), _Data(), config, tmp_path)


def test_validation_metrics_are_printed_and_ap_zero_warns(tmp_path, capsys):
    _run(tmp_path, {"val_ap50": 0.0, "val_ap75": 0.0})
    err = capsys.readouterr().err
    assert "epoch 1: train_loss" in err and "val_ap50 0.000" in err and "epoch 2: train_loss" in err
    assert "warning: validation AP is 0 at epoch 2" in err
    rows = list(csv.DictReader(open(tmp_path / "epochs.csv")))
    assert [r["epoch"] for r in rows] == ["0.0", "1.0"] and rows[0]["val_ap50"] == "0.0"


def test_no_warning_when_validation_finds_cells_or_is_absent(tmp_path, capsys):
    _run(tmp_path / "a", {"val_ap50": 0.4})
    _run(tmp_path / "b", None)
    err = capsys.readouterr().err
    assert "warning" not in err and "val_ap50 0.400" in err


def test_warmup_longer_than_the_run_warns(tmp_path, capsys):
    _run(tmp_path, None, warmup_epochs=3.0)
    assert "warning: the warm-up (3 epochs) is as long as the run (2 epochs)" in capsys.readouterr().err


def test_epochs_csv_is_written_after_the_first_epoch(tmp_path):
    _run(tmp_path, {"val_ap50": 0.5}, epochs=3, max_steps=3)  # stops in the second epoch
    rows = list(csv.DictReader(open(tmp_path / "epochs.csv")))
    assert len(rows) == 1 and rows[0]["val_ap50"] == "0.5"
