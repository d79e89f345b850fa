"""Operation sampling: the paper's Algorithm 1 (``pair``), and ``one`` and ``full`` for comparison.

Each function maps alpha (edges, ops) to dense weights of the same shape: the weight of each
operation on each edge in this step; operations with weight 0 are not run.
"""

from __future__ import annotations

import torch


def gumbel_softmax(alpha: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """z_bar = softmax((alpha + eps) / tau), eps ~ Gumbel(0, 1), per edge (row)."""
    uniform = torch.rand(alpha.shape, generator=generator, device="cpu").to(alpha.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
    return torch.softmax((alpha + gumbel) / tau, dim=-1)


def draw_pair(alpha: torch.Tensor, tau: float, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random part of Algorithm 1: z_bar and the pair (first, second) per edge.

    The pair is drawn as o1 ~ z_bar, then o2 uniformly among the other |O| - 1 operations:
    P({a, b}) = z_a / (|O| - 1) + z_b / (|O| - 1), exactly the distribution of Algorithm 1."""
    edges, ops = alpha.shape
    if ops < 2:
        raise ValueError("pair sampling needs at least two operations")
    z_bar = gumbel_softmax(alpha, tau, generator)
    first = torch.multinomial(z_bar.detach().float().cpu(), 1, generator=generator).squeeze(1)
    other = torch.randint(0, ops - 1, (edges,), generator=generator)
    return z_bar, first, other + (other >= first).long()


def sample_pair(alpha: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Algorithm 1 of the paper. Per edge: z_bar = softmax((alpha + eps) / tau); a pair {o1, o2}
    drawn with probability (z_bar_o1 + z_bar_o2) / (|O| - 1); weights z_bar_o / (z_bar_o1 +
    z_bar_o2) on the pair, 0 elsewhere. Differentiable with respect to alpha. At low tau the
    weight of one of the two tends to 0, so the edge runs one operation (as the paper notes)."""
    z_bar, first, second = draw_pair(alpha, tau, generator)
    edges, ops = alpha.shape
    mask = torch.zeros(edges, ops, dtype=torch.bool)
    mask[torch.arange(edges), first] = True
    mask[torch.arange(edges), second] = True
    chosen = z_bar * mask.to(alpha.device)
    return chosen / chosen.sum(dim=-1, keepdim=True)


def sample_one(alpha: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """GDAS-like: the argmax of z_bar per edge with weight 1 in the forward pass and the
    gradient of z_bar in the backward pass (straight-through)."""
    z_bar = gumbel_softmax(alpha, tau, generator)
    hard = torch.zeros_like(z_bar).scatter_(-1, z_bar.argmax(dim=-1, keepdim=True), 1.0)
    return hard - z_bar.detach() + z_bar


def sample_full(alpha: torch.Tensor, tau: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARTS: every operation, weighted by softmax(alpha) (no noise, no temperature)."""
    return torch.softmax(alpha, dim=-1)


SAMPLERS = {"pair": sample_pair, "one": sample_one, "full": sample_full}
