"""Operation sampling: the paper's Algorithm 1 (``pair``), and ``one`` and ``full`` for comparison.

Sampling is split in two so that a step never waits on the GPU more than once:

- :func:`draw` decides on the host which operations run on each edge (all random numbers
  come from a CPU generator, so every process of a run draws the same);
- :func:`edge_weights` computes the weights of those operations from alpha where alpha lives
  (on the GPU), differentiably, from the same noise.

:func:`sample_choices` does both for every cell type from one copy of alpha to the host.
``sample_pair``, ``sample_one`` and ``sample_full`` give the dense (edges, ops) weights of one
alpha, zero for the operations that do not run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scnas.defaults import SAMPLING_CHOICES
from scnas.errors import spoken
from scnas.search.supernet import EdgeChoice


@dataclass(frozen=True)
class Draw:
    """The host-side outcome of sampling one alpha: the Gumbel noise (None for ``full``) and
    which operations run on each edge."""

    mode: str
    noise: torch.Tensor | None   # (edges, ops) float32, host
    active: torch.Tensor         # (edges, ops) bool, host


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """Gumbel(0, 1) noise on the host."""
    uniform = torch.rand(shape, generator=generator)
    return -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))


def gumbel_softmax(alpha: torch.Tensor, tau: float, noise: torch.Tensor) -> torch.Tensor:
    """z_bar = softmax((alpha + eps) / tau) per edge (row), for given noise eps."""
    return torch.softmax((alpha + noise.to(alpha.device, non_blocking=True)) / tau, dim=-1)


def draw(alpha_host: torch.Tensor, mode: str, tau: float, *, generator: torch.Generator | None = None) -> Draw:
    """Decide, on the host, the operations of every edge for one alpha (edges, ops).

    ``pair`` (Algorithm 1): o1 ~ z_bar, then o2 uniformly among the other |O| - 1 operations:
    P({a, b}) = z_a / (|O| - 1) + z_b / (|O| - 1), exactly the distribution of Algorithm 1.
    ``one``: the argmax of z_bar. ``full``: every operation.

    Args:
        alpha_host: alpha of one cell type (edges, ops), on the host.
        mode: ``pair``, ``one`` or ``full``.
        tau: the Gumbel-softmax temperature.
        generator: the random generator (the same on every rank).
    """
    edges, ops = alpha_host.shape
    if mode == "full":
        return Draw(mode, None, torch.ones(edges, ops, dtype=torch.bool))
    noise = gumbel_noise((edges, ops), generator)
    z_bar = gumbel_softmax(alpha_host.float(), tau, noise)
    active = torch.zeros(edges, ops, dtype=torch.bool)
    rows = torch.arange(edges)
    if mode == "one":
        active[rows, z_bar.argmax(dim=-1)] = True
    elif mode == "pair":
        if ops < 2:
            raise ValueError("pair sampling needs at least two operations")
        first = torch.multinomial(z_bar, 1, generator=generator).squeeze(1)
        other = torch.randint(0, ops - 1, (edges,), generator=generator)
        active[rows, first] = True
        active[rows, other + (other >= first).long()] = True
    else:
        raise ValueError(f"unknown sampling {mode!r}; expected {spoken(SAMPLING_CHOICES)}")
    return Draw(mode, noise, active)


def edge_weights(alpha: torch.Tensor, drawn: Draw, tau: float) -> torch.Tensor:
    """The dense (edges, ops) weights of a draw, computed from ``alpha`` on its device and
    differentiable with respect to it; zero where an operation does not run.

    ``pair``: z_bar_o / (z_bar_o1 + z_bar_o2) on the pair (at low tau one of the two tends to
    0, so the edge runs one operation, as the paper notes). ``one``: 1 on the argmax in the
    forward pass with z_bar's gradient (straight-through, GDAS-like). ``full``: softmax(alpha)
    (DARTS: no noise, no temperature)."""
    if drawn.mode == "full":
        return torch.softmax(alpha, dim=-1)
    mask = drawn.active.to(alpha.device, non_blocking=True)
    if drawn.mode == "one":
        z_bar = gumbel_softmax(alpha, tau, drawn.noise)
        return mask.to(z_bar.dtype) - z_bar.detach() + z_bar
    # z_bar_o / (z_bar_o1 + z_bar_o2) is the softmax over the pair alone. Computed so, the
    # operations outside the pair get an exactly zero gradient; renormalising z_bar instead
    # leaves them rounding noise of ~1e-9, which Adam, dividing by its running magnitude,
    # turns into steps of the full learning rate in random directions.
    logits = (alpha + drawn.noise.to(alpha.device, non_blocking=True)) / tau
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)


def draw_all(alpha_host: dict[str, torch.Tensor], mode: str, tau: float, *, generator: torch.Generator | None = None
             ) -> dict[str, Draw]:
    """:func:`draw` for every cell type (in the order of ``alpha_host``).

    Args:
        alpha_host: alpha per cell type, on the host.
        mode: ``pair``, ``one`` or ``full``.
        tau: the Gumbel-softmax temperature.
        generator: the random generator.
    """
    return {name: draw(alpha, mode, tau, generator=generator) for name, alpha in alpha_host.items()}


def choices_from(alphas: dict[str, torch.Tensor], draws: dict[str, Draw], tau: float) -> dict[str, list[EdgeChoice]]:
    """The supernet's argument for a set of draws: per cell type, per edge, its weights row
    (computed from ``alphas`` on their device) and the indices of the operations to run.
    Differentiable unless called under ``torch.no_grad``; call it once per forward pass, so
    that every pass has its own graph back to alpha."""
    choices = {}
    for name, alpha in alphas.items():
        drawn = draws[name]
        weights = edge_weights(alpha, drawn, tau)
        choices[name] = [EdgeChoice(weights[i], tuple(row.nonzero().flatten().tolist()))
                         for i, row in enumerate(drawn.active)]
    return choices


def sample_choices(alphas: dict[str, torch.Tensor], mode: str, tau: float, *, generator: torch.Generator | None = None,
                   alpha_host: dict[str, torch.Tensor] | None = None) -> dict[str, list[EdgeChoice]]:
    """Draw and weigh in one call (see :func:`draw_all`, :func:`choices_from`).

    Args:
        alphas: alpha per cell type.
        mode: ``pair``, ``one`` or ``full``.
        tau: the Gumbel-softmax temperature.
        generator: the random generator.
        alpha_host: a host copy of ``alphas`` (default: copied here).
    """
    if alpha_host is None:
        alpha_host = host_copy(alphas)
    return choices_from(alphas, draw_all(alpha_host, mode, tau, generator=generator), tau)


def argmax_choices(alphas: dict[str, torch.Tensor]) -> dict[str, list[EdgeChoice]]:
    """The currently strongest operation of every edge with weight 1 (the derived cells, for
    evaluating them inside the supernet)."""
    choices = {}
    for name, alpha in host_copy(alphas).items():
        ones = torch.ones((), device=alphas[name].device)
        choices[name] = [EdgeChoice(ones.expand(alpha.shape[1]), (int(row.argmax()),)) for row in alpha]
    return choices


def host_copy(alphas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All alphas on the host in one device-to-host copy (one synchronisation)."""
    names = list(alphas)
    flat = torch.cat([alphas[n].detach().float().flatten() for n in names]).cpu()
    sizes = [alphas[n].numel() for n in names]
    return {n: part.view(alphas[n].shape) for n, part in zip(names, flat.split(sizes))}


def _dense(alpha: torch.Tensor, mode: str, tau: float, generator: torch.Generator | None) -> torch.Tensor:
    return edge_weights(alpha, draw(alpha.detach().float().cpu(), mode, tau, generator=generator), tau)


def sample_pair(alpha: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Algorithm 1 of the paper for one alpha (edges, ops): dense weights, two nonzero per edge."""
    return _dense(alpha, "pair", tau, generator)


def sample_one(alpha: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """GDAS-like: one-hot at the argmax of z_bar, straight-through gradient."""
    return _dense(alpha, "one", tau, generator)


def sample_full(alpha: torch.Tensor, tau: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARTS: every operation, weighted by softmax(alpha)."""
    return _dense(alpha, "full", tau, generator)


SAMPLERS = dict(zip(SAMPLING_CHOICES, (sample_pair, sample_one, sample_full)))
