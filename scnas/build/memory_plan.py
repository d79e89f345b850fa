"""Predicting the peak memory of a training or search step without running it at full size,
and the plan that fits a step into a budget (activation checkpointing, micro-batch).

The step runs for real on the CPU, twice, at two tiny sizes, under the allocation tracker
(:mod:`scnas.build.allocations`). Every tensor of these networks either scales with batch x
voxels (activations and their gradients) or does not depend on them (weights, gradients of
weights), and the sequence of allocations does not depend on the size, so the live bytes
after the i-th allocation are an affine function of batch x voxels: two runs give it exactly,
and the peak at any batch and patch is the largest of those functions there
(:class:`StepProfile`). This is much faster than running the step on the ``meta`` device at
full size, and gives the same figures (docs/benchmarks.md).

Mixed precision is emulated (:mod:`scnas.build.autocast_emulation`). Not simulated: cuDNN
workspaces and allocator rounding and fragmentation, covered by :data:`WORKSPACE_BYTES` and
the ``headroom`` of :func:`fits`.
"""

from __future__ import annotations

import math
import threading
from dataclasses import KW_ONLY, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from scnas.build.allocations import PeakTracker, storage_bytes
from scnas.build.autocast_emulation import emulate_autocast
from scnas.byte_sizes import format_bytes

WORKSPACE_BYTES = 512 * 2**20
"""Added to every prediction for convolution workspaces (cuDNN picks them per algorithm; a few
hundred MiB for 3D convolutions of these sizes) and the CUDA allocator's rounding."""


# ---------------------------------------------------------------------------------------------
# Profiles and estimates

SMALL_SIZES = ((2, 2, 2), (3, 2, 2))
"""The two small patches a step is run at, in units of 2**depth voxels per axis (instance norm
needs more than one voxel at the deepest level)."""


@dataclass(frozen=True)
class StepProfile:
    """Live bytes after every allocation of one step, as an affine function of batch x voxels:
    ``base[i] + slope[i] * batch * voxels``; plus the bytes held across steps (``persistent``:
    weights, optimiser state). Exact for the ``batch`` it was measured at; for other batches
    an approximation (within a few percent with activation checkpointing)."""

    base: tuple[float, ...]
    slope: tuple[float, ...]
    persistent: int
    _: KW_ONLY
    batch: int

    def transient(self, batch: int, patch: Sequence[int]) -> int:
        """Peak bytes of the step's own tensors at ``batch`` x ``patch``."""
        units = batch * math.prod(patch)
        return int(max(b + s * units for b, s in zip(self.base, self.slope)))

    def estimate(self, batch: int, patch: Sequence[int]) -> "MemoryEstimate":
        return estimate(self.persistent, self.transient(batch, patch))


def larger(first: StepProfile, second: StepProfile) -> StepProfile:
    """A profile whose peak is the larger of two profiles' at every size (their allocation
    sequences side by side: the peak is a maximum over allocations)."""
    return StepProfile(first.base + second.base, first.slope + second.slope,
                       max(first.persistent, second.persistent), batch=first.batch)


def profile_step(run_step: Callable[[int, tuple[int, int, int]], None], divisor: int, persistent: int,
                 *, batch: int = 1) -> StepProfile:
    """Run ``run_step(batch, patch)`` at two small patches under the tracker and fit the affine
    profile. ``run_step`` must allocate its inputs itself and take the same path at any size.

    Args:
        run_step: runs one step for (batch, patch), allocating its inputs itself.
        divisor: the two simulated patches are multiples of this.
        persistent: bytes that stay allocated between steps (weights, gradients, optimiser
            state).
        batch: the micro-batch the profile is measured at.
    """
    timelines, units = [], []
    for size in SMALL_SIZES:
        patch = tuple(n * divisor for n in size)
        tracker = PeakTracker()
        with torch.random.fork_rng(devices=[]), tracker:
            run_step(batch, patch)  # type: ignore[arg-type]
        timelines.append(tracker.timeline)
        units.append(batch * math.prod(patch))
    small, large = timelines
    if len(small) != len(large):
        raise RuntimeError(f"the simulated step allocated differently at two sizes ({len(small)} vs {len(large)} "
                           "allocations); its memory cannot be extrapolated")
    slope = tuple((b - a) / (units[1] - units[0]) for a, b in zip(small, large))
    base = tuple(a - s * units[0] for a, s in zip(small, slope))
    return StepProfile(base, slope, persistent, batch=batch)


@dataclass
class MemoryEstimate:
    """Predicted peak memory of one step, in bytes."""

    peak: int                # everything: what the device must hold
    persistent: int          # weights, optimiser state (held across steps)
    transient: int           # the step's own peak on top (inputs, activations, gradients, workspaces)

    @property
    def peak_gib(self) -> float:
        return self.peak / 2**30


def estimate(persistent: int, transient: int) -> MemoryEstimate:
    return MemoryEstimate(persistent + transient + WORKSPACE_BYTES, persistent, transient + WORKSPACE_BYTES)


HEADROOM = 0.9
"""Share of a device's memory a plan may fill; the rest is for the allocator's fragmentation,
the CUDA context and what the simulation does not see."""


def fits(estimate_: MemoryEstimate, available: int, headroom: float = HEADROOM) -> bool:
    """Whether a predicted peak fits into ``available`` bytes."""
    return estimate_.peak <= available * headroom


def largest_batch(profile: StepProfile, patch: Sequence[int], available: int, *, limit: int = 4096,
                  headroom: float = HEADROOM) -> int:
    """The largest batch (0 if none) whose step fits into ``available`` bytes at ``patch``.

    Args:
        profile: the step's memory profile.
        patch: the patch size.
        available: the memory budget in bytes.
        limit: the largest batch tried.
        headroom: the share of ``available`` a plan may fill.
    """
    if not fits(profile.estimate(1, patch), available, headroom):
        return 0
    low, high = 1, limit
    while low < high:
        middle = (low + high + 1) // 2
        if fits(profile.estimate(middle, patch), available, headroom):
            low = middle
        else:
            high = middle - 1
    return low


def largest_cubic_patch(profile: StepProfile, batch: int, available: int, *, divisor: int, limit: int = 1024,
                        headroom: float = HEADROOM) -> int:
    """The largest edge n (a multiple of ``divisor``, 0 if none) such that a step on
    batch x n^3 patches fits into ``available`` bytes.

    Args:
        profile: the step's memory profile.
        batch: patches per forward pass.
        available: the memory budget in bytes.
        divisor: the edge must be a multiple of this (``2**depth``).
        limit: the largest edge tried.
        headroom: the share of ``available`` a plan may fill.
    """
    best = 0
    for n in range(divisor, limit + 1, divisor):
        if not fits(profile.estimate(batch, (n, n, n)), available, headroom):
            break
        best = n
    return best




# ---------------------------------------------------------------------------------------------
# What a simulation may cost

SIMULATION_BYTES_PER_PARAMETER = 16
"""This machine's memory a simulated step holds per network parameter: float32 weights, their
gradients and the half-precision copies, with a margin over the measured figure
(docs/benchmarks.md, "Figures behind constants")."""


def parameter_count(make: Callable[[], nn.Module]) -> int:
    """Parameters of the module ``make()`` builds, counted on the meta device: nothing is
    allocated or initialised, so this takes milliseconds whatever the size."""
    with torch.device("meta"):
        return sum(p.numel() for p in make().parameters())


def check_simulation_size(parameters: int, what: str) -> None:
    """Refuse (``MemoryPlanError``), before allocating anything, a step whose simulation would
    need more than half of this machine's memory: ``what`` (e.g. "stem 100000") names the
    setting. Such a network holds its float32 weights and Adam's two moments (12 bytes a
    parameter) on the GPU before any activation."""
    host = physical_memory_bytes()
    need = parameters * SIMULATION_BYTES_PER_PARAMETER
    if host is not None and need > host // 2:
        raise MemoryPlanError(
            f"{what}: the network has {parameters:,} parameters, whose float32 weights and Adam's two moments alone "
            f"take {format_bytes(12 * parameters)} of GPU memory; simulating its step would take about "
            f"{format_bytes(need)} of this machine's memory ({SIMULATION_BYTES_PER_PARAMETER} bytes a parameter; the "
            f"simulation may use half of its {format_bytes(host)}). Use a smaller --stem")


def physical_memory_bytes() -> int | None:
    """This machine's physical memory, if the system says (a fixed figure, so a refusal does not
    depend on what else runs)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


# ---------------------------------------------------------------------------------------------
# Steps


_SIMULATIONS = threading.RLock()


class _Simulation:
    """Settings that make a simulated step take the same path at every size (no batch-1 CPU
    routing) and leave the caller's random state alone. One simulation at a time: the routing
    switch is global (another thread's CPU convolutions meanwhile take torch's own, equal but
    slower, path) and so is :attr:`PeakTracker.active`."""

    def __enter__(self):
        from scnas.build import ops

        _SIMULATIONS.acquire()
        self._ops, self._route = ops, ops.ROUTE_BATCH1_TO_ONEDNN
        ops.ROUTE_BATCH1_TO_ONEDNN = False
        self._rng = torch.random.fork_rng(devices=[])
        self._rng.__enter__()
        torch.default_generator.manual_seed(0)
        return self

    def __exit__(self, *exc):
        try:
            self._ops.ROUTE_BATCH1_TO_ONEDNN = self._route
            self._rng.__exit__(*exc)
        finally:
            _SIMULATIONS.release()


def training_step_profile(genotype, config, amp: str = "off", *, checkpoint: str = "off", batch: int = 1,
                          share: int | None = None) -> StepProfile:
    """The memory profile of one training step of ``build_network(genotype, config)`` on a
    micro-batch of ``batch`` patches: forward, soft Jaccard loss (with ``config.deep_supervision``
    nnU-Net's weighted loss over the main output and the heads, as training computes it),
    backward into existing gradients (the steady state of gradient accumulation), with Adam's
    two moments held beside the weights and the process's whole ``share`` of patches (default:
    ``batch``) on the device.

    Args:
        genotype: the cells of the network.
        config: the network's settings.
        amp: the precision: ``off``, ``fp16`` or ``bf16``.
        checkpoint: the checkpointing mode: ``off``, ``cells`` or ``edges``.
        batch: the micro-batch simulated.
        share: the process's patches per step, all on the device (default: ``batch``).
    """
    from scnas.metrics import deep_supervision_weights, soft_jaccard_loss, supervised_loss
    from scnas.build.network import build_network

    check_simulation_size(parameter_count(lambda: build_network(genotype, config)), f"stem {config.stem_channels}")
    with _Simulation():
        net = build_network(genotype, config)
        net.train()
        net.set_checkpointing(checkpoint)
        emulate_autocast(net, amp)
        params = list(net.parameters())

        def run_step(batch: int, patch: tuple[int, int, int]) -> None:
            for p in params:
                p.grad = torch.zeros_like(p)
            whole = max(share or batch, batch)
            x = torch.randn(whole, config.in_channels, *patch)
            y = torch.randint(0, config.num_classes, (whole, *patch))
            out = net(x[:batch])
            if isinstance(out, list):
                supervised_loss(out, y[:batch], deep_supervision_weights(len(out))).backward()
            else:
                soft_jaccard_loss(out, y[:batch]).backward()
            for p in params:
                p.grad = None

        return profile_step(run_step, config.divisor, 3 * storage_bytes(params), batch=batch)


# ---------------------------------------------------------------------------------------------
# Plans


class MemoryPlanError(ValueError):
    """No setting of checkpointing and micro-batch fits; the message says what would."""


@dataclass
class MemoryPlan:
    """How a step will run: activation checkpointing, patches per forward pass, and (when a
    memory budget is known) the predicted peak against it."""

    checkpoint: str
    micro_batch: int
    estimate: MemoryEstimate | None = None
    _: KW_ONLY
    available: int | None = None

    def describe(self) -> str:
        text = f"checkpointing {self.checkpoint}, micro-batch {self.micro_batch}"
        if self.estimate is not None and self.available is not None:
            text += (f"; predicted peak {format_bytes(self.estimate.peak)} of {format_bytes(self.available)} "
                     f"(plans fill at most {HEADROOM:.0%})")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "micro_batch": self.micro_batch,
                "predicted_peak_bytes": None if self.estimate is None else self.estimate.peak,
                "available_bytes": self.available}


def choose_plan(profile_of: Callable[[str, int], StepProfile], patch: Sequence[int], share: int, *, checkpoint: str,
                micro_batch: int | None, available: int | None, divisor: int) -> MemoryPlan:
    """The cheapest way to run a step of ``share`` patches per process within ``available``
    bytes. ``checkpoint`` ``auto`` tries off, cells, edges in that order; ``micro_batch`` None
    takes the largest micro-batch that fits. Without ``available`` (no budget known) nothing
    is checked: auto means off and the micro-batch is the share.

    Gradient accumulation is preferred to checkpointing: with the exact batch loss it costs
    one gradient-free forward pass per further micro-batch, checkpointing one forward pass
    per micro-batch.

    Args:
        profile_of: the step's memory profile for (checkpointing mode, micro-batch).
        patch: the patch size.
        share: patches per process and step.
        checkpoint: a checkpointing mode, or ``auto``.
        micro_batch: patches per forward pass (None: the largest that fits).
        available: the memory budget in bytes (None: nothing to check).
        divisor: patch sizes must be multiples of this (for the suggestions of a refusal).
    """
    from scnas.build.network import CHECKPOINT_MODES

    modes = list(CHECKPOINT_MODES) if checkpoint == "auto" else [checkpoint]
    if available is None:
        return MemoryPlan(modes[0], min(micro_batch or share, share))
    last: tuple[str, StepProfile] | None = None
    for mode in modes:
        if micro_batch is not None:
            size = min(micro_batch, share)
            profile = profile_of(mode, size)
            if fits(profile.estimate(size, patch), available):
                return MemoryPlan(mode, size, profile.estimate(size, patch), available=available)
            last = (mode, profile)
            continue
        single = profile_of(mode, 1)
        last = (mode, single)
        size = min(share, largest_batch(single, patch, available))
        while size >= 1:
            profile = single if size == 1 else profile_of(mode, size)
            if fits(profile.estimate(size, patch), available):
                return MemoryPlan(mode, size, profile.estimate(size, patch), available=available)
            size -= 1
    assert last is not None
    mode, profile = last
    size = micro_batch or 1
    needed = profile.estimate(size, patch).peak
    edge = largest_cubic_patch(profile, size, available, divisor=divisor)
    hint = (f"a patch of {edge}x{edge}x{edge} fits with checkpointing {mode}" if edge
            else "no patch fits: use a smaller --stem, or a GPU with more memory")
    raise MemoryPlanError(
        f"one step at patch {'x'.join(map(str, patch))}, micro-batch {size}, checkpointing {mode} needs about "
        f"{format_bytes(needed)}; {format_bytes(available)} are available (plans fill at most {HEADROOM:.0%}). "
        f"{hint[0].upper() + hint[1:]}; 'scnas plan' shows the options")


def plan_training_step(genotype, config, amp: str, *, patch: Sequence[int], share: int, checkpoint: str,
                       micro_batch: int | None, available: int | None) -> MemoryPlan:
    """The :class:`MemoryPlan` of retraining ``genotype`` (see :func:`choose_plan`).

    Args:
        genotype: the cells of the network to retrain.
        config: the network's settings.
        amp: the precision: ``off``, ``fp16`` or ``bf16``.
        patch: the patch size.
        share: patches per process and step.
        checkpoint: a checkpointing mode, or ``auto``: the cheapest that fits.
        micro_batch: patches per forward pass (None: the largest that fits).
        available: the memory budget in bytes (None: nothing to check).
    """
    cache: dict[tuple[str, int], StepProfile] = {}

    def profile_of(mode: str, batch: int) -> StepProfile:
        if (mode, batch) not in cache:
            cache[mode, batch] = training_step_profile(genotype, config, amp, checkpoint=mode, batch=batch, share=share)
        return cache[mode, batch]

    return choose_plan(profile_of, patch, share, checkpoint=checkpoint, micro_batch=micro_batch, available=available,
                       divisor=config.divisor)

