"""Settings of a search, with the paper's values as defaults (Section 3, "Implementation details")."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from scnas import defaults as D
from scnas.genotype import MAX_NODES, OPS, PAPER_OPS
from scnas.engine.settings import RunSettings


class SearchConfig(RunSettings):
    """Everything that defines a search run; saved as ``config.json`` in the run folder. The
    settings shared with training are :class:`scnas.engine.settings.RunSettings`'s; the paper's values
    for the search where they differ."""

    stem: int = Field(D.STEM_SEARCH, ge=1, description="stem channels during search (paper: 48)")
    nodes: int = Field(D.NODES, ge=1, le=MAX_NODES)
    ops: list[str] = Field(default_factory=lambda: list(PAPER_OPS), min_length=2)
    batch_size: int = Field(D.SEARCH_BATCH_SIZE, ge=1, description="patches per step over all processes (the paper: "
                                                                   "4, one on each of 4 GPUs); a multiple of the "
                                                                   "number of processes")
    epochs: int = Field(D.SEARCH_EPOCHS, ge=1)
    steps_per_epoch: int = Field(D.STEPS_PER_EPOCH, ge=1, description="Theta/alpha step pairs per epoch")
    sampling: Literal[D.SAMPLING_CHOICES] = D.SAMPLING
    tau_max: float = Field(D.TAU_MAX, gt=0, description="Gumbel-softmax temperature at the first epoch")
    tau_min: float = Field(D.TAU_MIN, gt=0, description="... at the last epoch")
    tau_schedule: Literal[D.TAU_SCHEDULE_CHOICES] = D.TAU_SCHEDULE
    theta_lr: float = Field(0.025, gt=0, description="paper: 0.025")
    theta_betas: tuple[float, float] = Field((0.1, 0.001), description="as printed in the paper: (0.1, 0.001)")
    alpha_lr: float = Field(D.ALPHA_LR, gt=0, description="paper: 0.003")
    alpha_betas: tuple[float, float] = Field((0.5, 0.999), description="paper: (0.5, 0.999)")
    alpha_weight_decay: float = Field(0.0, ge=0)
    plateau_patience: int = Field(20, ge=1, description="epochs without a lower training loss before the Theta "
                                                        "learning rate is divided by 10 (paper: 20)")
    plateau_factor: float = Field(0.1, gt=0, lt=1)
    architecture_share: float = Field(0.2, gt=0, lt=1, description="share of a fold's training cases that train "
                                                                    "alpha (paper: 4:1)")
    val_batches: int = Field(2, ge=1, description="architecture-set batches for the epoch's Dice")
    derive: Literal[D.DERIVE_CHOICES] = Field(
        D.DERIVE, description="top-k: DARTS's rule, per node the top_k strongest incoming edges, each with its best "
                             "non-zero op; argmax: per edge the most probable op, zero = no edge")
    top_k: int = Field(D.TOP_K, ge=1, description="incoming edges per node with derive top-k (DARTS: 2)")
    # Countermeasures to collapse onto parameter-free operations (docs/search.md); off by default: the paper's search.
    warmup_epochs: int = Field(0, ge=0, description="epochs that train Theta alone before alpha moves (PC-DARTS, "
                                                    "most DARTS code); alpha's loss is still measured")
    free_penalty: float = Field(0.0, ge=0, description="adds this times softmax(alpha)'s mean mass on parameter-free "
                                                       "operations (summed over cell types) to the alpha objective")
    max_free: int | None = Field(None, ge=0, description="at most this many parameter-free operations per derived "
                                                         "cell; the weakest others get their edge's best operation "
                                                         "with weights (P-DARTS, DARTS+: 2 skip connections)")
    aux_skip: float = Field(0.0, ge=0, description="DARTS-'s auxiliary skip: every mixed edge of stride 1 adds "
                                                   "this times its input, outside alpha, with the weight decayed "
                                                   "linearly to 0 at the last epoch; 0: none")
    hessian_iterations: int = Field(0, ge=0, description="power iterations for the dominant eigenvalue of the alpha "
                                                         "loss's Hessian at each epoch's end (R-DARTS); 0: not measured")

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
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be fewer than epochs ({self.epochs}), or "
                             "alpha never moves")
        return self

    def aux_skip_at(self, epoch: int) -> float:
        """DARTS-'s auxiliary skip weight in ``epoch`` (0-based): aux_skip at the first, decayed
        linearly to 0 at the last."""
        return 0.0 if self.epochs == 1 else self.aux_skip * (1.0 - epoch / (self.epochs - 1))

    def tau(self, epoch: int) -> float:
        """The temperature of ``epoch`` (0-based): tau_max at the first, tau_min at the last."""
        if self.epochs == 1:
            return self.tau_min
        fraction = epoch / (self.epochs - 1)
        if self.tau_schedule == "linear":
            return self.tau_max + (self.tau_min - self.tau_max) * fraction
        return math.exp(math.log(self.tau_max) + (math.log(self.tau_min) - math.log(self.tau_max)) * fraction)
