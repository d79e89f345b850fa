"""The memory profile of one search step (a Theta step and an alpha step), for the planner.

Which operations run depends on the sampling. ``typical`` is one seeded draw at uniform
alpha, what the first epochs look like. ``bound``, what plans are made with, is the larger of
that and of a draw that runs on every edge the operations keeping the most memory for
backward (the two heaviest for ``pair``, the heaviest for ``one``; ``full`` runs them all):
late in a search, when alpha prefers some operations, draws concentrate on them. It is not a
proven upper bound (with edge checkpointing the typical draw can need more than the heavy
one, hence the maximum of both).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch

from scnas.build import BuildConfig
from scnas.metrics import soft_jaccard_loss
from scnas.build.allocations import PeakTracker, storage_bytes
from scnas.build.autocast_emulation import emulate_autocast
from scnas.build.memory_plan import (StepProfile, _Simulation, check_simulation_size, larger, parameter_count,
                                     profile_step)
from scnas.build.ops import make_op
from scnas.genotype import CELL_TYPES
from scnas.search.sampling import Draw, edge_weights, draw
from scnas.search.supernet import EdgeChoice, SuperNet, cell_edges


def op_memory_ranking(ops: list[str], amp: str = "off") -> list[int]:
    """Indices of ``ops`` from the one that keeps the most memory for backward per voxel (as in a
    mixed edge, output weighted) to the least: the growth of what stays alive after the
    forward pass from 16^3 to 32^3, so that padded copies do not inflate small sizes."""
    kept = []
    with _Simulation():
        for name in ops:
            module = make_op(name, 4, 4, stride=1, negative_slope=0.01)
            emulate_autocast(module, amp)
            sizes = []
            for size in (16, 32):
                x = torch.randn(1, 4, size, size, size, requires_grad=True)
                weight = torch.tensor(0.5, requires_grad=True)
                tracker = PeakTracker()
                with tracker:
                    out = weight * module(x)
                sizes.append(tracker.live)
                del out
            kept.append(sizes[1] - sizes[0])
    return sorted(range(len(ops)), key=lambda i: -kept[i])


def _choices(alphas: dict[str, torch.Tensor], active: torch.Tensor, tau: float) -> dict[str, list[EdgeChoice]]:
    choices = {}
    for name, alpha in alphas.items():
        weights = edge_weights(alpha, Draw("pair", torch.zeros(active.shape), active), tau)
        choices[name] = [EdgeChoice(weights[i], tuple(row.nonzero().flatten().tolist())) for i, row in enumerate(active)]
    return choices


def search_step_profile(config: BuildConfig, nodes: int, ops: list[str], *, sampling: str = "pair", amp: str = "off",
                        checkpoint: str = "off", batch: int = 1,
                        draw_kind: Literal["bound", "typical"] = "bound", share: int | None = None) -> StepProfile:
    """The memory profile of one search step at ``batch`` patches per process: a Theta step
    (forward, loss, backward into new gradients of Theta), then an alpha step (forward, loss,
    gradients of alpha only), with Adam's two moments beside Theta.

    Only the alpha step is run: the Theta step keeps a subset of its tensors (the sampled
    weights need no gradient, so the operations' outputs are not kept for them) plus the
    gradients of Theta, so the alpha step's profile with those gradients added bounds both.
    Both steps' batches of the process's ``share`` of patches (default: ``batch``) are on the
    device meanwhile.

    Args:
        config: the supernet's settings.
        nodes: intermediate nodes per cell.
        ops: the vocabulary.
        sampling: ``pair``, ``one`` or ``full``.
        amp: the precision: ``off``, ``fp16`` or ``bf16``.
        checkpoint: the checkpointing mode: ``off``, ``cells`` or ``edges``.
        batch: the micro-batch simulated.
        draw_kind: ``bound`` (the heaviest ops on every edge) or ``typical`` (a draw at uniform
            alpha).
        share: the process's patches per step (default: ``batch``).
    """
    edges = len(cell_edges(nodes))
    if sampling == "full":
        active = torch.ones(edges, len(ops), dtype=torch.bool)
    elif draw_kind == "bound":
        heaviest = op_memory_ranking(ops, amp)[: 2 if sampling == "pair" else 1]
        active = torch.zeros(edges, len(ops), dtype=torch.bool)
        active[:, heaviest] = True
        typical = search_step_profile(config, nodes, ops, sampling=sampling, amp=amp, checkpoint=checkpoint,
                                      batch=batch, draw_kind="typical", share=share)
        return larger(_profile_draw(config, nodes, ops, amp, checkpoint, batch, active, share), typical)
    else:
        uniform = torch.zeros(edges, len(ops))
        active = draw(uniform, sampling, 1.0, generator=torch.Generator().manual_seed(0)).active
    return _profile_draw(config, nodes, ops, amp, checkpoint, batch, active, share)


@lru_cache(maxsize=64)
def supernet_parameters(config: BuildConfig, nodes: int, ops: tuple[str, ...]) -> int:
    """Parameters of the supernet (every op on every edge), counted without allocating."""
    return parameter_count(lambda: SuperNet(config, nodes, list(ops)))


def _profile_draw(config: BuildConfig, nodes: int, ops: list[str], amp: str, checkpoint: str, batch: int,
                  active: torch.Tensor, share: int | None) -> StepProfile:
    edges = active.shape[0]
    check_simulation_size(supernet_parameters(config, nodes, tuple(ops)), f"search stem {config.stem_channels}")
    with _Simulation():
        net = SuperNet(config, nodes, ops)
        net.train()
        net.set_checkpointing(checkpoint)
        emulate_autocast(net, amp)
        params = list(net.parameters())
        alphas = {name: torch.zeros(edges, len(ops), requires_grad=True) for name in CELL_TYPES}

        def run_step(batch_: int, patch: tuple[int, int, int]) -> None:
            whole = max(share or batch_, batch_)
            inputs = [(torch.randn(whole, config.in_channels, *patch),
                       torch.randint(0, config.num_classes, (whole, *patch))) for _ in ("theta", "alpha")]
            x, y = inputs[1]
            choices = _choices(alphas, active, 1.0)
            torch.autograd.grad(soft_jaccard_loss(net(x[:batch_], choices), y[:batch_]), list(alphas.values()))

        # weights, their gradients (held through the Theta step) and Adam's two moments
        return profile_step(run_step, config.divisor, 4 * storage_bytes(params), batch=batch)


def plan_search_step(config: BuildConfig, nodes: int, ops: list[str], *, sampling: str, amp: str, patch,
                     share: int, checkpoint: str, micro_batch: int | None, available: int | None):
    """The :class:`~scnas.build.memory_plan.MemoryPlan` of a search (planned with the ``bound`` draw).

    Args:
        config: the supernet's settings (as for :func:`search_step_profile`).
        nodes: its intermediate nodes per cell.
        ops: its vocabulary.
        sampling: how its ops are drawn: ``pair``, ``one`` or ``full``.
        amp: the step's precision.
        patch: the patch size.
        share: patches per process and step.
        checkpoint: a checkpointing mode, or ``auto``.
        micro_batch: patches per forward pass (None: the largest that fits).
        available: the memory budget in bytes (None: nothing to check).
    """
    from scnas.build.memory_plan import choose_plan

    cache: dict[tuple[str, int], StepProfile] = {}

    def profile_of(mode: str, batch: int) -> StepProfile:
        if (mode, batch) not in cache:
            cache[mode, batch] = search_step_profile(config, nodes, ops, sampling=sampling, amp=amp, checkpoint=mode,
                                                     batch=batch, draw_kind="bound", share=share)
        return cache[mode, batch]

    return choose_plan(profile_of, patch, share, checkpoint=checkpoint, micro_batch=micro_batch, available=available,
                       divisor=config.divisor)
