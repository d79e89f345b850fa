"""Size and cost of a built network: parameters, MACs/FLOPs and activation memory.

Everything runs on PyTorch's ``meta`` device (shapes only, no arithmetic), so the numbers of
a stem-68 network at 4x128x128x128 come in a second or two. FLOPs are counted by
``torch.utils.flop_counter`` and cover convolutions (grouped ones correctly); a
multiply-add counts as 2 FLOPs and 1 MAC. Norms, activations, pooling, upsampling and
additions are not counted (they are a few percent of the convolution cost).
"""

from __future__ import annotations

import math

from dataclasses import KW_ONLY, asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from scnas.build.config import BuildConfig
from scnas.build.network import CellModule, Resample, SCNASUNet, build_network, check_spatial_size, node_width
from scnas.genotype import Genotype, short_hash

FLOP_NOTE = ("FLOPs = 2 x MACs of all convolutions (torch.utils.flop_counter); norms, activations, pooling, "
             "upsampling and additions not counted")
MEMORY_NOTE = ("activation estimate in float32: training keeps every module output for backward; inference "
               "holds the largest cell's tensors plus the encoder outputs waiting for the decoder")


@dataclass
class CellStats:
    name: str
    cell_type: str
    level: int
    _: KW_ONLY
    node_width: int
    out_channels: int
    used: bool             # False: the output cannot reach the network output, so it is not built
    params: int
    macs: int
    activation_bytes: int


@dataclass
class LevelStats:
    level: int
    resolution: tuple[int, int, int]
    channels: int          # nominal cell width stem * 2**level
    _: KW_ONLY
    node_width: int
    params: int = 0
    macs: int = 0
    activation_bytes: int = 0
    cells: list[str] = field(default_factory=list)


@dataclass
class NetworkStats:
    genotype_hash: str
    config: dict[str, Any]
    patch: tuple[int, int, int]
    _: KW_ONLY
    batch: int
    params: int
    macs: int
    flops: int
    train_activation_bytes: int
    inference_activation_bytes: int
    levels: list[LevelStats]
    cells: list[CellStats]
    flop_note: str = FLOP_NOTE
    memory_note: str = MEMORY_NOTE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _activation_recorder(model: nn.Module, sizes: dict[str, int]) -> list[Any]:
    """Forward hooks adding each module's output size (elements) under its top-level owner."""
    handles = []
    for name, module in model.named_modules():
        parts = name.split(".")
        owner = ".".join(parts[:2]) if parts[0] in ("cells", "skips", "heads") else parts[0]
        counts = len(list(module.children())) == 0 or isinstance(module, CellModule)

        def hook(mod, inputs, output, owner=owner, counts=counts):
            if counts and isinstance(output, torch.Tensor):
                sizes[owner] = sizes.get(owner, 0) + output.numel()
            if isinstance(mod, Resample) and mod.scale > 1:  # the interpolated tensor is not a module output
                sizes[owner] = sizes.get(owner, 0) + inputs[0].numel() * mod.scale ** 3
        if name:
            handles.append(module.register_forward_hook(hook))
    return handles


def network_stats(genotype: Genotype, config: BuildConfig, patch: tuple[int, int, int] = (128, 128, 128),
                  *, batch: int = 1) -> NetworkStats:
    """Parameters, MACs/FLOPs and activation memory of ``build_network(genotype, config)`` for
    inputs of shape (batch, in_channels, *patch).

    Args:
        genotype: the cells.
        config: the network's settings.
        patch: the input's spatial size, multiples of ``config.divisor``.
        batch: the input's batch size.
    """
    patch = tuple(int(n) for n in patch)
    check_spatial_size(patch, config)
    with torch.device("meta"):
        model: SCNASUNet = build_network(genotype, config)
    model.train()
    sizes: dict[str, int] = {}
    handles = _activation_recorder(model, sizes)
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(torch.empty(batch, config.in_channels, *patch, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    per_module = {key.split(".", 1)[1]: sum(ops.values()) for key, ops in counter.get_flop_counts().items()
                  if key.count(".") in (1, 2) and key != "Global"}
    flops = counter.get_total_flops()
    bytes_per = 4

    def level_resolution(level: int) -> tuple[int, int, int]:
        return tuple(n // 2 ** level for n in patch)  # type: ignore[return-value]

    levels = {lv: LevelStats(lv, level_resolution(lv), config.stem_channels * 2 ** lv,
                             node_width=node_width(config, genotype.nodes, lv)) for lv in range(config.depth + 1)}
    cells = []
    slot_level = {slot.name: slot.level for slot in model.layout}
    for slot, channels in zip(model.layout, model.out_channels):
        key = f"cells.{slot.name}"
        cell = model.cells[slot.name] if slot.name in model.cells else None
        stats = CellStats(slot.name, slot.cell_type, slot.level, node_width=node_width(config, genotype.nodes,
                                                                                       slot.level),
                          out_channels=channels, used=cell is not None,
                          params=_count_params(cell) if cell is not None else 0,
                          macs=per_module.get(key, 0) // 2, activation_bytes=sizes.get(key, 0) * bytes_per)
        cells.append(stats)
        level = levels[slot.level]
        level.cells.append(slot.name)
        level.params += stats.params
        level.macs += stats.macs
        level.activation_bytes += stats.activation_bytes
    for name, module in [("stem", model.stem), ("out", model.out)]:
        levels[0].params += _count_params(module)
        levels[0].macs += per_module.get(name, 0) // 2
        levels[0].activation_bytes += sizes.get(name, 0) * bytes_per
    for group in ("skips", "heads"):
        for slot_name, module in getattr(model, group).items():
            key = f"{group}.{slot_name}"
            level = levels[slot_level[slot_name]]
            level.params += _count_params(module)
            level.macs += per_module.get(key, 0) // 2
            level.activation_bytes += sizes.get(key, 0) * bytes_per
    train_bytes = (sum(sizes.values()) + batch * config.in_channels * _voxels(patch)) * bytes_per
    # Encoder outputs (stem included) stay alive until their decoder cell; the peak is reached
    # inside some cell, on top of those and of the cell's two inputs.
    held = batch * config.stem_channels * _voxels(patch)
    held += sum(batch * c.out_channels * _voxels(level_resolution(c.level))
                for c in cells if c.cell_type == "encoder_normal" and c.level < config.depth and c.used)
    largest_cell = max(c.activation_bytes for c in cells)
    inference_bytes = held * bytes_per + largest_cell
    return NetworkStats(short_hash(genotype), config.model_dump(), patch, batch=batch, params=_count_params(model),
                        macs=flops // 2,
                        flops=flops, train_activation_bytes=train_bytes, inference_activation_bytes=inference_bytes,
                        levels=[levels[lv] for lv in sorted(levels)], cells=cells)


def _voxels(size: tuple[int, ...]) -> int:
    total = 1
    for n in size:
        total *= n
    return total


_FLOP_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def network_flops(genotype: Genotype, config: BuildConfig, patch: tuple[int, int, int] = (128, 128, 128)) -> int:
    """FLOPs of one forward pass at ``patch`` (batch 1), as :func:`network_stats` counts them.

    Every counted convolution's cost is proportional to the voxels of its output, and every
    level's size to the patch's, so the count at a small patch (2 * 2**depth per axis: instance
    norm needs more than one voxel) times the voxel ratio is exact, and faster than at 128^3."""
    check_spatial_size(tuple(patch), config)
    small = (2 * config.divisor,) * 3
    with torch.device("meta"):
        model = build_network(genotype, config)
    _without_norms(model)   # not counted, and their shape-only kernels are the slow part
    return forward_flops(model, (1, config.in_channels, *small)) * _voxels(tuple(patch)) // _voxels(small)


def forward_flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass of ``model`` (on the meta device) for an input of ``shape``,
    counted as for scnas's own networks: how another framework's network (nnU-Net's planned
    U-Net) is measured against a genotype's."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.empty(*shape, device="meta"))
    return counter.get_total_flops()


def _without_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.instancenorm._InstanceNorm):
            setattr(module, name, nn.Identity())
        else:
            _without_norms(child)


def parse_flops_reference(text: str, config: BuildConfig, patch: tuple[int, int, int]) -> tuple[int, str]:
    """FLOPs of a reference: ``GENOTYPE@STEM`` (a genotype file or built-in name at that stem, with
    ``config``'s other settings, at ``patch``) or a number like ``425G`` (units K, M, G, T).
    Returns the FLOPs and a description."""
    from scnas.build.network import BuildError
    from scnas.genotype import load_genotype

    text = text.strip()
    if "@" in text:
        name, _, stem = text.rpartition("@")
        if not stem.isdigit() or int(stem) < 1:
            raise BuildError(f"--match-flops {text!r}: the stem after '@' must be a positive whole number")
        reference = load_genotype(name)
        flops = network_flops(reference, config.model_copy(update={"stem_channels": int(stem)}), patch)
        return flops, f"{name} at stem {stem}"
    number, unit = text.rstrip("KMGTkmgt"), text[len(text.rstrip("KMGTkmgt")):].upper()
    try:
        value = float(number) * _FLOP_UNITS[unit]
    except (ValueError, KeyError):
        raise BuildError(f"--match-flops {text!r}: give a genotype at a stem (e.g. uresnet@68) or FLOPs "
                         "(e.g. 425G)") from None
    if not math.isfinite(value) or value <= 0:
        raise BuildError(f"--match-flops {text!r}: FLOPs must be a positive finite number (e.g. 425G)")
    return int(value), f"{text} FLOPs"


def match_flops(genotype: Genotype, target: int, config: BuildConfig, *, patch: tuple[int, int, int] = (128, 128, 128),
                max_stem: int = 4096) -> tuple[int, int]:
    """The stem at which ``genotype``'s network has the FLOPs nearest to ``target`` (and those
    FLOPs), with ``config``'s other settings. Every convolution's channels are linear in the
    stem exactly at multiples of the node count (where no node width is rounded up), so there
    the FLOPs are a quadratic in the stem: one through three such stems gives the estimate.
    Between them rounding makes the FLOPs jump, not even monotonically (stem 47 may cost more
    than 48), so a whole period of stems on each side of the estimate is counted exactly.

    Args:
        genotype: the cells.
        target: the FLOPs to come near.
        config: the network's other settings (its stem is ignored).
        patch: the input's spatial size the FLOPs are counted at.
        max_stem: the largest stem considered.
    """
    import numpy as np

    def at(stem: int) -> int:
        return network_flops(genotype, config.model_copy(update={"stem_channels": stem}), patch)

    probes = [genotype.nodes * k for k in (2, 4, 8)]
    a, b, c = np.polyfit(probes, [at(s) for s in probes], 2)
    roots = [r.real for r in np.roots([a, b, c - target]) if abs(r.imag) < 1e-9 and r.real > 0]
    guess = int(round(max(roots))) if roots else 1
    guess = min(max(guess, 1), max_stem)
    period = genotype.nodes
    counted = {s: at(s) for s in range(max(1, guess - period), min(max_stem, guess + period) + 1)}
    while min(counted) > 1 and counted[min(counted)] > target:      # the estimate was too high: walk down
        counted[min(counted) - 1] = at(min(counted) - 1)
    while max(counted) < max_stem and counted[max(counted)] < target:   # ... or too low: walk up
        counted[max(counted) + 1] = at(max(counted) + 1)
    stem = min(counted, key=lambda s: (abs(counted[s] - target), s))
    return stem, counted[stem]
