"""``scnas plan``: the memory of a training or search step for a setting, every checkpointing
mode side by side, the plan ``scnas train`` / ``scnas search`` would pick, and the largest
micro-batch, patch and stem that fit a memory budget.

Predictions come from :mod:`scnas.build.memory_plan` (training) and :mod:`scnas.search.supernet_memory`
(search): a step run at two small sizes under an allocation tracker and extrapolated
exactly in batch x voxels.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, asdict, dataclass, field
from typing import Any, Callable

from scnas.build import BuildConfig
from scnas.build.memory_plan import (MemoryPlanError, StepProfile, choose_plan, largest_batch, largest_cubic_patch,
                                parameter_count, training_step_profile)
from scnas.build.network import CHECKPOINT_MODES
from scnas.genotype import Genotype

LARGEST_STEM_PARAMETERS = 2**26
"""The search for the largest stem that fits simulates networks of at most this many
parameters (67 M: 10x the paper's network at stem 68, twice nnU-Net's largest 3D one), so
that its time is bounded whatever the budget; beyond it the report says "at least"
(timings: docs/benchmarks.md, "Figures behind constants")."""

MAX_PLANNED_SEARCH_NODES = 8
"""Search steps are simulated for at most this many nodes per cell (the paper: 4). The
supernet grows with the square of the nodes (64 nodes: 2,144 edges per cell, each with up
to 8 operations), and so does the time to simulate it (docs/memory.md)."""


@dataclass
class ModeRow:
    checkpoint: str
    micro_batch: int
    peak: int
    _: KW_ONLY
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
    _: KW_ONLY
    available: int | None
    plan: dict[str, Any] | None = None     # what train/search would run with, or None
    refusal: str | None = None             # why nothing fits
    largest_stem: int | None = None
    largest_stem_is_a_bound: bool = False   # the search for it stopped at LARGEST_STEM_PARAMETERS
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def memory_report(build: BuildConfig, patch: tuple[int, int, int], batch_size: int, *, amp: str,
                  checkpoint: str = "auto",
                  micro_batch: int | None = None, available: int | None = None, world: int = 1,
                  genotype: Genotype | None = None, nodes: int = 4, ops: list[str] | None = None,
                  sampling: str = "pair", find_stem: bool = True,
                  progress: Callable[[str], None] = lambda message: None) -> MemoryReport:
    """Predicted peak memory per process of one step (training when ``genotype`` is given,
    search otherwise) for every checkpointing mode; with ``available`` also the plan and the
    largest micro-batch, cubic patch and stem that fit. ``amp`` is off, fp16 or bf16.

    Args:
        build: the network's settings (stem, channels, classes, depth, deep supervision).
        patch: the patch size (D, H, W).
        batch_size: the global batch, a multiple of ``world``.
        amp: the precision the step runs in: ``off``, ``fp16`` or ``bf16``.
        checkpoint: a checkpointing mode, or ``auto``: every mode side by side.
        micro_batch: patches per forward pass (None: the process's whole share).
        available: the memory budget in bytes (None: report only, no plan).
        world: processes sharing the batch.
        genotype: the genotype to retrain; None plans a search.
        nodes: search: intermediate nodes per cell (at most :data:`MAX_PLANNED_SEARCH_NODES`).
        ops: search: the op vocabulary.
        sampling: search: ``pair``, ``one`` or ``full``.
        find_stem: also search for the largest stem that fits (with ``available``).
        progress: called with a line before each simulation.
    """
    from scnas.search.supernet_memory import search_step_profile, supernet_parameters

    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} is the global batch: a multiple of --world-size {world}")
    share = batch_size // world
    if micro_batch is not None and micro_batch > share:
        raise ValueError(f"--micro-batch {micro_batch} is more patches than a process has: its share of the batch is "
                         f"{share} (--batch-size {batch_size} over --world-size {world}); give at most {share}")
    if genotype is None and nodes > MAX_PLANNED_SEARCH_NODES:
        raise ValueError(f"--nodes {nodes}: scnas plan simulates search steps of at most {MAX_PLANNED_SEARCH_NODES} "
                         f"nodes per cell (the paper: 4): the supernet grows with the square of the nodes ({nodes} "
                         f"nodes: {2 * nodes + nodes * (nodes - 1) // 2:,} edges per cell, each with up to "
                         f"{len(ops or [])} operations), and so does the time to simulate it")
    size = min(micro_batch or share, share)
    kind = "training" if genotype is not None else "search"

    def profile_for(config: BuildConfig) -> Callable[[str, int], StepProfile]:
        cache: dict[tuple[str, int], StepProfile] = {}

        def profile_of(mode: str, batch: int) -> StepProfile:
            if (mode, batch) not in cache:
                progress(f"simulating a {kind} step: stem {config.stem_channels}, checkpointing {mode}, micro-batch {batch}")
                if genotype is not None:
                    cache[mode, batch] = training_step_profile(genotype, config, amp, checkpoint=mode, batch=batch,
                                                               share=share)
                else:
                    cache[mode, batch] = search_step_profile(config, nodes, ops, sampling=sampling, amp=amp,
                                                             checkpoint=mode, batch=batch, draw_kind="bound",
                                                             share=share)
            return cache[mode, batch]
        return profile_of

    profile_of = profile_for(build)
    rows = []
    modes = list(CHECKPOINT_MODES) if checkpoint == "auto" else [checkpoint]
    for mode in modes:
        profile = profile_of(mode, size)
        estimate = profile.estimate(size, patch)
        row = ModeRow(mode, size, estimate.peak, persistent=estimate.persistent, transient=estimate.transient)
        if genotype is None:
            typical = search_step_profile(build, nodes, ops, sampling=sampling, amp=amp, checkpoint=mode, batch=size,
                                          draw_kind="typical", share=share)
            row.typical_peak = typical.estimate(size, patch).peak
        if available is not None:
            from scnas.build.memory_plan import fits

            row.fits = fits(estimate, available)
            single = profile_of(mode, 1)
            row.largest_micro_batch = largest_batch(single, patch, available)
            row.largest_cubic_patch = largest_cubic_patch(single, 1, available, divisor=build.divisor)
        rows.append(row)
    report = MemoryReport(kind, {"stem": build.stem_channels, "in_channels": build.in_channels,
                                 "num_classes": build.num_classes, "depth": build.depth, "patch": list(patch),
                                 "batch_size": batch_size, "world_size": world, "share": share, "amp": amp,
                                 "nodes": nodes if genotype is None else genotype.nodes,
                                 "sampling": sampling if genotype is None else None},
                          rows, available=available)
    if genotype is None:
        report.notes.append("search peaks are planned with the larger of a draw of the heaviest operations on every "
                            "edge and the 'typical' one, a draw at uniform alpha as in the first epochs")
    if available is None:
        return report
    try:
        plan = choose_plan(profile_of, patch, share, checkpoint=checkpoint, micro_batch=micro_batch,
                           available=available, divisor=build.divisor)
        report.plan = plan.to_dict()
    except MemoryPlanError as exc:
        report.refusal = str(exc)
        return report
    if find_stem:
        if genotype is not None:
            def parameters(config: BuildConfig) -> int:
                from scnas.build.network import build_network

                return parameter_count(lambda: build_network(genotype, config))
        else:
            def parameters(config: BuildConfig) -> int:
                return supernet_parameters(config, nodes, tuple(ops or []))
        report.largest_stem, report.largest_stem_is_a_bound = _largest_stem(
            build, profile_for, patch, plan.checkpoint, plan.micro_batch, available, parameters)
        if report.largest_stem_is_a_bound:
            report.notes.append(f"the largest stem that fits is at least {report.largest_stem}: the search for it "
                                f"simulates networks of at most {LARGEST_STEM_PARAMETERS:,} parameters, and stem "
                                f"{report.largest_stem + 1} has more")
    return report


def _largest_stem(build: BuildConfig, profile_for, patch, mode: str, micro_batch: int, available: int,
                  parameters: Callable[[BuildConfig], int]) -> tuple[int, bool]:
    """The largest stem width at which one micro-batch fits with ``mode`` (bisection; memory
    grows with the stem), and whether the stem above it went unsimulated because its network
    has more than :data:`LARGEST_STEM_PARAMETERS` parameters (then the answer is a lower bound).
    Parameters grow with the square of the stem, so the work is bounded whatever the budget."""
    from scnas.build.memory_plan import fits

    too_large: set[int] = set()

    def ok(stem: int) -> bool:
        config = build.model_copy(update={"stem_channels": stem})
        if parameters(config) > LARGEST_STEM_PARAMETERS:
            too_large.add(stem)
            return False
        return fits(profile_for(config)(mode, micro_batch).estimate(micro_batch, patch), available)

    low, high = build.stem_channels, build.stem_channels * 2
    while ok(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if ok(middle):
            low = middle
        else:
            high = middle
    return low, high in too_large
