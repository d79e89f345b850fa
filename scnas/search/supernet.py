"""The search supernet: the builder's U-Net with a mixed edge on every candidate edge of every
cell, and one alpha per (cell type, edge, op), shared by all cells of that type.

Cells, widths, input resampling, skips and projections are the builder's
(:class:`scnas.build.network.MacroUNet`); only the edges differ. Cell edges are all pairs
(i, j) with i < j and j an intermediate node (14 for 4 nodes), in the order of
:func:`cell_edges`; every intermediate node is concatenated into the output. A mixed edge
runs only the operations that the step's sampling chose (:class:`EdgeChoice`), which the
sampler decides on the host: the forward pass never reads a device tensor back.

As in DARTS's search network (BatchNorm with affine=False after its pooling operations), a
mixed edge normalises the output of its parameter-free pooling operations (InstanceNorm
without affine parameters, the builder's norm): the convolutions end in a norm, so their
outputs have zero mean and unit variance, while max pooling's have a mean of about 1.2 and
average pooling's a standard deviation of about 0.55. Unnormalised, the weights of the
edge would compare outputs of different scales rather than operations. Only the search
network does this; networks built from a genotype run the plain operations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from scnas.build import BuildConfig
from scnas.build.network import CellGraph, EdgeFactory, MacroUNet
from scnas.build.ops import make_op
from scnas.genotype import CELL_TYPES
from scnas.genotype.ops import ZERO

NORMALISED_IN_SEARCH = ("max_pool_3x3x3", "avg_pool_3x3x3")
"""Parameter-free operations that a mixed edge follows by an affine-free InstanceNorm
(DARTS: BatchNorm(affine=False) after pooling). Identity stays plain, as in DARTS."""


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
    """All candidate operations of one edge. With ``normalise_pooling``, the parameter-free
    operations of :data:`NORMALISED_IN_SEARCH` are followed by an affine-free InstanceNorm
    (no parameters, no buffers: the state dict is the same either way).

    Args:
        ops: the candidate operations.
        channels: input and output channels.
        stride: 2 on edges that reduce, else 1.
        negative_slope: the LeakyReLU's slope.
        normalise_pooling: follow the parameter-free ops by an affine-free InstanceNorm.
    """

    def __init__(self, ops: list[str], channels: int, stride: int, *, negative_slope: float,
                 normalise_pooling: bool = True):
        super().__init__()
        self.names = list(ops)
        self.stride = stride
        self.aux_skip = 0.0   # DARTS-'s auxiliary skip weight beta (set by SuperNet.set_aux_skip)
        self.ops = nn.ModuleList(make_op(name, channels, channels, stride=stride,
                                         negative_slope=negative_slope) for name in ops)
        self.zero_index = self.names.index(ZERO) if ZERO in self.names else None
        self.norms = nn.ModuleDict({
            str(index): nn.InstanceNorm3d(channels, affine=False, track_running_stats=False)
            for index, (name, op) in enumerate(zip(self.names, self.ops))
            if normalise_pooling and name in NORMALISED_IN_SEARCH and not any(True for _ in op.parameters())})

    shares_activation = True
    """Takes ``activated=`` (see :meth:`forward`)."""

    def forward(self, x: torch.Tensor, choice: EdgeChoice,
                activated: Callable[[float], torch.Tensor] | None = None) -> torch.Tensor:
        """The edge's output for ``choice``. ``activated``: where given, the operations that
        begin with a LeakyReLU take LeakyReLU(x) from it (computed once per cell state, see
        ``scnas.build.network.CellModule.forward``)."""
        total = None
        for index in choice.active:
            if index == self.zero_index:
                continue  # contributes nothing; its weight still shapes the others'
            op = self.ops[index]
            out = op(x, activated=activated) if activated is not None and getattr(op, "shares_activation", False) \
                else op(x)
            if str(index) in self.norms:
                out = self.norms[str(index)](out)
            term = choice.weights[index] * out
            total = term if total is None else total + term
        if total is None:  # only 'zero' was chosen: a zero tensor of the right shape
            total = self.ops[self.zero_index](x) * choice.weights[self.zero_index]
        if self.aux_skip and self.stride == 1:
            total = total + self.aux_skip * x
        return total


class SuperNet(MacroUNet):
    """The weight-sharing network of the search (parameters: Theta). Alpha lives in
    :class:`Architecture`, so that the two are optimised separately. ``forward(x, choices)``
    takes the step's sampled operations: for each cell type, one :class:`EdgeChoice` per edge
    (see :func:`scnas.search.sampling.sample_choices`). ``normalise_pooling``: see
    :class:`MixedEdge` (on by default, as in DARTS; off is the plain operations).

    Args:
        config: the network's settings.
        nodes: intermediate nodes per cell.
        ops: the vocabulary.
        normalise_pooling: see :class:`MixedEdge`.
    """

    def __init__(self, config: BuildConfig, nodes: int, ops: list[str], *, normalise_pooling: bool = True):
        graph = CellGraph.complete(nodes)
        slope = config.negative_slope

        def edge_factory(cell_type: str) -> EdgeFactory:
            return lambda source, target, width, stride: MixedEdge(ops, width, stride, negative_slope=slope,
                                                                   normalise_pooling=normalise_pooling)

        super().__init__(config, nodes, {name: graph for name in CELL_TYPES}, edge_factory=edge_factory)
        self.ops = list(ops)

    def forward(self, x: torch.Tensor, choices: dict[str, list[EdgeChoice]]) -> torch.Tensor:
        return self.run_cells(x, choices)

    def set_aux_skip(self, beta: float) -> None:
        """DARTS- (Chu et al. 2021): add ``beta`` times the edge's input to every mixed edge of
        stride 1, outside alpha, so that identity's head start in a residual network stops
        being a reason for alpha to choose it; the search decays beta to 0 (``--aux-skip``).
        Edges that reduce keep none (their input has another shape)."""
        for module in self.modules():
            if isinstance(module, MixedEdge):
                module.aux_skip = float(beta)


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
