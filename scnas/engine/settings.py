"""The settings every run shares, search or training: data and fold, the network's width and
depth, patches and batches, how a step fits into memory, epochs, the loss, the data loader,
the device, precision, bookkeeping. ``SearchConfig`` and ``TrainConfig`` add their own (and
their own defaults where the paper differs). Torch-free."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from scnas import defaults as D


class RunSettings(BaseModel):
    """What search and training have in common; saved in ``config.json`` with the rest."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="task folder (dataset.json) or prepared cache folder")
    spacing: tuple[float, float, float] | None = Field(
        None, description="target spacing when data is a task folder (None: 0.7 mm); a prepared cache has its own")
    fold: int = Field(D.FOLD, ge=0)
    stem: int = Field(D.STEM_TRAIN, ge=1, description="stem channels (paper: 48 during search, 68 for retraining)")
    depth: int = Field(D.DEPTH, ge=1, le=8)
    patch: tuple[int, int, int] = D.PATCH
    batch_size: int = Field(D.TRAIN_BATCH_SIZE, ge=1, description="patches per step over all processes; a multiple "
                                                                  "of the number of processes")
    micro_batch: int | None = Field(None, ge=1, description="patches per forward pass (gradients accumulate exactly "
                                                            "over a process's share); None: the largest that fits")
    checkpoint: Literal[D.CHECKPOINT_CHOICES] = Field(
        "auto", description="activation checkpointing: off, cells (recompute each cell in backward), edges (also "
                            "each edge inside); auto: the cheapest that fits the memory budget")
    epochs: int = Field(D.TRAIN_EPOCHS, ge=1)
    steps_per_epoch: int = Field(D.STEPS_PER_EPOCH, ge=1)
    plateau_patience: int = Field(30, ge=1, description="epochs without a lower training loss before the learning "
                                                        "rate is multiplied by plateau_factor")
    plateau_factor: float = Field(0.2, gt=0, lt=1)
    grad_clip: float = Field(12.0, gt=0, description="max gradient norm of the network weights (nnU-Net's 12)")
    loss: Literal[D.LOSS_CHOICES] = Field(
        D.LOSS, description="soft Jaccard distance averaged over all classes (jaccard) or the foreground classes "
                            "only (jaccard-fg)")
    foreground_share: float = Field(1 / 3, ge=0, le=1)
    augment: bool = True
    seed: int = D.SEED
    workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        D.WORKERS, description="data loader processes (per loader); auto: one per core on CUDA (shared with other "
                               "processes on the machine), none on the CPU")
    checkpoint_every_steps: int = Field(0, ge=0, description="also checkpoint every N steps (0: each epoch only)")
    max_nonfinite: int = Field(5, ge=1, description="stop after this many non-finite losses in a row")
    device: Literal[D.DEVICE_CHOICES] = D.DEVICE
    amp: Literal[D.AMP_CHOICES] = Field(
        D.AMP, description="mixed precision: fp16 (with gradient scaling), bf16, off; auto: fp16 on CUDA, off on CPU")
    gpu_memory: str | None = Field(None, description="memory to plan for, e.g. 24GiB (default: the CUDA device's free "
                                                     "memory; nothing is planned on the CPU unless given)")
    log_every_steps: int = Field(10, ge=1, description="read losses and the non-finite count back every N steps")
    plots: bool = Field(True, description="draw the run's figures (after the last epoch and at most every 5 "
                                          "minutes; the numbers are in metrics.jsonl either way)")

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_from_bool(cls, value):
        # Runs before version 0.2 stored amp as a bool meaning bfloat16 autocast.
        return {True: "bf16", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("gpu_memory")
    @classmethod
    def _memory(cls, value):
        if value is not None:
            from scnas.byte_sizes import parse_bytes

            parse_bytes(value)
        return value
