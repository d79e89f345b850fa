"""``scnas plan``: the memory of a training or search step for a setting, every checkpointing
mode side by side, the plan ``scnas train`` / ``scnas search`` would pick, and the largest
micro-batch, patch and stem that fit a memory budget.

Predictions come from :mod:`scnas.build.memory` (training) and :mod:`scnas.search.memory`
(search): a step run at two small sizes under an allocation tracker and extrapolated
exactly in batch x voxels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from scnas.build import BuildConfig
from scnas.build.memory import (MemoryPlanError, StepProfile, choose_plan, largest_batch, largest_cubic_patch,
                                training_step_profile)
from scnas.build.network import CHECKPOINT_MODES
from scnas.genotype import Genotype


@dataclass
class ModeRow:
    checkpoint: str
    micro_batch: int
    peak: int
    persistent: int
    transient: int
    typical_peak: int | None = None      # search: one seeded draw at uniform alpha
    fits: bool | None = None
    largest_micro_batch: int | None = None
    largest_cubic_patch: int | None = None


@dataclass
class MemoryReport:
    kind: str                              # "training" or "search"
    setting: dict[str, Any]
    rows: list[ModeRow]
    available: int | None
    plan: dict[str, Any] | None = None     # what train/search would run with, or None
    refusal: str | None = None             # why nothing fits
    largest_stem: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def memory_report(build: BuildConfig, patch: tuple[int, int, int], batch_size: int, amp: str, checkpoint: str = "auto",
                  micro_batch: int | None = None, available: int | None = None, world: int = 1,
                  genotype: Genotype | None = None, nodes: int = 4, ops: list[str] | None = None,
                  sampling: str = "pair", find_stem: bool = True,
                  progress: Callable[[str], None] = lambda message: None) -> MemoryReport:
    """Predicted peak memory per process of one step (training when ``genotype`` is given,
    search otherwise) for every checkpointing mode; with ``available`` also the plan and the
    largest micro-batch, cubic patch and stem that fit. ``amp`` is off, fp16 or bf16."""
    from scnas.search.memory import search_step_profile

    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} is the global batch: a multiple of --world-size {world}")
    share = batch_size // world
    size = min(micro_batch or share, share)
    kind = "training" if genotype is not None else "search"

    def profile_for(config: BuildConfig) -> Callable[[str, int], StepProfile]:
        cache: dict[tuple[str, int], StepProfile] = {}

        def profile_of(mode: str, batch: int) -> StepProfile:
            if (mode, batch) not in cache:
                progress(f"simulating a {kind} step: stem {config.stem_channels}, checkpointing {mode}, micro-batch {batch}")
                if genotype is not None:
                    cache[mode, batch] = training_step_profile(genotype, config, amp, mode, batch, share)
                else:
                    cache[mode, batch] = search_step_profile(config, nodes, ops, sampling, amp, mode, batch, "bound",
                                                             share)
            return cache[mode, batch]
        return profile_of

    profile_of = profile_for(build)
    rows = []
    modes = list(CHECKPOINT_MODES) if checkpoint == "auto" else [checkpoint]
    for mode in modes:
        profile = profile_of(mode, size)
        estimate = profile.estimate(size, patch)
        row = ModeRow(mode, size, estimate.peak, estimate.persistent, estimate.transient)
        if genotype is None:
            typical = search_step_profile(build, nodes, ops, sampling, amp, mode, size, "typical", share)
            row.typical_peak = typical.estimate(size, patch).peak
        if available is not None:
            from scnas.build.memory import fits

            row.fits = fits(estimate, available)
            single = profile_of(mode, 1)
            row.largest_micro_batch = largest_batch(single, patch, available)
            row.largest_cubic_patch = largest_cubic_patch(single, 1, available, build.divisor)
        rows.append(row)
    report = MemoryReport(kind, {"stem": build.stem_channels, "in_channels": build.in_channels,
                                 "num_classes": build.num_classes, "depth": build.depth, "patch": list(patch),
                                 "batch_size": batch_size, "world_size": world, "share": share, "amp": amp,
                                 "nodes": nodes if genotype is None else genotype.nodes,
                                 "sampling": sampling if genotype is None else None},
                          rows, available)
    if genotype is None:
        report.notes.append("search peaks are planned with the larger of a draw of the heaviest operations on every "
                            "edge and the 'typical' one, a draw at uniform alpha as in the first epochs")
    if available is None:
        return report
    try:
        plan = choose_plan(profile_of, patch, share, checkpoint, micro_batch, available, build.divisor)
        report.plan = plan.to_dict()
    except MemoryPlanError as exc:
        report.refusal = str(exc)
        return report
    if find_stem:
        report.largest_stem = _largest_stem(build, profile_for, patch, plan.checkpoint, plan.micro_batch, available)
    return report


def _largest_stem(build: BuildConfig, profile_for, patch, mode: str, micro_batch: int, available: int) -> int:
    """The largest stem width at which one micro-batch fits with ``mode`` (bisection; memory
    grows with the stem)."""
    from scnas.build.memory import fits

    def ok(stem: int) -> bool:
        config = build.model_copy(update={"stem_channels": stem})
        return fits(profile_for(config)(mode, micro_batch).estimate(micro_batch, patch), available)

    low, high = build.stem_channels, build.stem_channels * 2
    while ok(high) and high < 4096:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if ok(middle):
            low = middle
        else:
            high = middle
    return low
