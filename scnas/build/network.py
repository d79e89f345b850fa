"""The U-Net assembly: the macro layout of cells, the cell module, and ``build_network``.

Macro layout for depth 3 (12 cells, as in the paper):

    stem -> red -> enc -> red -> enc -> red -> inter(enc) -> exp -> dec -> exp -> dec -> exp -> dec -> out
    level  0      1      1      2      2      3      3             2      2      1      1      0      0

Every cell takes the outputs of the previous two cells (the first reduction cell takes the
stem output twice); cells whose output cannot reach the network output are not built. Before a decoder-normal cell at level l uses its previous cell's output,
that output is summed with the encoder output of level l (the stem output at level 0), per
the paper's footnote 4. Level-l cells are ``stem_channels * 2**l`` wide, split over the
``nodes`` intermediate nodes; the cell output concatenates its ``concat`` nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from scnas.build.config import BuildConfig, BuildError
from scnas.build.ops import ActConvNorm, Conv3d, make_op
from scnas.defaults import CHECKPOINT_MODES
from scnas.genotype import CELL_TYPES, NUM_INPUTS, Cell, Genotype


@dataclass(frozen=True)
class CellSlot:
    """One cell of the macro layout."""

    name: str        # e.g. "reduction_1", "inter", "decoder_normal_0"
    cell_type: str   # genotype cell type
    level: int       # resolution level of the cell's output (0 = input resolution)


def macro_layout(depth: int) -> list[CellSlot]:
    """The cells of a network with ``depth`` down-samplings, in execution order."""
    slots = []
    for level in range(1, depth + 1):
        slots.append(CellSlot(f"reduction_{level}", "reduction", level))
        name = "inter" if level == depth else f"encoder_normal_{level}"
        slots.append(CellSlot(name, "encoder_normal", level))
    for level in range(depth - 1, -1, -1):
        slots.append(CellSlot(f"expansion_{level}", "expansion", level))
        slots.append(CellSlot(f"decoder_normal_{level}", "decoder_normal", level))
    return slots


def node_width(config: BuildConfig, nodes: int, level: int) -> int:
    """Channels of each intermediate node of a level-``level`` cell."""
    return math.ceil(config.stem_channels * 2 ** level / nodes)


class Resample(nn.Module):
    """Brings a cell input to the cell's working level and node width:
    LeakyReLU-Conv1x1x1-InstanceNorm, strided when going down, upsampled when going up.

    Args:
        c_in: the input's channels.
        c_out: the node width of the cell.
        levels_up: levels to go up (> 0: upsampled), down (< 0: strided) or 0.
        config: the network's settings (upsampling, LeakyReLU slope).
    """

    def __init__(self, c_in: int, c_out: int, levels_up: int, *, config: BuildConfig):
        super().__init__()
        slope = config.negative_slope
        self.scale = 2 ** levels_up if levels_up > 0 else 1
        if levels_up > 0 and config.upsampling == "transposed":
            self.act = nn.LeakyReLU(slope)
            self.conv = nn.ConvTranspose3d(c_in, c_out, self.scale, stride=self.scale, bias=False)
            self.scale = 1  # the transposed conv does the upsampling
        else:
            self.act = nn.LeakyReLU(slope)
            self.conv = Conv3d(c_in, c_out, 1, stride=2 ** -levels_up if levels_up < 0 else 1, bias=False)
        self.norm = nn.InstanceNorm3d(c_out, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_activated(self.act(x))

    def forward_activated(self, activated: torch.Tensor) -> torch.Tensor:
        """The output for an input whose LeakyReLU (``self.act``) is ``activated``."""
        x = self.conv(activated)
        if self.scale > 1:
            # Upsampling after the 1x1x1 conv equals upsampling before it (both are linear and
            # act on different axes), but convolves 8x fewer voxels and upsamples fewer channels.
            x = _upsample(x, self.scale)
        return self.norm(x)


def _upsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Trilinear upsampling in ``x``'s own precision. CUDA autocast would run it in float32, and
    everything after it up to the next convolution with it: about a fifth more memory and time
    at 128^3 in fp16, for an interpolation that half precision represents well."""
    if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type) \
            and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
        with torch.autocast(x.device.type, enabled=False):
            return F.interpolate(x, scale_factor=scale, mode="trilinear", align_corners=False)
    return F.interpolate(x, scale_factor=scale, mode="trilinear", align_corners=False)


SHARE_PREACTIVATION = True
"""Compute LeakyReLU(state) once per cell state for all the edges that begin with it (see
:meth:`CellModule.forward`). Same outputs, gradients equal to float rounding; a switch so
that tests and benchmarks can compare with every edge computing its own."""


EdgeFactory = Callable[[int, int, int, int], nn.Module]
"""Builds the module of one edge: ``(source, target, node_width, stride) -> module``. The
final network's factory makes the genotype's operation; the search supernet's makes a mixed
edge over every candidate operation. Cells, widths and strides are the builder's either way."""


@dataclass(frozen=True)
class CellGraph:
    """The wiring a cell module is built from: edges (source, target) in execution order
    (targets ascending, then sources ascending) and the nodes concatenated into the output."""

    edges: tuple[tuple[int, int], ...]
    concat: tuple[int, ...]

    @classmethod
    def of(cls, cell: Cell, nodes: int) -> "CellGraph":
        """A genotype cell without its dead nodes (valid, but unable to reach the output)."""
        live = cell.live_nodes()
        edges = tuple((edge.source, node) for node in range(NUM_INPUTS, NUM_INPUTS + nodes) if node in live
                      for edge in cell.incoming(node))
        return cls(edges, tuple(sorted(cell.concat)))

    @classmethod
    def complete(cls, nodes: int) -> "CellGraph":
        """Every candidate edge i -> j (i < j, j an intermediate node), every node concatenated:
        the cell of a search supernet."""
        edges = tuple((source, target) for target in range(NUM_INPUTS, NUM_INPUTS + nodes) for source in range(target))
        return cls(edges, tuple(range(NUM_INPUTS, NUM_INPUTS + nodes)))

    @property
    def used_inputs(self) -> set[int]:
        """The cell inputs (0 = c_{k-2}, 1 = c_{k-1}) that some edge reads."""
        return {source for source, _ in self.edges if source < NUM_INPUTS}


class CellModule(nn.Module):
    """One cell: its used inputs resampled to the node width, nodes summing their incoming
    edges, output the concatenation of the ``concat`` nodes (ascending). Widths, strides and
    input resampling are decided here for every kind of edge (see :data:`EdgeFactory`).

    ``checkpoint_edges`` recomputes each edge's internals during backward instead of keeping
    them (activation checkpointing inside the cell); results and gradients are unchanged.

    Args:
        graph: the cell type's wiring (dead nodes left out).
        cell_type: ``encoder_normal``, ``reduction``, ``decoder_normal`` or ``expansion``.
        level: the cell's resolution level (0: full resolution).
        inputs: (level, channels) of the cell's two inputs.
        nodes: intermediate nodes per cell (for the node width).
        config: the network's settings.
        make_edge: builds the module of one edge (see :data:`EdgeFactory`).
    """

    def __init__(self, graph: CellGraph, cell_type: str, level: int, *, inputs: tuple[tuple[int, int], tuple[int, int]],
                 nodes: int, config: BuildConfig, make_edge: EdgeFactory):
        super().__init__()
        self.graph = graph
        self.width = node_width(config, nodes, level)
        # Reduction cells work at the finer level and reduce on the edges leaving their inputs.
        work_level = level - 1 if cell_type == "reduction" else level
        self.preprocess = nn.ModuleDict()
        for index, (channels, input_level) in enumerate(inputs):
            if index in graph.used_inputs:
                self.preprocess[str(index)] = Resample(channels, self.width, input_level - work_level, config=config)
        self.edges = nn.ModuleDict()
        for source, target in graph.edges:
            stride = 2 if cell_type == "reduction" and source < NUM_INPUTS else 1
            self.edges[f"{source}_{target}"] = make_edge(source, target, self.width, stride)
        self._last_reader = {source: position for position, (source, _) in enumerate(graph.edges)}
        self.concat = list(graph.concat)
        self.out_channels = self.width * len(self.concat)
        self.checkpoint_edges = False

    def forward(self, s0: torch.Tensor | None, s1: torch.Tensor | None, choices: Sequence[Any] | None = None
                ) -> torch.Tensor:
        """``choices``: one argument per edge (in ``graph.edges`` order) passed to edge modules
        that take one (the supernet's sampled operations); None for fixed operations.

        With :data:`SHARE_PREACTIVATION`, LeakyReLU(state) is computed once per state (and slope)
        and handed to every edge that begins with it (edge modules whose ``shares_activation``
        is true take it as ``activated=``, e.g. :class:`scnas.build.ops.ActivationFirst`); the two input resamplings share
        theirs when both read the same tensor (the first reduction cell reads the stem twice).
        Not while edges are checkpointed with gradients: the shared activation would be kept
        for backward, which is what edge checkpointing saves."""
        share = SHARE_PREACTIVATION and not (self.checkpoint_edges and torch.is_grad_enabled())
        states: dict[int, torch.Tensor] = {}
        if share and s0 is s1 and len(self.preprocess) == 2 \
                and self.preprocess["0"].act.negative_slope == self.preprocess["1"].act.negative_slope:
            activated_input = self.preprocess["0"].act(s0)
            for index in (0, 1):
                states[index] = self.preprocess[str(index)].forward_activated(activated_input)
        else:
            for index, x in ((0, s0), (1, s1)):
                if str(index) in self.preprocess:
                    states[index] = self.preprocess[str(index)](x)
        activated: dict[tuple[int, float], torch.Tensor] = {}

        def activation_of(source: int) -> Callable[[float], torch.Tensor]:
            def get(slope: float) -> torch.Tensor:
                if (source, slope) not in activated:
                    activated[source, slope] = F.leaky_relu(states[source], slope)
                return activated[source, slope]
            return get

        recompute = self.checkpoint_edges and torch.is_grad_enabled()
        for position, (source, target) in enumerate(self.graph.edges):
            edge = self.edges[f"{source}_{target}"]
            args = (states[source],) if choices is None else (states[source], choices[position])
            if share and getattr(edge, "shares_activation", False):
                term = edge(*args, activated=activation_of(source))
            elif recompute:
                term = checkpoint(edge, *args, use_reentrant=False, preserve_rng_state=False)
            else:
                term = edge(*args)
            states[target] = states[target] + term if target in states else term
            if position == self._last_reader[source]:  # free it as soon as no edge needs it
                for slope in [key[1] for key in activated if key[0] == source]:
                    del activated[source, slope]
        if len(self.concat) == 1:
            return states[self.concat[0]]
        return torch.cat([states[n] for n in self.concat], dim=1)


@dataclass(frozen=True)
class Wiring:
    """Where a cell's inputs come from, as indices into the list of outputs (0 = stem,
    k + 1 = cell k): c_{k-2}, c_{k-1} and, for decoder-normal cells, the encoder skip."""

    inputs: tuple[int, int]
    skip: int | None


def macro_wiring(layout: list[CellSlot]) -> list[Wiring]:
    """The inputs of every cell of ``layout``."""
    encoder_output = {0: 0}
    wiring = []
    for k, slot in enumerate(layout):
        skip = encoder_output[slot.level] if slot.cell_type == "decoder_normal" else None
        wiring.append(Wiring((max(k - 1, 0), k), skip))
        if slot.cell_type == "encoder_normal":
            encoder_output[slot.level] = k + 1
    return wiring


def live_cells(graphs: Mapping[str, CellGraph], layout: list[CellSlot], wiring: list[Wiring]) -> set[int]:
    """Indices of the cells whose output reaches the network output. A genotype whose cells
    ignore an input can leave whole cells unused (e.g. a decoder cell that only reads
    c_{k-2} never sees the expansion cell before it); those are not built."""
    needed = {len(layout)}
    for k in range(len(layout) - 1, -1, -1):
        if k + 1 not in needed:
            continue
        uses = graphs[layout[k].cell_type].used_inputs
        for index in (0, 1):
            if index in uses:
                needed.add(wiring[k].inputs[index])
        if 1 in uses and wiring[k].skip is not None:
            needed.add(wiring[k].skip)
    return {k for k in range(len(layout)) if k + 1 in needed}


def genotype_graphs(genotype: Genotype) -> dict[str, CellGraph]:
    """The wiring of each cell type of ``genotype`` (dead nodes left out)."""
    return {name: CellGraph.of(genotype.cell(name), genotype.nodes) for name in CELL_TYPES}


class MacroUNet(nn.Module):
    """The macro layout (stem, cells, encoder skips, output head) for cells of any kind: the one
    place that knows widths, skips and projections. ``graphs`` gives each cell type's wiring and
    ``edge_factory(cell_type)`` its edges. Slots whose output cannot reach the network output
    are absent from ``cells``.

    Args:
        config: the network's settings (stem, channels, classes, depth).
        nodes: intermediate nodes per cell.
        graphs: each cell type's wiring.
        edge_factory: for a cell type, the factory of its edges' modules.
    """

    def __init__(self, config: BuildConfig, nodes: int, graphs: Mapping[str, CellGraph],
                 *, edge_factory: Callable[[str], EdgeFactory]):
        super().__init__()
        self.config, self.nodes = config, nodes
        self.layout = macro_layout(config.depth)
        self.wiring = macro_wiring(self.layout)
        live = live_cells(graphs, self.layout, self.wiring)
        slope = config.negative_slope
        self.stem = nn.Sequential(Conv3d(config.in_channels, config.stem_channels, 3, padding=1, bias=False),
                                  nn.InstanceNorm3d(config.stem_channels, affine=True))
        shapes = [(config.stem_channels, 0)]                  # (channels, level) of every output
        self.cells = nn.ModuleDict()
        self.skips = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        supervised = []
        for k, (slot, wiring) in enumerate(zip(self.layout, self.wiring)):
            graph = graphs[slot.cell_type]
            shapes.append((node_width(config, nodes, slot.level) * len(graph.concat), slot.level))
            if k not in live:
                continue
            inputs = (shapes[wiring.inputs[0]], shapes[wiring.inputs[1]])
            cell = CellModule(graph, slot.cell_type, slot.level, inputs=inputs, nodes=nodes, config=config,
                              make_edge=edge_factory(slot.cell_type))
            self.cells[slot.name] = cell
            if wiring.skip is not None and "1" in cell.preprocess:
                skip_channels, current_channels = shapes[wiring.skip][0], inputs[1][0]
                if skip_channels != current_channels:
                    self.skips[slot.name] = ActConvNorm(skip_channels, current_channels, 1, stride=1,
                                                        negative_slope=slope)
            if config.deep_supervision and slot.cell_type == "decoder_normal" and slot.level > 0:
                supervised.append((slot.name, cell.out_channels))
        self.out_channels = [channels for channels, _ in shapes[1:]]
        self.out = nn.Conv3d(shapes[-1][0], config.num_classes, 1)
        # heads last, so that with or without them the rest of the network draws the same initial
        # weights from the same seed (a deep-supervision run and a plain one start alike)
        for name, channels in supervised:
            self.heads[name] = nn.Conv3d(channels, config.num_classes, 1)
        self.checkpointing = "off"

    def set_checkpointing(self, mode: str) -> None:
        """Choose activation checkpointing (:data:`CHECKPOINT_MODES`); applies to training only
        (with gradients enabled), so inference and export are unaffected."""
        if mode not in CHECKPOINT_MODES:
            raise BuildError(f"checkpointing {mode!r}: expected one of {', '.join(CHECKPOINT_MODES)}")
        self.checkpointing = mode
        for cell in self.cells.values():
            cell.checkpoint_edges = mode == "edges"

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``BuildError`` for an input this network cannot take."""
        if x.dim() != 5:
            raise BuildError(f"input must be (batch, channels, D, H, W); got {x.dim()} dimensions {tuple(x.shape)}")
        if x.shape[1] != self.config.in_channels:
            raise BuildError(f"input has {x.shape[1]} channels; this network was built for "
                             f"{self.config.in_channels} (in_channels)")
        check_spatial_size(tuple(x.shape[2:]), self.config)

    def _cell_step(self, name: str, previous: torch.Tensor | None, current: torch.Tensor | None,
                   skip: torch.Tensor | None, choices: Sequence[Any] | None) -> torch.Tensor:
        if skip is not None:
            current = current + (self.skips[name](skip) if name in self.skips else skip)
        return self.cells[name](previous, current, choices)

    def run_cells(self, x: torch.Tensor, choices: Mapping[str, Sequence[Any]] | None = None,
                  supervise: bool | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Logits for ``x``; ``choices`` maps a cell type to its edges' arguments (supernets).
        ``supervise``: whether the deep-supervision heads' outputs are returned too (None: in
        training mode only; nnU-Net switches them itself, in eval mode as well)."""
        supervise = self.training if supervise is None else supervise
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self.check_input(x)
        recompute = self.checkpointing != "off" and torch.is_grad_enabled()
        outputs: list[torch.Tensor | None] = [self.stem(x)]
        auxiliary = []
        for slot, wiring in zip(self.layout, self.wiring):
            if slot.name not in self.cells:
                outputs.append(None)
                continue
            previous, current = outputs[wiring.inputs[0]], outputs[wiring.inputs[1]]
            skip = outputs[wiring.skip] if wiring.skip is not None and "1" in self.cells[slot.name].preprocess else None
            cell_choices = None if choices is None else choices[slot.cell_type]
            if recompute:
                # The skip sum happens inside, so only tensors that exist anyway are kept.
                output = checkpoint(self._cell_step, slot.name, previous, current, skip, cell_choices,
                                    use_reentrant=False, preserve_rng_state=False)
            else:
                output = self._cell_step(slot.name, previous, current, skip, cell_choices)
            outputs.append(output)
            if slot.name in self.heads and supervise:
                auxiliary.append(self.heads[slot.name](output))
        logits = self.out(outputs[-1])
        if supervise and self.config.deep_supervision:   # a list even when no head is built (depth 1)
            return [logits, *reversed(auxiliary)]
        return logits


class SCNASUNet(MacroUNet):
    """A 3D U-Net whose cells follow a genotype. Input (B, in_channels, D, H, W) with D, H, W
    multiples of 2**depth; output logits (B, num_classes, D, H, W).

    ``cells`` maps slot names (``reduction_1``, ``inter``, ...) to cell modules; slots whose
    output cannot reach the network output are absent."""

    def __init__(self, genotype: Genotype, config: BuildConfig):
        graphs = genotype_graphs(genotype)

        def edge_factory(cell_type: str) -> EdgeFactory:
            ops = {(edge.source, edge.target): edge.op for edge in genotype.cell(cell_type).edges}
            return lambda source, target, width, stride: make_op(ops[source, target], width, width, stride=stride,
                                                                 negative_slope=config.negative_slope)

        super().__init__(config, genotype.nodes, graphs, edge_factory=edge_factory)
        self.genotype = genotype

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.run_cells(x)


def check_spatial_size(size: tuple[int, ...], config: BuildConfig) -> None:
    """Raise ``BuildError`` unless every spatial size is a positive multiple of 2**depth and the
    deepest level has more than one voxel."""
    if len(size) != 3:
        raise BuildError(f"a patch has three spatial sizes (D, H, W); got {len(size)}: {size}")
    divisor = config.divisor
    for axis, n in zip("DHW", size):
        if n <= 0:
            raise BuildError(f"spatial size {tuple(size)}: {axis}={n} is not positive; sizes are positive multiples "
                             f"of 2**depth = {divisor} (depth {config.depth}), e.g. {divisor}")
        if n % divisor:
            fit = max(divisor, round(n / divisor) * divisor)
            raise BuildError(f"spatial size {tuple(size)}: {axis}={n} is not a multiple of 2**depth = {divisor} "
                             f"(depth {config.depth}); pad or crop to a multiple, e.g. {fit}")
    if all(n == divisor for n in size):   # instance normalisation of one voxel is undefined
        raise BuildError(f"spatial size {tuple(size)}: the deepest level would be a single voxel (1x1x1 after "
                         f"{config.depth} halvings), where instance normalisation is undefined; use at least "
                         f"{2 * divisor} on one axis")


def build_network(genotype: Genotype, config: BuildConfig | None = None) -> SCNASUNet:
    """The one door from a genotype to a network: a plain ``torch.nn.Module``."""
    return SCNASUNet(genotype, config or BuildConfig())
