"""Retraining a genotype from scratch (paper, Section 3): Adam lr 3e-4, betas (0.9, 0.999),
batch 8, learning rate divided by 5 after 30 epochs without a lower training loss, stop at
500 epochs or when the learning rate falls below 1e-7, soft Jaccard loss.

Writes ``model.safetensors`` (last epoch: the model to score on the validation cases) and
``model_best.safetensors`` (best validation Dice: selected on those cases, so never scored on
them) with the genotype, build config, preprocessing and training facts inside,
``metrics.jsonl``, a plot, and a checkpoint every epoch from which ``--resume`` continues
exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from scnas import __version__
from scnas import defaults as D
from scnas.build import BuildConfig, build_network, save_model
from scnas.metrics import LOSSES, dice_per_class
from scnas.compiling import compile_for_training
from scnas.build.memory import MemoryPlan, MemoryPlanError, parse_bytes, plan_training_step
from scnas.data import Cache, fold_cases
from scnas.data.augment import default_augmentation
from scnas.data.loader import PatchDataset, PatchLoader, resolve_loader_workers, to_device
from scnas.errors import ScnasError
from scnas.fileio import atomic_write_text
from scnas.genotype import Genotype
from scnas.checkpoints import check_resume_precision, check_resume_settings, read_checkpoint, save_checkpoint
from scnas.figures import PLOT_EVERY_SECONDS, legend_below, save_figure
from scnas.processes import Processes, memory_budget, setup_processes
from scnas.progress import StepBar
from scnas.runs import ensure_run_folder, open_or_prepare
from scnas.steps import (Precision, StepMeter, accumulate_exact, fused_if_available, guarded_step, out_of_memory,
                         read_checked, resolve_amp, split_batch)

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "scnas-train-checkpoint"
CHECKPOINT_VERSION = 2   # 2: --batch-size is the global batch; gradient scaler


class TrainError(ScnasError):
    """A training run that cannot start or had to stop."""


class TrainConfig(BaseModel):
    """Everything that defines a training run (saved as ``config.json``)."""

    model_config = ConfigDict(extra="forbid")

    data: str
    spacing: tuple[float, float, float] | None = None   # a task folder's target (None: 0.7 mm); a cache's own
    fold: int = Field(D.FOLD, ge=0)
    stem: int = Field(D.STEM_TRAIN, ge=1, description="paper: 68 for retraining")
    depth: int = Field(D.DEPTH, ge=1, le=8)
    patch: tuple[int, int, int] = D.PATCH
    batch_size: int = Field(D.TRAIN_BATCH_SIZE, ge=1, description="patches per step over all processes (paper: 8); a multiple of "
                                                 "the number of processes")
    micro_batch: int | None = Field(None, ge=1, description="patches per forward pass (gradients accumulate exactly "
                                                            "over a process's share); None: the largest that fits")
    checkpoint: Literal["auto", "off", "cells", "edges"] = Field(
        "auto", description="activation checkpointing: off, cells, edges; auto: the cheapest that fits")
    epochs: int = Field(D.TRAIN_EPOCHS, ge=1, description="paper: at most 500")
    steps_per_epoch: int = Field(D.STEPS_PER_EPOCH, ge=1)
    lr: float = Field(D.TRAIN_LR, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    plateau_patience: int = Field(30, ge=1)
    plateau_factor: float = Field(0.2, gt=0, lt=1, description="divide by 5")
    min_lr: float = Field(1e-7, gt=0, description="stop when the learning rate falls below this")
    grad_clip: float = Field(12.0, gt=0)
    loss: Literal["jaccard", "jaccard-fg"] = Field(
        D.LOSS, description="soft Jaccard distance averaged over all classes (jaccard) or the foreground classes "
                            "only (jaccard-fg)")
    foreground_share: float = Field(1 / 3, ge=0, le=1)
    augment: bool = True
    val_patches: int = Field(8, ge=1, description="validation patches per epoch (from the fold's validation cases)")
    seed: int = D.SEED
    workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        D.WORKERS, description="data loader processes; auto: one per core on CUDA (shared with other processes on "
                            "the machine), none on the CPU")
    device: Literal["auto", "cpu", "cuda"] = D.DEVICE
    amp: Literal["auto", "off", "fp16", "bf16"] = Field(
        D.AMP, description="mixed precision: fp16 (with gradient scaling), bf16, off; auto: fp16 on CUDA, off on CPU")
    gpu_memory: str | None = Field(None, description="memory to plan for, e.g. 24GiB (default: the CUDA device's free "
                                                     "memory; nothing is planned on the CPU unless given)")
    log_every_steps: int = Field(10, ge=1, description="read losses back every N steps")
    max_nonfinite: int = Field(5, ge=1, description="stop after this many non-finite losses in a row")
    compile: bool = Field(False, description="torch.compile the network (forward and backward), compiled before the "
                                             "first step with the time printed; eager where compiling fails")
    plots: bool = Field(True, description="draw training.png (after the last epoch and at most every 5 minutes; "
                                          "the numbers are in metrics.jsonl either way)")

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_from_bool(cls, value):
        # Runs before version 0.2 stored amp as a bool meaning bfloat16 autocast.
        return {True: "bf16", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("gpu_memory")
    @classmethod
    def _memory(cls, value):
        if value is not None:
            parse_bytes(value)
        return value


@dataclass
class TrainResult:
    run: Path
    epochs_done: int
    best_dice: float
    history: list[dict[str, Any]]
    plan: MemoryPlan | None = None


LAST_EPOCH = "last epoch"
BEST_DICE = "best validation Dice"


def cases_digest(cases: list[str]) -> str:
    """A short fingerprint of a set of case ids (order does not matter)."""
    return hashlib.sha256("\n".join(sorted(cases)).encode()).hexdigest()[:16]


def training_metadata(fold: int, validation: list[str], epoch: int, selection: str) -> dict[str, str]:
    """What a trained model file says about its training, under the key ``training``: the
    fold, the epoch, how the file was chosen, and a fingerprint of the validation cases (so
    that a prediction of those cases can check the model never trained on them)."""
    return {"training": json.dumps({"fold": fold, "epoch": epoch, "selection": selection,
                                    "validation_cases": cases_digest(validation)}, sort_keys=True)}


def check_unselected(metadata: dict[str, str], validation: list[str], source: str) -> None:
    """Refuse to score ``validation`` cases with a model that was selected on them, or that
    was trained with other cases held out (so possibly on these)."""
    if "training" not in metadata:
        raise TrainError("says nothing of its training (no 'training' metadata; written by an older scnas or "
                         "not by 'scnas train'): cannot check it never saw these validation cases", source=source)
    training = json.loads(metadata["training"])
    if training.get("selection") != LAST_EPOCH:
        raise TrainError(f"was selected by {training.get('selection')} on the very cases --validation-of would "
                         "score: use the run's model.safetensors (the last epoch's)", source=source)
    if training.get("validation_cases") != cases_digest(validation):
        raise TrainError(f"was trained on fold {training.get('fold')} with other validation cases than this run's: "
                         "it may have trained on the cases it would score", source=source)


def preprocessing_metadata(cache: Cache, config: TrainConfig) -> dict[str, Any]:
    """What a predictor must do to a new image, as stored in model files."""
    return {**cache.settings, "patch_size": list(config.patch), "labels": cache.labels,
            "channel_names": cache.channel_names}


def plan_training(genotype: Genotype, config: TrainConfig, build: BuildConfig, d: Processes) -> MemoryPlan:
    """Checkpointing and micro-batch for this run; refuses a setting that cannot fit (the budget:
    ``config.gpu_memory``, else the CUDA device's free memory; none on the CPU)."""
    available = memory_budget(config.gpu_memory, d)
    try:
        return plan_training_step(genotype, build, resolve_amp(config.amp, d.device), config.patch,
                                  config.batch_size // d.world, config.checkpoint, config.micro_batch, available)
    except MemoryPlanError as exc:
        raise TrainError(f"does not fit: {exc}") from None


def run_training(genotype: Genotype, config: TrainConfig, run_dir: str | os.PathLike, resume: bool = False,
                 progress: bool = True, stop_after_epochs: int | None = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None,
                 say: Callable[[str], None] = print) -> TrainResult:
    """Train ``genotype`` from scratch on ``config.data`` (fold ``config.fold``) into ``run_dir``.
    ``say`` receives notices (the compile time, a compile failure)."""
    run = Path(run_dir)
    d = setup_processes(config.device, TrainError)
    if config.batch_size % d.world:
        raise TrainError(f"--batch-size {config.batch_size} is the global batch and must be a multiple of the "
                         f"{d.world} processes (e.g. {d.world * max(1, config.batch_size // d.world)})")
    checkpoint_path = run / CHECKPOINT
    state = None
    if resume:
        if not checkpoint_path.exists():
            raise TrainError("has no checkpoint to resume from", source=str(run))
        state = read_checkpoint(checkpoint_path, CHECKPOINT_FORMAT, TrainError)
        if state.get("version") != CHECKPOINT_VERSION:
            raise TrainError(f"is a version-{state.get('version')} training checkpoint from an older scnas, whose "
                             "--batch-size counted per process; start a new run (its models stay usable)",
                             source=str(checkpoint_path))
        saved = TrainConfig.model_validate_json(state["config"])
        if config.spacing is None:   # not asked for: the run's own (resolved when it started)
            config = config.model_copy(update={"spacing": saved.spacing})
        check_resume_settings(saved, config, run, TrainError)
    elif checkpoint_path.exists():
        raise TrainError("already holds a training run; use --resume or another folder", source=str(run))
    if d.main:
        ensure_run_folder(run, TrainError)
    d.barrier()
    cache = open_or_prepare(config.data, config.spacing, d, say)
    config = config.model_copy(update={"spacing": cache.spacing})   # recorded as used (a cache has its own)
    train_ids, val_ids = fold_cases(cache.splits, config.fold)
    build = BuildConfig(stem_channels=config.stem, in_channels=len(cache.channel_names),
                        num_classes=len(cache.labels), depth=config.depth)
    if any(p % build.divisor for p in config.patch):
        raise TrainError(f"patch {config.patch} must be a multiple of 2**depth = {build.divisor} per axis")
    plan = plan_training(genotype, config, build, d)
    share = config.batch_size // d.world
    preprocessing = preprocessing_metadata(cache, config)
    if d.main:
        atomic_write_text(run / "config.json", json.dumps({
            "scnas_version": __version__, "train": config.model_dump(mode="json"), "build": build.model_dump(),
            "genotype": genotype.to_dict(), "cases": {"train": train_ids, "validation": val_ids},
            "preprocessing": preprocessing, "world_size": d.world, "memory_plan": plan.to_dict(),
            "amp": resolve_amp(config.amp, d.device), "threads": torch.get_num_threads()}, indent=2) + "\n")
    torch.manual_seed(config.seed)
    net = build_network(genotype, build).to(d.device)
    net.set_checkpointing(plan.checkpoint)
    model: torch.nn.Module = net
    if d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, gradient_as_bucket_view=True,
                                                          device_ids=[d.device] if d.device.type == "cuda" else None)
    params = list(net.parameters())
    optimiser = torch.optim.Adam(params, lr=config.lr, betas=config.betas, **fused_if_available(d.device))
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, factor=config.plateau_factor,
                                                           patience=config.plateau_patience)
    precision = Precision(config.amp, d.device)
    epoch, history, best, counters = 0, [], -1.0, {"streak": 0, "skips": 0}
    if state is not None:
        net.load_state_dict(state["net"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        check_resume_precision(state.get("amp"), precision.amp, run, TrainError)
        precision.load_scaler(state.get("scaler"))
        torch.set_rng_state(state["torch_rng"])
        epoch, history, best = state["epoch"], list(state["history"]), state["best"]
        counters = dict(state.get("counters", counters))
    samples = config.steps_per_epoch * config.batch_size
    train_data = PatchDataset(cache, train_ids, config.patch, samples, config.seed, config.foreground_share,
                              default_augmentation() if config.augment else None)
    val_data = PatchDataset(cache, val_ids, config.patch, config.val_patches, config.seed + 3, 1 / 3, None)
    train_loader = PatchLoader(train_data, share, resolve_loader_workers(config.workers, d.device), d.world, d.rank,
                               d.device)
    if config.compile:
        example = torch.zeros((plan.micro_batch or share, build.in_channels, *config.patch), device=d.device)
        compile_for_training(net, example, precision.autocast, say if d.main else (lambda _: None))
    no_sync = model.no_sync if d.world > 1 else None
    bar = StepBar(progress and d.main, config.steps_per_epoch)
    epochs_this_call, last_drawn = 0, time.monotonic()
    try:
        while epoch < config.epochs and optimiser.param_groups[0]["lr"] >= config.min_lr:
            loader = train_loader.epoch(epoch, 0, config.steps_per_epoch)
            started = time.perf_counter()
            meter = StepMeter(d.device, ["loss"], counters)   # non-finite runs continue across epochs
            bar.start(f"epoch {epoch + 1}/{config.epochs}")
            net.train()
            for step, batch in enumerate(loader):
                x, y = to_device(batch, d.device, config.patch)
                optimiser.zero_grad(set_to_none=True)
                loss = accumulate_exact(model, split_batch(x, y, plan.micro_batch), precision.backward, precision,
                                        d.world, no_sync, foreground_only=LOSSES[config.loss])
                skipped = guarded_step(optimiser, params, precision, loss, config.grad_clip)
                meter.record([loss], skipped, ~torch.isfinite(loss) if precision.scaler.is_enabled() else skipped)
                if (step + 1) % config.log_every_steps == 0 or step + 1 == config.steps_per_epoch:
                    numbers = read_checked(meter, config.max_nonfinite, TrainError, epoch, step, checkpoint_path,
                                           "--lr")
                    bar.advance(f"loss {numbers['loss'] / max(numbers['n'], 1):.4f}", steps=step + 1)
            bar.stop()
            numbers = read_checked(meter, config.max_nonfinite, TrainError, epoch, config.steps_per_epoch - 1,
                                   checkpoint_path, "--lr")
            counters = {"streak": numbers["streak"], "skips": numbers["skips"]}
            # Every rank holds the same loss (the global batch's) and skipped the same steps.
            train_loss = numbers["loss"] / numbers["n"] if numbers["n"] else float("nan")
            dice = _validate(net, val_data, build.num_classes, d.device, precision, share)
            scheduler.step(train_loss if math.isfinite(train_loss) else float("inf"))
            record = {"epoch": epoch + 1, "train_loss": train_loss, "val_dice": dice,
                      "lr": optimiser.param_groups[0]["lr"], "skipped_steps": numbers["skipped"],
                      "seconds": time.perf_counter() - started}
            history.append(record)
            epoch += 1
            improved = math.isfinite(dice) and dice > best
            best = dice if improved else best
            if d.main:
                net.eval()
                save_model(net, run / "model.safetensors", preprocessing,
                           extra=training_metadata(config.fold, val_ids, epoch, LAST_EPOCH))
                if improved:
                    save_model(net, run / "model_best.safetensors", preprocessing,
                               extra={"epoch": str(epoch), **training_metadata(config.fold, val_ids, epoch, BEST_DICE)})
                atomic_write_text(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
                if config.plots and (epoch == config.epochs or time.monotonic() - last_drawn >= PLOT_EVERY_SECONDS):
                    _plot(run, history)   # seconds per figure: after the last epoch and every few minutes
                    last_drawn = time.monotonic()
                save_checkpoint(checkpoint_path, {
                    "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config.model_dump_json(),
                    "epoch": epoch, "amp": precision.amp,
                    "net": net.state_dict(), "optimiser": optimiser.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": precision.scaler.state_dict(), "torch_rng": torch.get_rng_state(), "history": history,
                    "best": best, "counters": counters})
            if on_epoch:
                on_epoch(record)
            epochs_this_call += 1
            if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
                break
    except torch.cuda.OutOfMemoryError:
        raise out_of_memory(TrainError, epoch, plan.describe(), checkpoint_path, "scnas plan") from None
    finally:
        bar.stop()
    return TrainResult(run, epoch, best, history, plan)


@torch.no_grad()
def _validate(net, val_data: PatchDataset, num_classes: int, device, precision: Precision, batch_size: int) -> float:
    """Mean foreground Dice over the fixed validation patches (nnU-Net's "pseudo Dice")."""
    net.eval()
    predictions, targets = [], []
    for start in range(0, len(val_data), batch_size):
        items = [val_data[i] for i in range(start, min(start + batch_size, len(val_data)))]
        x = torch.stack([item[0] for item in items]).to(device)
        with precision.autocast():
            predictions.append(net(x).argmax(1).cpu())
        targets.append(torch.stack([item[1] for item in items]))
    scores = dice_per_class(torch.cat(predictions), torch.cat(targets), num_classes)
    finite = [s for s in scores if not math.isnan(s)]
    return float(np.mean(finite)) if finite else float("nan")


def _plot(run: Path, history: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, left = plt.subplots(figsize=(7, 4))
    epochs = [r["epoch"] for r in history]
    left.plot(epochs, [r["train_loss"] for r in history], label="training loss (soft Jaccard)")
    left.set_xlabel("epoch")
    left.set_ylabel("soft Jaccard distance")
    right = left.twinx()
    right.plot(epochs, [r["val_dice"] for r in history], "k--", label="validation Dice (watched, not used)")
    right.set_ylabel("Dice")
    legend_below(figure, left, right, columns=2)
    save_figure(figure, run / "training.png")
