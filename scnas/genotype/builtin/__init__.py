"""Genotypes that ship with scnas, a seeded random genotype generator, and
:func:`load_genotype`, which takes a file path or a built-in name.

Built-ins are YAML files in this folder (package data); their names work wherever a
genotype path does. Random genotypes give baselines of the same size as a searched one.
"""

from __future__ import annotations

import os
import random
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from scnas.errors import GenotypeError
from scnas.fileio import STDIO
from scnas.genotype.io import SUFFIXES, parse_genotype, read_genotype
from scnas.genotype.model import CELL_TYPES, FORMAT_NAME, FORMAT_VERSION, MAX_NODES, NUM_INPUTS, Genotype
from scnas.genotype.ops import PAPER_OPS, ZERO

BUILTIN_NAMES: tuple[str, ...] = ("uresnet", "minimal")


@cache
def _builtin_text(name: str) -> str:
    return resources.files(__package__).joinpath(f"{name}.yaml").read_text(encoding="utf-8")


def builtin_genotype(name: str) -> Genotype:
    """The built-in genotype ``name`` (see :data:`BUILTIN_NAMES`)."""
    if name not in BUILTIN_NAMES:
        raise GenotypeError(f"no built-in genotype {name!r}; built-ins: {', '.join(BUILTIN_NAMES)}")
    return parse_genotype(_builtin_text(name), "yaml", source=f"builtin:{name}")


def random_genotype(seed: int, nodes: int = 4, ops: list[str] | tuple[str, ...] | None = None,
                    *, inputs_per_node: int = 2) -> Genotype:
    """A random genotype: each intermediate node takes ``inputs_per_node`` distinct earlier
    nodes (fewer where fewer exist) through random non-``zero`` ops; every node is concatenated.
    The same seed gives the same genotype on every platform (Python's ``random.Random``).

    Args:
        seed: the same seed gives the same genotype.
        nodes: intermediate nodes per cell.
        ops: the vocabulary (default: the paper's).
        inputs_per_node: incoming edges per node.
    """
    vocabulary = list(ops or PAPER_OPS)
    choices = [op for op in vocabulary if op != ZERO]
    if not choices:
        raise GenotypeError("random genotype: the vocabulary has no operation besides 'zero'")
    if nodes < 1 or inputs_per_node < 1:
        raise GenotypeError("random genotype: nodes and inputs_per_node must be at least 1")
    if nodes > MAX_NODES:
        raise GenotypeError(f"random genotype: nodes is {nodes}; a genotype has at most {MAX_NODES} nodes")
    rng = random.Random(seed)
    cells = {}
    for name in CELL_TYPES:
        edges = []
        for target in range(NUM_INPUTS, NUM_INPUTS + nodes):
            for source in sorted(rng.sample(range(target), min(inputs_per_node, target))):
                edges.append({"from": source, "to": target, "op": rng.choice(choices)})
        cells[name] = {"edges": edges, "concat": list(range(NUM_INPUTS, NUM_INPUTS + nodes))}
    return Genotype.model_validate({
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "nodes": nodes, "ops": vocabulary, "cells": cells,
        "provenance": {"description": f"random genotype, seed {seed}, {inputs_per_node} inputs per node"},
    })


def load_genotype(spec: str | os.PathLike, fmt: str | None = None, **options: Any) -> Genotype:
    """A genotype from a file path or, when no such file exists, a built-in name. ``fmt`` and
    ``options`` are as for :func:`read_genotype`."""
    text = str(spec)
    if text == STDIO or Path(text).exists():
        return read_genotype(spec, fmt, **options)
    if text in BUILTIN_NAMES:
        return builtin_genotype(text)
    if Path(text).suffix.lower() in SUFFIXES or os.sep in text:
        return read_genotype(spec, fmt, **options)  # reports the missing file
    raise GenotypeError(f"no such file, and no built-in genotype of that name (built-ins: {', '.join(BUILTIN_NAMES)})",
                        source=text)
