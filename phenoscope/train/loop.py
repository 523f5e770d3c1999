"""One generic training loop for any objective (self-supervised methods, segmentation, ...).

An objective is an ``nn.Module`` whose ``forward(batch, progress)`` returns a dict of scalar
tensors with a ``"loss"`` entry (the others are logged). Optional hooks:

- ``param_groups() -> list[dict]``: groups with ``lr_mult``, ``wd_mult``, ``is_last_layer``
  (see ``phenoscope.train.optim.param_groups``; default: all trainable parameters).
- ``on_step_end(progress)``: called after each optimiser step (e.g. EMA teacher update).
- ``on_epoch_end(epoch) -> dict | None``: called on rank 0 after each epoch (e.g. validation);
  returned values are logged per epoch in ``epochs.csv`` / ``curves.png``.
- ``find_unused_parameters = True``: for objectives that skip parameters on some steps (layer drop) under DDP.

A dataset with ``set_epoch(epoch)`` is told the epoch before it is iterated, so its random
augmentations can be a pure function of (seed, epoch, index): a resumed run (even one stopped in the
middle of an epoch) then continues exactly as an uninterrupted run would.

The loop owns AdamW, LR warm-up + cosine, weight-decay cosine, gradient clipping, freezing of
``last_layer`` parameters for the first epochs, bf16 autocast (GPU; CPU with native bf16 if asked), checkpoint / resume
(safetensors weights + ``weights_only`` trainer state, also on Ctrl-C / SIGTERM), CSV + PNG loss logs, a tqdm progress
bar and DDP when launched with ``torchrun`` (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import csv
import itertools
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from phenoscope.core.io import atomic_path
from phenoscope.train.optim import param_groups as default_param_groups
from phenoscope.train.schedules import cosine_schedule, step_schedule

CHECKPOINT = "checkpoint.safetensors"
TRAINER_STATE = "trainer_state.pt"
LOG_CSV = "log.csv"
LOG_PNG = "loss.png"
EPOCH_CSV = "epochs.csv"
EPOCH_PNG = "curves.png"
SCHEDULES = ("cosine", "step")


@dataclass
class TrainConfig:
    """Loop options; learning rates are per optimiser step, ``batch_size`` is per process."""

    epochs: int = 100
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    schedule: str = "cosine"  # LR after warm-up: "cosine" to min_lr, or "step" (cellpose: 10 halvings at the end)
    decay_epochs: int = -1  # "step": epochs over which the 10 halvings happen; -1 = cellpose's rule
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 3.0  # 0 disables
    freeze_last_layer_epochs: int = 1
    amp: bool = True  # bf16 autocast on GPU
    cpu_bf16: bool = False  # bf16 autocast on a CPU with native bf16 (AVX512-BF16 or AMX; fp32 on other CPUs)
    num_workers: int = 0
    seed: int = 0
    max_minutes: float = 0.0  # stop (and checkpoint) after this wall time; 0 = no limit
    max_steps: int = 0  # stop after this many steps in this run; 0 = no limit
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch and any stop always save)
    progress_bar: bool = True


@dataclass
class Progress:
    """Where training stands; objectives derive their own schedules from it."""

    step: int
    epoch: int
    steps_per_epoch: int
    total_steps: int


def to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors inside nested dicts / lists / tuples to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def setup_distributed() -> tuple[int, int, torch.device]:
    """Initialise the process group when launched by torchrun; returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def _seed_worker(worker_id: int) -> None:
    np.random.seed(torch.initial_seed() % 2**32)


class ResumableSampler(Sampler):
    """A per-epoch seeded shuffle (distributed under DDP) that can start ``skip`` samples into the epoch."""

    def __init__(self, dataset: Dataset, seed: int, world: int) -> None:
        if world > 1:
            self.base: Sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
        else:
            self.base = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
        self.seed, self.skip = seed, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if isinstance(self.base, DistributedSampler):
            self.base.set_epoch(epoch)
        else:
            self.base.generator.manual_seed(self.seed + epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return len(self.base) - self.skip


def make_loader(dataset: Dataset, cfg: TrainConfig, world: int, collate_fn: Callable | None) -> DataLoader:
    """Shuffled loader that drops the last partial batch (distributed sampler under DDP)."""
    if len(dataset) < cfg.batch_size * world:
        raise ValueError(f"dataset has {len(dataset)} samples, fewer than one global batch ({cfg.batch_size} x {world})")
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=ResumableSampler(dataset, cfg.seed, world),
        num_workers=cfg.num_workers,
        collate_fn=collate_fn,
        drop_last=True,
        worker_init_fn=_seed_worker,
        pin_memory=torch.cuda.is_available(),  # page-locked batches: async host-to-GPU copies
        # workers must see the dataset's epoch (set_epoch), so they restart every epoch then
        persistent_workers=cfg.num_workers > 0 and not hasattr(dataset, "set_epoch"),
    )


def _apply_schedules(opt: torch.optim.Optimizer, cfg: TrainConfig, progress: Progress) -> tuple[float, float]:
    warmup = int(cfg.warmup_epochs * progress.steps_per_epoch)
    if cfg.schedule == "step":
        lr = step_schedule(progress.step, progress.steps_per_epoch, cfg.epochs, cfg.lr, warmup, cfg.decay_epochs)
    else:
        lr = cosine_schedule(progress.step, progress.total_steps, cfg.lr, cfg.min_lr, warmup)
    wd = cosine_schedule(progress.step, progress.total_steps, cfg.weight_decay, cfg.weight_decay_end)
    frozen = progress.epoch < cfg.freeze_last_layer_epochs
    for g in opt.param_groups:
        g["lr"] = 0.0 if (frozen and g["is_last_layer"]) else lr * g["lr_mult"]
        g["weight_decay"] = wd * g["wd_mult"]
    return lr, wd


def save_checkpoint(out_dir: Path, objective: nn.Module, opt: torch.optim.Optimizer, epoch: int, step: int, batch: int = 0) -> None:
    """Weights as safetensors, then optimiser state and counters (loadable with weights_only).

    ``epoch`` is the epoch to continue with and ``batch`` the number of its batches already done.
    """
    from phenoscope.core.checkpoint import save_weights

    save_weights(out_dir / CHECKPOINT, objective.state_dict())
    with atomic_path(out_dir / TRAINER_STATE) as tmp:
        torch.save({"optimizer": opt.state_dict(), "epoch": epoch, "step": step, "batch": batch}, tmp)


def load_checkpoint(out_dir: Path, objective: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, int, int]:
    """Restore weights and optimiser state; returns (epoch to continue, step, batches of it done)."""
    from safetensors.torch import load_file

    from phenoscope.core.state import load_state_strict

    device = next(objective.parameters()).device
    load_state_strict(objective, load_file(str(out_dir / CHECKPOINT), device=str(device)), str(out_dir / CHECKPOINT))
    state = torch.load(out_dir / TRAINER_STATE, map_location=device, weights_only=True)
    opt.load_state_dict(state["optimizer"])
    return int(state["epoch"]), int(state["step"]), int(state.get("batch", 0))


class LossLog:
    """Append-only CSV of values indexed by ``x`` ("step" or "epoch") plus a PNG plot (rank 0 only)."""

    def __init__(self, csv_path: Path, png_path: Path, x: str = "step", resume_at: int | None = None) -> None:
        self.csv, self.png, self.x = csv_path, png_path, x
        self.rows: list[dict[str, float]] = []
        if resume_at is not None and self.csv.exists():
            with open(self.csv, newline="") as fh:
                self.rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh) if float(r[x]) < resume_at]
        self._rewrite()

    def _rewrite(self) -> None:
        with atomic_path(self.csv) as tmp, open(tmp, "w", newline="") as fh:
            if self.rows:
                writer = csv.DictWriter(fh, fieldnames=list(self.rows[0]))
                writer.writeheader()
                writer.writerows(self.rows)

    def append(self, row: dict[str, float]) -> None:
        if self.rows and set(row) != set(self.rows[0]):
            self.rows.append(row)
            self._rewrite_union()
            return
        new_file = not self.rows
        self.rows.append(row)
        with open(self.csv, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(self.rows[0]))
            if new_file:
                writer.writeheader()
            writer.writerow(row)

    def _rewrite_union(self) -> None:
        # rows with different keys (e.g. validation only every N epochs): blank cells where missing
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        self.rows = [{k: r.get(k, float("nan")) for k in keys} for r in self.rows]
        self._rewrite()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in self.rows[0] if k not in ("step", "epoch", "lr", "wd")] if self.rows else []
        if not keys:
            return
        xs = np.array([r[self.x] for r in self.rows])
        fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
        win = max(1, len(xs) // 50)
        for ax, key in zip(axes[:, 0], keys):
            y = np.array([r[key] for r in self.rows])
            ok = np.isfinite(y)
            ax.plot(xs[ok], y[ok], lw=0.5 if win > 1 else 1.2, alpha=0.4 if win > 1 else 1.0, marker="" if win > 1 else ".")
            if win > 1:
                ax.plot(xs[win - 1 :], np.convolve(y, np.ones(win) / win, mode="valid"), lw=1.2)
            ax.set_ylabel(key)
        axes[-1, 0].set_xlabel(self.x)
        fig.tight_layout()
        with atomic_path(self.png) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)


class _Interrupted(KeyboardInterrupt):
    """A stop request (SIGTERM or Ctrl-C), raised by the loop after the step it interrupted and a checkpoint."""


class _StopRequest:
    """Handler for SIGTERM and SIGINT that only records the signal; the loop stops after the current step.

    Raising from the handler instead would interrupt the loop at any bytecode (inside a lock, a
    file write, the progress bar), which can leave the process unable to exit. A second Ctrl-C
    interrupts at once, as usual.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum


def _report_interrupt(step: int) -> None:
    print(f"\ninterrupted: checkpoint saved at step {step}; continue with --resume", file=sys.stderr, flush=True)


def train(
    objective: nn.Module,
    dataset: Dataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    collate_fn: Callable | None = None,
) -> dict[str, Any]:
    """Train ``objective`` on ``dataset``; checkpoints and logs go to ``out_dir``.

    Returns a summary: steps run, final epoch, last logged values, and whether it finished.
    SIGTERM or Ctrl-C (in the main thread) lets the current step finish, saves a checkpoint and
    raises ``KeyboardInterrupt``; a second Ctrl-C interrupts at once.
    """
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; choose from {SCHEDULES}")
    out_dir = Path(out_dir)
    rank, world, device = setup_distributed()
    torch.manual_seed(cfg.seed + rank)
    objective.to(device).train()
    groups = objective.param_groups() if hasattr(objective, "param_groups") else default_param_groups(objective.named_parameters())
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    start_epoch, step, skip = 0, 0, 0
    if resume and (out_dir / TRAINER_STATE).exists():
        start_epoch, step, skip = load_checkpoint(out_dir, objective, opt)
    model = objective
    if world > 1:
        unused = getattr(objective, "find_unused_parameters", False)
        model = nn.parallel.DistributedDataParallel(objective, find_unused_parameters=unused)
    loader = make_loader(dataset, cfg, world, collate_fn)
    steps_per_epoch = len(loader)
    total = cfg.epochs * steps_per_epoch
    logs = None
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        logs = (LossLog(out_dir / LOG_CSV, out_dir / LOG_PNG, "step", step if resume else None),
                LossLog(out_dir / EPOCH_CSV, out_dir / EPOCH_PNG, "epoch", start_epoch if resume else None))
    if rank == 0:
        warn_if_warmup_outlasts_run(cfg)
    t0, run_steps, last, stopped = time.monotonic(), 0, {}, False
    done = (start_epoch, step, skip)  # (epoch, step, batches of that epoch) completed so far
    stop = _StopRequest()
    old_handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)} if _main_thread() else {}
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            loader.sampler.set_epoch(epoch, skip * cfg.batch_size)
            losses: list[float] = []
            for batch_idx, batch in enumerate(_progress_bar(loader, epoch, cfg, rank), start=skip):
                last = _optimizer_step(model, objective, opt, batch, Progress(step, epoch, steps_per_epoch, total), cfg, device)
                step, run_steps = step + 1, run_steps + 1
                done = (epoch, step, batch_idx + 1)
                losses.append(last["loss"])
                if logs is not None:
                    logs[0].append(last)
                out_of_time = cfg.max_minutes > 0 and time.monotonic() - t0 > 60 * cfg.max_minutes
                if stop.signum is not None or out_of_time or (cfg.max_steps and run_steps >= cfg.max_steps):
                    stopped = (epoch + 1, batch_idx + 1) != (cfg.epochs, steps_per_epoch)
                    break
            skip = 0
            if done[2] == steps_per_epoch:  # the epoch is complete
                done = (epoch + 1, step, 0)
                if rank == 0:
                    _end_epoch(objective, logs, epoch, losses)
            if rank == 0 and (stopped or done[0] == cfg.epochs or done[0] % max(cfg.checkpoint_every, 1) == 0):
                save_checkpoint(out_dir, objective, opt, *done)
                logs[0].plot()
            if stopped:
                break
    except KeyboardInterrupt:  # a second Ctrl-C
        if rank == 0:
            save_checkpoint(out_dir, objective, opt, *done)
            _report_interrupt(done[1])
        raise
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    if stopped and stop.signum is not None:  # the checkpoint is saved
        if rank == 0:
            _report_interrupt(done[1])
        raise _Interrupted(f"signal {stop.signum}")
    if rank == 0:
        warn_if_validation_found_nothing(logs[1].rows)
    if world > 1:
        dist.barrier()
    return {"steps": run_steps, "step": step, "finished": not stopped, "last": last, "minutes": (time.monotonic() - t0) / 60}


def native_cpu_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast is faster than
    fp32; without it, bf16 is emulated and many times slower."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def bf16_autocast(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether a training step on ``device`` runs under bf16 autocast: ``cfg.amp`` on GPU, ``cfg.cpu_bf16`` on
    a CPU with native bf16."""
    if device.type == "cuda":
        return cfg.amp
    return device.type == "cpu" and cfg.cpu_bf16 and native_cpu_bf16()


def _optimizer_step(
    model: nn.Module, objective: nn.Module, opt: torch.optim.Optimizer, batch: Any, progress: Progress, cfg: TrainConfig, device: torch.device
) -> dict[str, float]:
    """Schedules → forward (bf16 autocast: :func:`bf16_autocast`) → backward → last-layer freeze → clipping →
    AdamW step → ``objective.on_step_end``; returns the step's log row."""
    lr, wd = _apply_schedules(opt, cfg, progress)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast(cfg, device)):
        out = model(to_device(batch, device), progress)
    loss = out["loss"]
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} at step {progress.step}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if progress.epoch < cfg.freeze_last_layer_epochs:
        for g in opt.param_groups:
            if g["is_last_layer"]:
                for p in g["params"]:
                    p.grad = None
    if cfg.clip_grad > 0:
        nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.clip_grad)
    opt.step()
    if hasattr(objective, "on_step_end"):
        objective.on_step_end(progress)
    return {"step": progress.step, "epoch": progress.epoch, "lr": lr, "wd": wd, **{k: float(torch.as_tensor(v).detach()) for k, v in out.items()}}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _end_epoch(objective: nn.Module, logs: tuple[LossLog, LossLog], epoch: int, losses: list[float]) -> None:
    """Epoch summary row: mean training loss plus whatever ``objective.on_epoch_end`` reports
    (validation metrics are also printed to the console)."""
    row = {"epoch": float(epoch), "train_loss": float(np.mean(losses)) if losses else float("nan")}
    if hasattr(objective, "on_epoch_end"):
        was_training = objective.training
        extra = objective.on_epoch_end(epoch) or {}
        objective.train(was_training)
        row.update(extra)
        if extra:
            from tqdm.auto import tqdm

            shown = ", ".join(f"{k} {v:.3f}" for k, v in extra.items())
            tqdm.write(f"epoch {epoch + 1}: train_loss {row['train_loss']:.4f}, {shown}", file=sys.stderr)
    logs[1].append(row)
    logs[1].plot()


def warn_if_warmup_outlasts_run(cfg: TrainConfig) -> None:
    """Warn (stderr) when the learning-rate warm-up is as long as the run: the LR never reaches ``cfg.lr``."""
    if cfg.warmup_epochs > 0 and cfg.warmup_epochs >= cfg.epochs:
        print(f"warning: the warm-up ({cfg.warmup_epochs:g} epochs) is as long as the run ({cfg.epochs} epochs); "
              f"the learning rate never reaches {cfg.lr:g}", file=sys.stderr)


def warn_if_validation_found_nothing(rows: list[dict[str, float]]) -> None:
    """Warn (stderr) when the last validation of the run scored AP 0 at every threshold (nothing learned or found)."""
    scored = [r for r in rows if any(k.startswith("val_ap") and np.isfinite(v) for k, v in r.items())]
    if scored and all(v == 0 for k, v in scored[-1].items() if k.startswith("val_ap")):
        print(f"warning: validation AP is 0 at epoch {int(scored[-1]['epoch']) + 1}: the model finds no matching cells "
              "(train longer, or check the labels and the validation split)", file=sys.stderr)


def _progress_bar(loader: DataLoader, epoch: int, cfg: TrainConfig, rank: int):
    from tqdm.auto import tqdm

    return tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=rank != 0 or not cfg.progress_bar, leave=False)
