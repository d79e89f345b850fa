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
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import Field

from scnas import defaults as D
from scnas.build import build_network, save_model
from scnas.build.memory_plan import MemoryPlan, plan_training_step
from scnas.engine.compiling import compile_for_training
from scnas.data import Cache, fold_cases
from scnas.data.augment import default_augmentation
from scnas.data.loader import PatchDataset, PatchLoader, resolve_loader_workers, to_device
from scnas.errors import ScnasError
from scnas.figures import plot_history
from scnas.genotype import Genotype
from scnas.metrics import LOSSES, deep_supervision_weights
from scnas.engine.runs import RunLoop, validation_dice
from scnas.engine.settings import RunSettings
from scnas.engine.steps import Precision, accumulate_exact, fused_if_available, guarded_step, split_batch

CHECKPOINT_FORMAT = "scnas-train-checkpoint"
CHECKPOINT_VERSION = 2   # 2: --batch-size is the global batch; gradient scaler


class TrainError(ScnasError):
    """A training run that cannot start or had to stop."""


class TrainConfig(RunSettings):
    """Everything that defines a training run (saved as ``config.json``). The settings shared
    with the search are :class:`scnas.engine.settings.RunSettings`'s; the paper's retraining values."""

    stem: int = Field(D.STEM_TRAIN, ge=1, description="paper: 68 for retraining")
    batch_size: int = Field(D.TRAIN_BATCH_SIZE, ge=1, description="patches per step over all processes (paper: 8); a "
                                                                  "multiple of the number of processes")
    epochs: int = Field(D.TRAIN_EPOCHS, ge=1, description="paper: at most 500")
    lr: float = Field(D.TRAIN_LR, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    plateau_factor: float = Field(0.2, gt=0, lt=1, description="divide by 5")
    min_lr: float = Field(1e-7, gt=0, description="stop when the learning rate falls below this")
    val_patches: int = Field(8, ge=1, description="validation patches per epoch (from the fold's validation cases)")
    compile: bool = Field(False, description="torch.compile the network (forward and backward), compiled before the "
                                             "first step with the time printed; eager where compiling fails")
    deep_supervision: bool = Field(D.DEEP_SUPERVISION, description="also train 1x1x1 heads on the coarser decoder "
                                                                  "levels (nnU-Net's weighted loss; inference uses the "
                                                                  "main output only)")


@dataclass
class TrainResult:
    run: Path
    epochs_done: int
    best_dice: float
    _: KW_ONLY
    history: list[dict[str, Any]]
    plan: MemoryPlan | None = None


LAST_EPOCH = "last epoch"
BEST_DICE = "best validation Dice"


def cases_digest(cases: list[str]) -> str:
    """A short fingerprint of a set of case ids (order does not matter)."""
    return hashlib.sha256("\n".join(sorted(cases)).encode()).hexdigest()[:16]


def training_metadata(fold: int, validation: list[str], epoch: int, *, selection: str) -> dict[str, str]:
    """What a trained model file says about its training, under the key ``training``: the
    fold, the epoch, how the file was chosen, and a fingerprint of the validation cases (so
    that a prediction of those cases can check the model never trained on them).

    Args:
        fold: the cross-validation fold trained on.
        validation: its validation case IDs (fingerprinted).
        epoch: the epoch the weights are from.
        selection: how the file was chosen (last epoch, best Dice).
    """
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


def run_training(genotype: Genotype, config: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False,
                 progress: bool = True, stop_after_epochs: int | None = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None,
                 say: Callable[[str], None] = print, stop_after_steps: int | None = None) -> TrainResult:
    """Train ``genotype`` from scratch on ``config.data`` (fold ``config.fold``) into ``run_dir``.
    ``stop_after_epochs`` / ``stop_after_steps`` end this call early with a checkpoint (to
    resume); ``on_epoch`` receives each epoch's record; ``say`` notices (the compile time, a
    compile failure).

    Args:
        genotype: the cells of the network to train.
        config: the training's settings.
        run_dir: the run folder (config, metrics, model files, figure, checkpoint).
        resume: continue the run in ``run_dir`` from its checkpoint.
        progress: show the progress bar.
        stop_after_epochs: end this call after that many epochs, checkpointed.
        on_epoch: called with each epoch's record.
        say: prints notices (compile time, a failed compilation).
        stop_after_steps: end this call after that many steps, checkpointed.
    """
    return TrainingLoop(genotype, config, run_dir, resume=resume, progress=progress, say=say).execute(stop_after_steps,
                                                                                                      stop_after_epochs,
                                                                                  on_epoch)


class TrainingLoop(RunLoop):
    """Retraining a genotype in the shared run skeleton (:class:`scnas.engine.runs.RunLoop`)."""

    kind, error, losses, rate_option = "train", TrainError, ("loss",), "--lr"
    checkpoint_format, checkpoint_version = CHECKPOINT_FORMAT, CHECKPOINT_VERSION
    outdated = "its --batch-size counted per process; start a new run (its models stay usable)"
    occupied, plan_command = "already holds a training run; use --resume or another folder", "scnas plan"
    config: TrainConfig

    def __init__(self, genotype: Genotype, config: TrainConfig, run_dir, *, resume: bool = False, progress: bool = True,
                 say: Callable[[str], None] = print):
        """Store the settings (see :class:`scnas.engine.runs.RunLoop`); ``genotype`` is the network to train.

        Args:
            genotype: the cells of the network to train.
            config: the training's settings.
            run_dir: the run folder.
            resume: continue the run in ``run_dir`` from its checkpoint.
            progress: show the progress bar.
            say: prints notices.
        """
        self.genotype = genotype
        super().__init__(config, run_dir, resume, progress=progress, say=say)

    def setup(self) -> None:
        """The fold's training and validation cases, the preprocessing model files record."""
        self.train_ids, self.val_ids = fold_cases(self.cache.splits, self.config.fold)
        self.preprocessing = preprocessing_metadata(self.cache, self.config)
        self.best = -1.0

    def build_settings(self) -> dict[str, Any]:
        return {"deep_supervision": self.config.deep_supervision}

    def plan_step(self, available: int | None) -> MemoryPlan:
        c = self.config
        return plan_training_step(self.genotype, self.build, self.amp, patch=c.patch, share=self.share,
                                  checkpoint=c.checkpoint,
                                  micro_batch=c.micro_batch, available=available)

    def describe(self) -> dict[str, Any]:
        return {"genotype": self.genotype.to_dict(), "cases": {"train": self.train_ids, "validation": self.val_ids},
                "preprocessing": self.preprocessing}

    def make(self) -> None:
        c, d = self.config, self.d
        self.net = build_network(self.genotype, self.build).to(d.device)
        self.net.set_checkpointing(self.plan.checkpoint)
        self.model = self.parallel(self.net)
        self.params = list(self.net.parameters())
        # nnU-Net's weights of [main, coarser heads...]; None: one output, the plain loss.
        self.weights = deep_supervision_weights(1 + len(self.net.heads)) if self.build.deep_supervision else None
        self.optimiser = torch.optim.Adam(self.params, lr=c.lr, betas=c.betas, **fused_if_available(d.device))
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimiser, factor=c.plateau_factor,
                                                                    patience=c.plateau_patience)
        self.precision = Precision(c.amp, d.device)
        train_data = PatchDataset(self.cache, self.train_ids, c.patch,
                                  samples_per_epoch=c.steps_per_epoch * c.batch_size, seed=c.seed,
                                  foreground_share=c.foreground_share,
                                  augmentation=default_augmentation() if c.augment else None)
        self.val_data = PatchDataset(self.cache, self.val_ids, c.patch, samples_per_epoch=c.val_patches,
                                     seed=c.seed + 3, foreground_share=1 / 3, augmentation=None)
        self.loader = PatchLoader(train_data, self.share, resolve_loader_workers(c.workers, d.device), world=d.world,
                                  rank=d.rank, device=d.device)

    def restore(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_scaler(state.get("scaler"))
        self.best = state["best"]

    def snapshot(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "optimiser": self.optimiser.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.precision.scaler.state_dict(),
                "best": self.best}

    def guarded(self) -> list[torch.Tensor]:
        return self.params

    def warm_up(self) -> None:
        if self.config.compile:
            example = torch.zeros((self.plan.micro_batch or self.share, self.build.in_channels, *self.config.patch),
                                  device=self.d.device)
            compile_for_training(self.net, example, self.precision.autocast,
                                 say=self.say if self.d.main else (lambda _: None))

    def keep_going(self) -> bool:
        return self.optimiser.param_groups[0]["lr"] >= self.config.min_lr

    def batches(self, epoch: int, start: int, stop: int):
        self.net.train()
        return self.loader.epoch(epoch, start, stop)

    def train_step(self, batch):
        x, y = to_device(batch, self.d.device, self.config.patch)
        self.optimiser.zero_grad(set_to_none=True)
        loss = accumulate_exact(self.model, split_batch(x, y, self.plan.micro_batch), self.precision.backward,
                                precision=self.precision, world=self.d.world,
                                no_sync=self.model.no_sync if self.d.world > 1 else None,
                                foreground_only=LOSSES[self.config.loss], weights=self.weights)
        skipped = guarded_step(self.optimiser, self.params, self.precision, loss=loss, max_norm=self.config.grad_clip)
        return [loss], skipped, ~torch.isfinite(loss) if self.precision.scaler.is_enabled() else skipped

    def epoch_record(self, means: dict[str, float], skipped: int, seconds: float) -> dict[str, Any]:
        """The training loss and the validation Dice (watched, never used to stop or choose
        model.safetensors); the learning rate the epoch trained with."""
        self.net.eval()
        dice = validation_dice(self.net, self.val_data, self.share, num_classes=self.build.num_classes,
                               device=self.d.device,
                               precision=self.precision)
        return {"epoch": self.epoch + 1, "train_loss": means["loss"], "val_dice": dice,
                "lr": self.optimiser.param_groups[0]["lr"], "skipped_steps": skipped, "seconds": seconds}

    def write_epoch(self, record: dict[str, Any], draw: bool) -> None:
        """model.safetensors (this epoch's: the one to score), model_best.safetensors when the
        validation Dice improved (selected on the validation cases: never scored on them)."""
        epoch, dice = record["epoch"], record["val_dice"]
        save_model(self.net, self.run / "model.safetensors", self.preprocessing,
                   extra=training_metadata(self.config.fold, self.val_ids, epoch, selection=LAST_EPOCH))
        if math.isfinite(dice) and dice > self.best:
            self.best = dice
            save_model(self.net, self.run / "model_best.safetensors", self.preprocessing,
                       extra={"epoch": str(epoch), **training_metadata(self.config.fold, self.val_ids, epoch,
                                                                       selection=BEST_DICE)})
        if draw:
            plot_history(self.run / "training.png", self.history, {"train_loss": "training loss (soft Jaccard)"},
                         dice=("val_dice", "validation Dice (watched, not used)"), columns=2)

    def result(self) -> TrainResult:
        return TrainResult(self.run, self.epoch, self.best, history=self.history, plan=self.plan)
