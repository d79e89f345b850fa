"""The search supernet: the builder's U-Net with a mixed edge on every candidate edge of every
cell, and one alpha per (cell type, edge, op), shared by all cells of that type.

Cells, widths, input resampling, skips and projections are the builder's
(:class:`scnas.build.network.MacroUNet`); only the edges differ. Cell edges are all pairs
(i, j) with i < j and j an intermediate node (14 for 4 nodes), in the order of
:func:`cell_edges`; every intermediate node is concatenated into the output. A mixed edge
runs only the operations that the step's sampling chose (:class:`EdgeChoice`), which the
sampler decides on the host: the forward pass never reads a device tensor back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scnas.build import BuildConfig
from scnas.build.network import CellGraph, EdgeFactory, MacroUNet
from scnas.build.ops import make_op
from scnas.genotype import CELL_TYPES
from scnas.genotype.ops import ZERO


def cell_edges(nodes: int) -> list[tuple[int, int]]:
    """Every candidate edge (source, target) of a cell with ``nodes`` intermediate nodes."""
    return list(CellGraph.complete(nodes).edges)


@dataclass(frozen=True)
class EdgeChoice:
    """What one mixed edge computes in one step: ``sum(weights[o] * op_o(x) for o in active)``.
    ``weights`` is the edge's row of the sampled weights (on the device, differentiable with
    respect to alpha); ``active`` the indices of the operations to run, known on the host."""

    weights: torch.Tensor
    active: tuple[int, ...]


class MixedEdge(nn.Module):
    """All candidate operations of one edge."""

    def __init__(self, ops: list[str], channels: int, stride: int, negative_slope: float):
        super().__init__()
        self.names = list(ops)
        self.ops = nn.ModuleList(make_op(name, channels, channels, stride, negative_slope) for name in ops)
        self.zero_index = self.names.index(ZERO) if ZERO in self.names else None

    def forward(self, x: torch.Tensor, choice: EdgeChoice) -> torch.Tensor:
        total = None
        for index in choice.active:
            if index == self.zero_index:
                continue  # contributes nothing; its weight still shapes the others'
            term = choice.weights[index] * self.ops[index](x)
            total = term if total is None else total + term
        if total is None:  # only 'zero' was chosen: a zero tensor of the right shape
            total = self.ops[self.zero_index](x) * choice.weights[self.zero_index]
        return total


class SuperNet(MacroUNet):
    """The weight-sharing network of the search (parameters: Theta). Alpha lives in
    :class:`Architecture`, so that the two are optimised separately. ``forward(x, choices)``
    takes the step's sampled operations: for each cell type, one :class:`EdgeChoice` per edge
    (see :func:`scnas.search.sampling.sample_choices`)."""

    def __init__(self, config: BuildConfig, nodes: int, ops: list[str]):
        graph = CellGraph.complete(nodes)
        slope = config.negative_slope

        def edge_factory(cell_type: str) -> EdgeFactory:
            return lambda source, target, width, stride: MixedEdge(ops, width, stride, slope)

        super().__init__(config, nodes, {name: graph for name in CELL_TYPES}, edge_factory)
        self.ops = list(ops)

    def forward(self, x: torch.Tensor, choices: dict[str, list[EdgeChoice]]) -> torch.Tensor:
        return self.run_cells(x, choices)


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
