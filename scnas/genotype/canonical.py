"""Canonical form, content hash and edge-by-edge diff of genotypes.

Two documents describe the same cells exactly when their canonical forms are equal: edges
sorted by (to, from), concat sorted, and only ``format``, ``version``, ``nodes`` and
``cells`` kept (the vocabulary and the provenance describe the search, not the network).
The hash is SHA-256 of the canonical form as compact JSON with sorted keys.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from scnas.genotype.model import CELL_TYPES, Cell, Genotype


def _canonical_cell(cell: Cell) -> dict[str, Any]:
    edges = sorted(cell.edges, key=lambda e: (e.target, e.source))
    return {"edges": [{"from": e.source, "to": e.target, "op": e.op} for e in edges],
            "concat": sorted(cell.concat)}


def canonical_dict(genotype: Genotype) -> dict[str, Any]:
    """The part of the document that defines the network, in canonical order."""
    return {"format": genotype.format, "version": genotype.version, "nodes": genotype.nodes,
            "cells": {name: _canonical_cell(genotype.cell(name)) for name in CELL_TYPES}}


SHORT_HASH_DIGITS = 12
"""How many leading hex digits of :func:`genotype_hash` scnas shows (:func:`short_hash`)."""


def genotype_hash(genotype: Genotype) -> str:
    """SHA-256 of the canonical form, all 64 hex digits (what files record); equal for
    documents describing the same cells. Output for people shows :func:`short_hash`."""
    text = json.dumps(canonical_dict(genotype), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def short_hash(genotype: Genotype | str) -> str:
    """The hash as scnas shows it: the first ``SHORT_HASH_DIGITS`` (12) hex digits of
    :func:`genotype_hash`, of a genotype or of a full hash already computed. 12 digits (48
    bits) keep accidental collisions unlikely below millions of genotypes and fit a line."""
    full = genotype if isinstance(genotype, str) else genotype_hash(genotype)
    return full[:SHORT_HASH_DIGITS]


def normalized(genotype: Genotype) -> Genotype:
    """The same genotype with edges and concat in canonical order (vocabulary and provenance kept)."""
    data = genotype.to_dict()
    data["cells"] = canonical_dict(genotype)["cells"]
    return Genotype.model_validate(data)


@dataclass(frozen=True)
class Change:
    """One difference between two genotypes."""

    cell: str          # cell type, or "" for document-level fields
    kind: str          # "added", "removed", "changed", "concat", "nodes"
    description: str


def diff(a: Genotype, b: Genotype) -> list[Change]:
    """Differences from ``a`` to ``b``: node count, then per cell edges added/removed/changed and concat."""
    changes: list[Change] = []
    if a.nodes != b.nodes:
        changes.append(Change("", "nodes", f"nodes: {a.nodes} -> {b.nodes}"))
    for name in CELL_TYPES:
        ea = {(e.source, e.target): e.op for e in a.cell(name).edges}
        eb = {(e.source, e.target): e.op for e in b.cell(name).edges}
        for key in sorted(set(ea) | set(eb), key=lambda k: (k[1], k[0])):
            src, dst = key
            if key not in eb:
                changes.append(Change(name, "removed", f"- {src} -> {dst} {ea[key]}"))
            elif key not in ea:
                changes.append(Change(name, "added", f"+ {src} -> {dst} {eb[key]}"))
            elif ea[key] != eb[key]:
                changes.append(Change(name, "changed", f"~ {src} -> {dst} {ea[key]} -> {eb[key]}"))
        ca, cb = sorted(a.cell(name).concat), sorted(b.cell(name).concat)
        if ca != cb:
            changes.append(Change(name, "concat", f"concat {ca} -> {cb}"))
    return changes
