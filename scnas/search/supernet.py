"""The search supernet: the builder's macro layout with every candidate operation on every
edge, and one alpha per (cell type, edge, op), shared by all cells of that type.

Cell edges are all pairs (i, j) with i < j and j an intermediate node (14 for 4 nodes), in
the order of :func:`cell_edges`; every intermediate node is concatenated into the output.
A mixed edge runs only the operations whose sampled weight is nonzero.
"""

from __future__ import annotations

import torch
from torch import nn

from scnas.build import BuildConfig
from scnas.build.network import Resample, macro_layout, macro_wiring, node_width
from scnas.build.ops import Conv3d, make_op
from scnas.genotype import CELL_TYPES, NUM_INPUTS
from scnas.genotype.ops import ZERO


def cell_edges(nodes: int) -> list[tuple[int, int]]:
    """Every candidate edge (source, target) of a cell with ``nodes`` intermediate nodes."""
    return [(source, target) for target in range(NUM_INPUTS, NUM_INPUTS + nodes) for source in range(target)]


class MixedEdge(nn.Module):
    """All candidate operations of one edge; computes sum_o w_o * o(x) over nonzero w_o only."""

    def __init__(self, ops: list[str], channels: int, stride: int, negative_slope: float):
        super().__init__()
        self.names = list(ops)
        self.ops = nn.ModuleList(make_op(name, channels, channels, stride, negative_slope) for name in ops)
        self.zero_index = self.names.index(ZERO) if ZERO in self.names else None

    def forward(self, x: torch.Tensor, weights: torch.Tensor, active: list[int]) -> torch.Tensor:
        total = None
        for index in active:
            if index == self.zero_index:
                continue  # contributes nothing; its weight still shapes the others'
            term = weights[index] * self.ops[index](x)
            total = term if total is None else total + term
        if total is None:  # only 'zero' was chosen: a zero tensor of the right shape
            total = self.ops[self.zero_index](x) * weights[self.zero_index]
        return total


class SearchCell(nn.Module):
    def __init__(self, cell_type: str, level: int, inputs, nodes: int, ops: list[str], config: BuildConfig):
        super().__init__()
        self.width = node_width(config, nodes, level)
        work_level = level - 1 if cell_type == "reduction" else level
        self.preprocess = nn.ModuleList(Resample(channels, self.width, input_level - work_level, config)
                                        for channels, input_level in inputs)
        self.edges = nn.ModuleList(
            MixedEdge(ops, self.width, 2 if cell_type == "reduction" and source < NUM_INPUTS else 1, config.negative_slope)
            for source, target in cell_edges(nodes))
        self.pairs = cell_edges(nodes)
        self.nodes = nodes
        self.out_channels = self.width * nodes

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor, active: list[list[int]]) -> torch.Tensor:
        states = [self.preprocess[0](s0), self.preprocess[1](s1)]
        index = 0
        for target in range(NUM_INPUTS, NUM_INPUTS + self.nodes):
            total = None
            for source in range(target):
                term = self.edges[index](states[source], weights[index], active[index])
                total = term if total is None else total + term
                index += 1
            states.append(total)
        return torch.cat(states[NUM_INPUTS:], dim=1)


class SuperNet(nn.Module):
    """The weight-sharing network of the search (parameters: Theta). Alpha lives in
    :class:`Architecture`, so that the two are optimised separately."""

    def __init__(self, config: BuildConfig, nodes: int, ops: list[str]):
        super().__init__()
        self.config, self.nodes, self.ops = config, nodes, list(ops)
        self.layout = macro_layout(config.depth)
        self.wiring = macro_wiring(self.layout)
        self.stem = nn.Sequential(Conv3d(config.in_channels, config.stem_channels, 3, padding=1, bias=False),
                                  nn.InstanceNorm3d(config.stem_channels, affine=True))
        shapes = [(config.stem_channels, 0)]
        self.cells = nn.ModuleList()
        for slot, wiring in zip(self.layout, self.wiring):
            inputs = (shapes[wiring.inputs[0]], shapes[wiring.inputs[1]])
            cell = SearchCell(slot.cell_type, slot.level, inputs, nodes, self.ops, config)
            self.cells.append(cell)
            shapes.append((cell.out_channels, slot.level))
        # Every cell has the same concat width at a level, so encoder skips and decoder inputs match.
        self.out = nn.Conv3d(shapes[-1][0], config.num_classes, 1)

    def forward(self, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        active = {name: [torch.nonzero(row, as_tuple=False).flatten().tolist() for row in w.detach().cpu()]
                  for name, w in weights.items()}
        outputs = [self.stem(x)]
        for slot, wiring, cell in zip(self.layout, self.wiring, self.cells):
            previous, current = outputs[wiring.inputs[0]], outputs[wiring.inputs[1]]
            if wiring.skip is not None:
                current = current + outputs[wiring.skip]
            outputs.append(cell(previous, current, weights[slot.cell_type], active[slot.cell_type]))
        return self.out(outputs[-1])


class Architecture(nn.Module):
    """alpha: one (edges, ops) tensor per cell type, initialised near zero (DARTS: 1e-3 x N(0, 1))."""

    def __init__(self, nodes: int, ops: list[str], generator: torch.Generator | None = None):
        super().__init__()
        shape = (len(cell_edges(nodes)), len(ops))
        self.alphas = nn.ParameterDict({name: nn.Parameter(1e-3 * torch.randn(shape, generator=generator))
                                        for name in CELL_TYPES})
        self.nodes, self.ops = nodes, list(ops)

    def probabilities(self) -> dict[str, torch.Tensor]:
        return {name: torch.softmax(alpha.detach(), dim=-1) for name, alpha in self.alphas.items()}

    def entropy(self) -> dict[str, float]:
        """Mean entropy (nats) of softmax(alpha) over the edges, per cell type."""
        return {name: float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()) for name, p in self.probabilities().items()}
