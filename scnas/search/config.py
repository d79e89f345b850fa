"""Settings of a search, with the paper's values as defaults (Section 3, "Implementation details")."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from scnas import defaults as D
from scnas.genotype import MAX_NODES, OPS, PAPER_OPS


class SearchConfig(BaseModel):
    """Everything that defines a search run; saved as ``config.json`` in the run folder."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="task folder (dataset.json) or prepared cache folder")
    spacing: tuple[float, float, float] | None = Field(
        None, description="target spacing when data is a task folder (None: 0.7 mm); a prepared cache has its own")
    fold: int = Field(D.FOLD, ge=0)
    stem: int = Field(D.STEM_SEARCH, ge=1, description="stem channels during search (paper: 48)")
    nodes: int = Field(D.NODES, ge=1, le=MAX_NODES)
    depth: int = Field(D.DEPTH, ge=1, le=8)
    ops: list[str] = Field(default_factory=lambda: list(PAPER_OPS), min_length=2)
    patch: tuple[int, int, int] = D.PATCH
    batch_size: int = Field(D.SEARCH_BATCH_SIZE, ge=1, description="patches per step over all processes (the paper: 4, one on each "
                                                 "of 4 GPUs); a multiple of the number of processes")
    micro_batch: int | None = Field(None, ge=1, description="patches per forward pass (gradients accumulate over a "
                                                            "process's share); None: the largest that fits")
    checkpoint: Literal["auto", "off", "cells", "edges"] = Field(
        "auto", description="activation checkpointing: off, cells (recompute each cell in backward), edges (also "
                            "each edge inside); auto: the cheapest that fits the memory budget")
    epochs: int = Field(D.SEARCH_EPOCHS, ge=1)
    steps_per_epoch: int = Field(D.STEPS_PER_EPOCH, ge=1, description="Theta/alpha step pairs per epoch")
    sampling: Literal["pair", "one", "full"] = D.SAMPLING
    tau_max: float = Field(D.TAU_MAX, gt=0, description="Gumbel-softmax temperature at the first epoch")
    tau_min: float = Field(D.TAU_MIN, gt=0, description="... at the last epoch")
    tau_schedule: Literal["linear", "exponential"] = D.TAU_SCHEDULE
    theta_lr: float = Field(0.025, gt=0, description="paper: 0.025")
    theta_betas: tuple[float, float] = Field((0.1, 0.001), description="as printed in the paper: (0.1, 0.001)")
    alpha_lr: float = Field(D.ALPHA_LR, gt=0, description="paper: 0.003")
    alpha_betas: tuple[float, float] = Field((0.5, 0.999), description="paper: (0.5, 0.999)")
    alpha_weight_decay: float = Field(0.0, ge=0)
    plateau_patience: int = Field(20, ge=1, description="epochs without a lower training loss before the Theta "
                                                        "learning rate is divided by 10 (paper: 20)")
    plateau_factor: float = Field(0.1, gt=0, lt=1)
    grad_clip: float = Field(12.0, gt=0, description="max gradient norm of Theta (nnU-Net's 12)")
    architecture_share: float = Field(0.2, gt=0, lt=1, description="share of a fold's training cases that train "
                                                                    "alpha (paper: 4:1)")
    foreground_share: float = Field(1 / 3, ge=0, le=1)
    augment: bool = True
    val_batches: int = Field(2, ge=1, description="architecture-set batches for the epoch's Dice")
    derive: Literal["top-k", "argmax"] = Field(
        D.DERIVE, description="top-k: DARTS's rule, per node the top_k strongest incoming edges, each with its best "
                             "non-zero op; argmax: per edge the most probable op, zero = no edge")
    top_k: int = Field(D.TOP_K, ge=1, description="incoming edges per node with derive top-k (DARTS: 2)")
    loss: Literal["jaccard", "jaccard-fg"] = Field(
        D.LOSS, description="soft Jaccard distance averaged over all classes (jaccard) or the foreground classes "
                            "only (jaccard-fg)")
    seed: int = D.SEED
    workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        D.WORKERS, description="data loader processes per loader (weights and architecture set); auto: one per core on CUDA (shared with other processes on "
                            "the machine), none on the CPU")
    checkpoint_every_steps: int = Field(0, ge=0, description="also checkpoint every N steps (0: each epoch only)")
    max_nonfinite: int = Field(5, ge=1, description="stop after this many non-finite losses in a row")
    device: Literal["auto", "cpu", "cuda"] = D.DEVICE
    amp: Literal["auto", "off", "fp16", "bf16"] = Field(
        D.AMP, description="mixed precision: fp16 (with gradient scaling), bf16, off; auto: fp16 on CUDA, off on CPU")
    gpu_memory: str | None = Field(None, description="memory to plan for, e.g. 24GiB (default: the CUDA device's free "
                                                     "memory; nothing is planned on the CPU unless given)")
    log_every_steps: int = Field(10, ge=1, description="read losses and the non-finite count back every N steps")
    plots: bool = Field(True, description="draw plots/*.png (after the last epoch and at most every 5 minutes)")

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_from_bool(cls, value):
        # Runs before version 0.2 stored amp as a bool meaning bfloat16 autocast.
        return {True: "bf16", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="before")
    @classmethod
    def _derivation_before_0_3(cls, values):
        # Runs from before the derive setting stored top_k None for "argmax, zero = no edge".
        if isinstance(values, dict) and "top_k" in values and values["top_k"] is None and "derive" not in values:
            values = {**values, "derive": "argmax", "top_k": 2}
        return values

    @model_validator(mode="after")
    def _check(self) -> "SearchConfig":
        unknown = [op for op in self.ops if op not in OPS]
        if unknown:
            raise ValueError(f"unknown ops {unknown}; known: {', '.join(OPS)}")
        if self.tau_min > self.tau_max:
            raise ValueError("tau_min must not exceed tau_max")
        if self.gpu_memory is not None:
            from scnas.build.memory import parse_bytes

            parse_bytes(self.gpu_memory)
        return self

    def tau(self, epoch: int) -> float:
        """The temperature of ``epoch`` (0-based): tau_max at the first, tau_min at the last."""
        if self.epochs == 1:
            return self.tau_min
        fraction = epoch / (self.epochs - 1)
        if self.tau_schedule == "linear":
            return self.tau_max + (self.tau_min - self.tau_max) * fraction
        return math.exp(math.log(self.tau_max) + (math.log(self.tau_min) - math.log(self.tau_max)) * fraction)
