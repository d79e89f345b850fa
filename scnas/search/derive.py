"""From alpha to a genotype: argmax per edge, ``zero`` meaning no edge (the paper), or
DARTS-style: the ``top_k`` strongest incoming edges per node, each with its best non-zero op.

The result always satisfies the format's rules: a node left without inputs is dropped from
``concat`` and its outgoing edges are removed; a cell left empty keeps its single strongest
non-zero edge into node 2.
"""

from __future__ import annotations

from typing import Any

import torch

from scnas.genotype import CELL_TYPES, FORMAT_NAME, NUM_INPUTS, Genotype, GenotypeError, genotype_from_data
from scnas.genotype.ops import OPS, ZERO
from scnas.search.supernet import cell_edges


def parameter_free_indices(ops: list[str]) -> list[int]:
    """Indices in ``ops`` of the operations without weights (identity, pooling; not zero)."""
    return [i for i, op in enumerate(ops) if op != ZERO and not OPS[op].parametric]


def free_mass(alphas, ops: list[str]) -> torch.Tensor:
    """softmax(alpha)'s mean mass per edge on the parameter-free operations, summed over the
    cell types (``alphas``: (edges, ops) tensors); differentiable, for ``--free-penalty``."""
    free = parameter_free_indices(list(ops))
    return sum(torch.softmax(alpha, dim=-1)[:, free].sum(dim=-1).mean() for alpha in alphas)


def _cap_free(chosen: dict[tuple[int, int], str], probabilities: torch.Tensor, pairs: list[tuple[int, int]],
              ops: list[str], max_free: int) -> None:
    """Keep the ``max_free`` most probable parameter-free operations of a cell; every other
    parameter-free edge gets its most probable operation with weights (P-DARTS, DARTS+)."""
    free = set(parameter_free_indices(ops))
    weighted = [i for i, op in enumerate(ops) if op != ZERO and i not in free]
    index = {pair: i for i, pair in enumerate(pairs)}
    ranked = sorted((pair for pair, op in chosen.items() if ops.index(op) in free),
                    key=lambda pair: -float(probabilities[index[pair], ops.index(chosen[pair])]))
    for pair in ranked[max_free:]:
        if weighted:
            row = probabilities[index[pair]]
            chosen[pair] = ops[max(weighted, key=lambda i: float(row[i]))]


def _cell(probabilities: torch.Tensor, nodes: int, ops: list[str], top_k: int | None,
          max_free: int | None = None) -> dict[str, Any]:
    pairs = cell_edges(nodes)
    zero = ops.index(ZERO) if ZERO in ops else None
    nonzero = probabilities.clone()
    if zero is not None:
        nonzero[:, zero] = -1.0
    best_op = nonzero.argmax(dim=-1)
    chosen: dict[tuple[int, int], str] = {}
    if top_k is None:
        winners = probabilities.argmax(dim=-1)
        for index, (source, target) in enumerate(pairs):
            if zero is None or int(winners[index]) != zero:
                chosen[(source, target)] = ops[int(winners[index])]
    else:
        for target in range(NUM_INPUTS, NUM_INPUTS + nodes):
            incoming = [i for i, (s, t) in enumerate(pairs) if t == target]
            strength = sorted(incoming, key=lambda i: -float(nonzero[i, best_op[i]]))
            for index in strength[:top_k]:
                chosen[pairs[index]] = ops[int(best_op[index])]
    if max_free is not None:
        _cap_free(chosen, probabilities, pairs, ops, max_free)
    fed: set[int] = set()
    for target in range(NUM_INPUTS, NUM_INPUTS + nodes):   # drop edges leaving nodes that receive nothing
        for source in range(target):
            if (source, target) in chosen and source >= NUM_INPUTS and source not in fed:
                del chosen[(source, target)]
        if any(t == target for (_, t) in chosen):
            fed.add(target)
    if not fed:
        into_first = [i for i, (s, t) in enumerate(pairs) if t == NUM_INPUTS]
        index = max(into_first, key=lambda i: float(nonzero[i, best_op[i]]))
        chosen[pairs[index]] = ops[int(best_op[index])]
        fed.add(NUM_INPUTS)
    edges = [{"from": s, "to": t, "op": op} for (s, t), op in sorted(chosen.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    return {"edges": edges, "concat": sorted(fed)}


def derive_genotype(probabilities: dict[str, torch.Tensor], nodes: int, ops: list[str], *, top_k: int | None = None,
                    provenance: dict[str, Any] | None = None, max_free: int | None = None,
                    strength: dict[str, torch.Tensor] | None = None) -> Genotype:
    """The genotype that softmax(alpha) ``probabilities`` (per cell type, (edges, ops)) points to,
    with the probabilities recorded in ``provenance.probabilities``; ``max_free``: at most that
    many parameter-free operations per cell.

    Args:
        probabilities: softmax(alpha) per cell type, (edges, ops) in the supernet's edge order.
        nodes: intermediate nodes per cell.
        ops: the vocabulary, in the order of the probabilities' columns.
        top_k: DARTS's rule: per node the ``top_k`` strongest incoming edges; None: argmax per
            edge, zero = no edge.
        provenance: recorded in the genotype (the probabilities are added).
        max_free: at most this many parameter-free ops per cell (None: no limit).
        strength: what the rules rank instead of the probabilities, per cell type (edges, ops):
            the rise in loss of :mod:`scnas.search.perturb` (``zero``'s column 0); None: the
            probabilities. The probabilities are recorded either way.
    """
    pairs = cell_edges(nodes)
    record = {name: [{"from": s, "to": t, "p": {op: round(float(p), 6) for op, p in zip(ops, probabilities[name][i])}}
                     for i, (s, t) in enumerate(pairs)] for name in CELL_TYPES}
    for entries in record.values():   # rounding must not break "sums to 1"
        for entry in entries:
            top = max(entry["p"], key=entry["p"].get)
            entry["p"][top] = round(entry["p"][top] + 1.0 - sum(entry["p"].values()), 6)
    data = {"format": FORMAT_NAME, "version": 1, "nodes": nodes, "ops": list(ops),
            "cells": {name: _cell((strength or probabilities)[name], nodes, ops, top_k, max_free)
                      for name in CELL_TYPES},
            "provenance": {**(provenance or {}), "probabilities": record}}
    return genotype_from_data(data, source="derived genotype")


def derivation_name(derive: str, top_k: int, max_free: int | None = None, *, by: str = "alpha") -> str:
    """How a genotype was derived, as recorded in ``provenance.search.derivation``.

    Args:
        derive: ``top-k`` or ``argmax``.
        top_k: incoming edges per node with ``top-k``.
        max_free: at most this many parameter-free ops per cell (None: no limit).
        by: ``alpha`` (softmax(alpha)) or ``perturbation`` (:mod:`scnas.search.perturb`).
    """
    if by == "perturbation":
        rule = (f"perturbation (DARTS-PT): per node the top-{top_k} incoming edges by the loss rise of their best op"
                if derive == "top-k" else "perturbation (DARTS-PT): per edge the op whose removal raises the loss "
                "most, no edge where none does")
    else:
        rule = f"top-{top_k} incoming edges per node (DARTS)" if derive == "top-k" else "argmax per edge, zero = no edge"
    return rule if max_free is None else f"{rule}; at most {max_free} parameter-free op(s) per cell"


def recorded_probabilities(genotype: Genotype, source: str = "genotype") -> dict[str, torch.Tensor]:
    """softmax(alpha) per cell type as (edges, ops) tensors, from ``provenance.probabilities``
    of a genotype written by a search (edges in the supernet's order)."""
    recorded = genotype.provenance.probabilities if genotype.provenance else None
    if not recorded:
        raise GenotypeError("has no provenance.probabilities (softmax(alpha) of a search): only a genotype written "
                            "by 'scnas search' can be derived again", source=source)
    pairs = cell_edges(genotype.nodes)
    result = {}
    for name in CELL_TYPES:
        entries = {(e.source, e.target): e.p for e in recorded.get(name, [])}
        missing = [pair for pair in pairs if pair not in entries]
        if missing:
            raise GenotypeError(f"provenance.probabilities.{name} lacks the edges {missing[:3]} of a "
                                f"{genotype.nodes}-node cell", source=source)
        try:
            result[name] = torch.tensor([[float(entries[pair][op]) for op in genotype.ops] for pair in pairs])
        except KeyError as exc:
            raise GenotypeError(f"provenance.probabilities.{name} has no probability for op {exc}",
                                source=source) from None
    return result


def alpha_movement(probabilities: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """How far softmax(alpha) moved from uniform, per cell type: the largest probability of any
    op on any edge, the mean over edges of each edge's largest, both also as multiples of
    uniform (1 / number of ops). A "found" cell whose numbers are near 1x is the initialisation."""
    result = {}
    for name, p in probabilities.items():
        uniform = 1.0 / p.shape[-1]
        largest, mean_largest = float(p.max()), float(p.max(-1).values.mean())
        result[name] = {"largest": round(largest, 4), "mean_edge_largest": round(mean_largest, 4),
                        "largest_x_uniform": round(largest / uniform, 2),
                        "mean_edge_largest_x_uniform": round(mean_largest / uniform, 2)}
    return result


def describe_movement(movement: dict[str, dict[str, float]]) -> str:
    """One line: per cell type the largest probability as a multiple of uniform."""
    return "alpha moved (largest probability / uniform): " + ", ".join(
        f"{name} {m['largest_x_uniform']:.2f}x (edge mean {m['mean_edge_largest_x_uniform']:.2f}x)"
        for name, m in movement.items())


def rederive(genotype: Genotype, derive: str = "top-k", top_k: int = 2, *, source: str = "genotype",
             max_free: int | None = None, perturbation: dict[str, Any] | None = None) -> Genotype:
    """The genotype that ``genotype``'s recorded softmax(alpha) gives under another rule.

    Args:
        genotype: a genotype written by a search (its provenance records softmax(alpha)).
        derive: ``top-k`` or ``argmax``.
        top_k: incoming edges per node with ``top-k``.
        source: the file it came from, for error messages.
        max_free: at most this many parameter-free ops per cell.
        perturbation: the run's scores (:func:`scnas.search.perturb.run_scores`): the rules rank
            them instead of the probabilities, and the genotype records them
            (``provenance.search.perturbation``).
    """
    probabilities = recorded_probabilities(genotype, source)
    provenance = genotype.provenance.model_dump(by_alias=True, exclude_none=True)
    provenance.pop("probabilities", None)
    search = dict(provenance.get("search") or {})
    search["derivation"] = derivation_name(derive, top_k, max_free, by="perturbation" if perturbation else "alpha")
    strength = None
    if perturbation:
        if list(perturbation["ops"]) != list(genotype.ops):
            raise GenotypeError(f"the perturbation scores are over {perturbation['ops']}, the genotype's ops are "
                                f"{list(genotype.ops)}: not the same search", source=source)
        strength = {name: torch.tensor(rows, dtype=torch.float64) for name, rows in perturbation["scores"].items()}
        search["perturbation"] = {key: perturbation[key] for key in ("settings", "base_loss", "scores", "epoch")}
    else:
        search.pop("perturbation", None)
    provenance["search"] = search
    return derive_genotype(probabilities, genotype.nodes, list(genotype.ops),
                           top_k=top_k if derive == "top-k" else None,
                           provenance=provenance, max_free=max_free, strength=strength)
