"""Converters between scnas genotypes and two foreign text forms.

* DARTS ``Genotype(normal=[(op, input), ...], normal_concat=[...], reduce=..., reduce_concat=...)``
  strings, parsed as data with :mod:`ast` (never ``eval``). DARTS has two cell types and
  exactly two inputs per node; which DARTS cell becomes which scnas cell(s) is a mapping
  (default: normal -> encoder_normal + decoder_normal, reduce -> reduction + expansion).
* A one-line string in the style of NAS-Bench-201, extended to two inputs, four cells and
  an explicit concat: ``scnas-v1;encoder_normal=|conv_3x3x3~0|identity~1|+|...|@2,3;reduction=...``.

Both round-trip losslessly (equal hash) for what they can express; anything else is a
``GenotypeError`` saying why.
"""

from __future__ import annotations

import ast
import json
from typing import Any

from scnas.errors import GenotypeError
from scnas.genotype.canonical import canonical_dict
from scnas.genotype.model import CELL_TYPES, FORMAT_NAME, FORMAT_VERSION, NUM_INPUTS, Genotype
from scnas.genotype.ops import OPS, PAPER_OPS, ZERO
from scnas.genotype.validation import genotype_from_data

DARTS_OP_NAMES: dict[str, str] = {
    "none": ZERO,
    "skip_connect": "identity",
    "max_pool_3x3": "max_pool_3x3x3",
    "avg_pool_3x3": "avg_pool_3x3x3",
    "dil_conv_3x3": "sep_dil2_conv_3x3x3",  # DARTS's DilConv: depthwise 3x3 dilation 2 + pointwise
}
"""DARTS operation names with an exact 3D counterpart. Others (sep_conv_3x3 is two stacked
separable convs, 5x5 kernels) need an explicit ``op_map``."""

SCNAS_TO_DARTS: dict[str, str] = {scnas: darts for darts, scnas in DARTS_OP_NAMES.items() if scnas != ZERO}
"""The DARTS name written for a scnas op with an exact DARTS counterpart. conv_3x3x3,
sep_dil3_conv_3x3x3 and sep_dil4_conv_3x3x3 have none: writing them needs a chosen name."""

PROVENANCE_COMMENT = "# scnas-provenance: "
"""A DARTS file written by scnas ends with this comment and the provenance as one line of JSON;
DARTS code ignores it (it is a comment), scnas reads it back."""
DARTS_OPS_KEY = "darts_ops"
"""Provenance field of a genotype read from DARTS: the DARTS op names it used, DARTS -> scnas."""
DARTS_ORDER_KEY = "darts_order"
"""Provenance field of a genotype read from DARTS whose pairs were not listed by input: per
scnas cell, per intermediate node, the inputs in DARTS's order. DARTS builds a cell's ``_ops``
in the order of its pairs, so writing DARTS again in that order keeps its checkpoints loading."""

DEFAULT_DARTS_CELLS: dict[str, tuple[str, ...]] = {
    "normal": ("encoder_normal", "decoder_normal"),
    "reduce": ("reduction", "expansion"),
}
DARTS_FIELDS = ("normal", "normal_concat", "reduce", "reduce_concat")
ONELINE_PREFIX = "scnas-v1"


def parse_op_map(text: str | None) -> dict[str, str]:
    """``"sep_conv_3x3=conv_3x3x3,dil_conv_5x5=sep_dil4_conv_3x3x3"`` -> {darts name: scnas name}."""
    result: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, target = item.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise GenotypeError(f"op map entry {item!r} is not NAME=SCNAS_OP")
        if target.strip() not in OPS:
            raise GenotypeError(f"op map entry {item!r}: {target.strip()!r} is not a scnas op; known ops: {', '.join(OPS)}")
        result[name.strip()] = target.strip()
    return result


def parse_darts_names(text: str | None) -> dict[str, str]:
    """``"conv_3x3x3=sep_conv_3x3"`` -> {scnas op: DARTS name to write}."""
    result: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, target = (part.strip() for part in item.partition("="))
        if not sep or not name or not target:
            raise GenotypeError(f"DARTS op name entry {item!r} is not SCNAS_OP=DARTS_NAME")
        if name not in OPS or name == ZERO:
            raise GenotypeError(f"DARTS op name entry {item!r}: {name!r} is not a scnas edge op; known ops: "
                                f"{', '.join(op for op in OPS if op != ZERO)}")
        if not target.isidentifier():
            raise GenotypeError(f"DARTS op name entry {item!r}: {target!r} is not a DARTS op name (letters, digits, _)")
        if result.get(name, target) != target:
            raise GenotypeError(f"DARTS op name entry {item!r}: {name} is already written as {result[name]!r}")
        result[name] = target
    return result


def parse_cell_map(text: str | None) -> dict[str, tuple[str, ...]] | None:
    """``"normal=encoder_normal,decoder_normal;reduce=reduction,expansion"`` -> mapping."""
    if not text:
        return None
    result: dict[str, tuple[str, ...]] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        darts_cell, sep, targets = item.partition("=")
        names = tuple(t.strip() for t in targets.split(",") if t.strip())
        if not sep or darts_cell.strip() not in ("normal", "reduce") or not names:
            raise GenotypeError(f"cell map entry {item!r} is not normal=CELL[,CELL] or reduce=CELL[,CELL]")
        for name in names:
            if name not in CELL_TYPES:
                raise GenotypeError(f"cell map entry {item!r}: {name!r} is not a cell type ({', '.join(CELL_TYPES)})")
        result[darts_cell.strip()] = names
    return result


# ----------------------------------------------------------------------------- DARTS

def _literal_edges(node: ast.AST, field: str, source: str | None) -> list[tuple[str, int]]:
    if not isinstance(node, (ast.List, ast.Tuple)):
        raise GenotypeError(f"DARTS field {field!r} must be a list of (op, input) pairs", source=source)
    edges = []
    for i, item in enumerate(node.elts):
        if not (isinstance(item, ast.Tuple) and len(item.elts) == 2
                and isinstance(item.elts[0], ast.Constant) and isinstance(item.elts[0].value, str)
                and isinstance(item.elts[1], ast.Constant) and type(item.elts[1].value) is int):
            raise GenotypeError(f"DARTS field {field}[{i}] must be a pair ('op_name', input_index)", source=source)
        edges.append((item.elts[0].value, item.elts[1].value))
    return edges


def _literal_concat(node: ast.AST, field: str, source: str | None) -> list[int]:
    def ints(nodes: list[ast.expr]) -> list[int]:
        if not all(isinstance(n, ast.Constant) and type(n.value) is int for n in nodes):
            raise GenotypeError(f"DARTS field {field!r} must hold integers", source=source)
        return [n.value for n in nodes]  # type: ignore[attr-defined]

    if isinstance(node, (ast.List, ast.Tuple)):
        return ints(node.elts)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range"
            and not node.keywords and 1 <= len(node.args) <= 3):
        bounds = ints(node.args)
        if len(bounds) == 3 and bounds[2] == 0:
            raise GenotypeError(f"DARTS field {field!r}: range step is 0", source=source)
        return list(range(*bounds))
    raise GenotypeError(f"DARTS field {field!r} must be a list of integers or range(a, b)", source=source)


def _parse_darts_call(text: str, source: str | None) -> dict[str, Any]:
    try:
        tree = ast.parse(text.strip(), mode="exec")
    except SyntaxError as exc:
        raise GenotypeError(f"not a DARTS Genotype(...) string: {exc.msg} at line {exc.lineno}", source=source) from None
    call = None
    if len(tree.body) == 1:
        stmt = tree.body[0]
        value = stmt.value if isinstance(stmt, (ast.Expr, ast.Assign)) else None
        if isinstance(value, ast.Call):
            func = value.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            call = value if name == "Genotype" else None
    if call is None:
        raise GenotypeError("not a DARTS string: expected one Genotype(normal=..., normal_concat=..., "
                            "reduce=..., reduce_concat=...) expression", source=source)
    if len(call.args) > len(DARTS_FIELDS):
        raise GenotypeError("DARTS Genotype takes at most 4 fields", source=source)
    fields: dict[str, ast.AST] = dict(zip(DARTS_FIELDS, call.args))
    for keyword in call.keywords:
        if keyword.arg not in DARTS_FIELDS:
            raise GenotypeError(f"unknown DARTS Genotype field {keyword.arg!r}; fields: {', '.join(DARTS_FIELDS)}",
                                source=source)
        if keyword.arg in fields:
            raise GenotypeError(f"DARTS Genotype field {keyword.arg!r} given twice", source=source)
        fields[keyword.arg] = keyword.value
    missing = [f for f in DARTS_FIELDS if f not in fields]
    if missing:
        raise GenotypeError(f"DARTS Genotype lacks {', '.join(missing)}", source=source)
    return {
        "normal": _literal_edges(fields["normal"], "normal", source),
        "reduce": _literal_edges(fields["reduce"], "reduce", source),
        "normal_concat": _literal_concat(fields["normal_concat"], "normal_concat", source),
        "reduce_concat": _literal_concat(fields["reduce_concat"], "reduce_concat", source),
    }


def _provenance_comment(text: str, source: str | None) -> dict[str, Any]:
    """The provenance a scnas-written DARTS file keeps in its last comment line (or none)."""
    for line in reversed(text.splitlines()):
        if line.startswith(PROVENANCE_COMMENT):
            try:
                value = json.loads(line[len(PROVENANCE_COMMENT):])
            except ValueError as exc:
                raise GenotypeError(f"the {PROVENANCE_COMMENT.strip()!r} comment is not one line of JSON ({exc})",
                                    source=source) from None
            if not isinstance(value, dict):
                raise GenotypeError(f"the {PROVENANCE_COMMENT.strip()!r} comment must hold a JSON object", source=source)
            return value
    return {}


def from_darts(text: str, *, source: str | None = None, op_map: dict[str, str] | None = None,
               cells: dict[str, tuple[str, ...]] | None = None, **_: Any) -> Genotype:
    """Read a DARTS ``Genotype(...)`` string. ``op_map`` maps foreign op names to scnas ones
    (added to :data:`DARTS_OP_NAMES`; scnas names map to themselves); ``cells`` says which
    scnas cells each DARTS cell becomes; every scnas cell must be covered exactly once. The
    DARTS names used are kept in ``provenance.darts_ops`` (so writing DARTS again gives them
    back), with the provenance of a ``# scnas-provenance:`` comment if the text has one.

    Args:
        text: the DARTS ``Genotype(...)`` string.
        source: the file it came from, for error messages.
        op_map: foreign op name -> scnas op name.
        cells: DARTS cell -> the scnas cells it becomes.
    """
    darts = _parse_darts_call(text, source)
    cells = cells or DEFAULT_DARTS_CELLS
    covered = [name for names in cells.values() for name in names]
    if sorted(covered) != sorted(CELL_TYPES):
        raise GenotypeError(f"the cell mapping must give every scnas cell exactly once; it gives {covered}", source=source)
    provenance = _provenance_comment(text, source)
    recorded = provenance.get(DARTS_OPS_KEY)
    names = {**DARTS_OP_NAMES, **(recorded if isinstance(recorded, dict) else {}), **(op_map or {})}
    node_counts = {len(darts["normal"]), len(darts["reduce"])}
    if len(node_counts) != 1 or min(node_counts) % 2:
        raise GenotypeError("DARTS cells must list two (op, input) pairs per node, the same number of nodes in "
                            f"normal and reduce; got {len(darts['normal'])} and {len(darts['reduce'])} pairs", source=source)
    nodes = node_counts.pop() // 2
    if nodes < 1:
        raise GenotypeError("DARTS cells are empty", source=source)
    result: dict[str, Any] = {}
    used: dict[str, str] = {}
    orders: dict[str, list[list[int]]] = {}
    for darts_cell, scnas_cells in cells.items():
        edges = []
        for i, (op, src) in enumerate(darts[darts_cell]):
            target = NUM_INPUTS + i // 2
            scnas_op = names.get(op, op if op in OPS else None)
            if scnas_op is None:
                raise GenotypeError(f"DARTS {darts_cell}[{i}]: op {op!r} has no scnas equivalent; give a mapping such as "
                                    f"--op-map {op}=conv_3x3x3 (scnas ops: {', '.join(OPS)})", source=source)
            if scnas_op == ZERO:
                continue
            if op != scnas_op:
                used[op] = scnas_op
            if any(e["from"] == src and e["to"] == target for e in edges):
                raise GenotypeError(
                    f"DARTS {darts_cell}[{i}]: node {target} takes input {src} twice (as the NASNet and AmoebaNet "
                    "cells of DARTS's genotypes.py do); a scnas genotype identifies an edge by its two nodes, so "
                    "a pair of nodes carries at most one operation (rule R6) and this cell cannot be converted. "
                    "Genotypes found by DARTS's own search never repeat an input", source=source)
            edges.append({"from": src, "to": target, "op": scnas_op})
        cell = {"edges": edges, "concat": darts[f"{darts_cell}_concat"]}
        order = [[e["from"] for e in edges if e["to"] == node] for node in range(NUM_INPUTS, NUM_INPUTS + nodes)]
        for name in scnas_cells:
            result[name] = cell
            if any(sources != sorted(sources) for sources in order):
                orders[name] = order
    data = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "nodes": nodes, "ops": list(PAPER_OPS),
            "cells": {name: result[name] for name in CELL_TYPES}}
    if used:
        provenance[DARTS_OPS_KEY] = dict(sorted(used.items()))
    provenance.pop(DARTS_ORDER_KEY, None)     # the order of this text, not of a comment written before
    if orders:
        provenance[DARTS_ORDER_KEY] = {name: orders[name] for name in CELL_TYPES if name in orders}
    if provenance:
        data["provenance"] = provenance
    return genotype_from_data(data, source)


def _darts_names(genotype: Genotype, op_map: dict[str, str] | None, darts_names: dict[str, str] | None) -> dict[str, str]:
    """scnas op -> DARTS name to write, from (first wins) the explicit ``darts_names``, the
    inverse of ``op_map``, the names the genotype was read with, and :data:`SCNAS_TO_DARTS`.
    A many-to-one ``op_map`` (or recorded names) without an explicit choice is refused."""
    chosen = dict(darts_names or {})
    recorded = getattr(genotype.provenance, DARTS_OPS_KEY, None) if genotype.provenance else None
    for origin, mapping in (("--op-map", op_map or {}),
                            (f"provenance.{DARTS_OPS_KEY}", recorded if isinstance(recorded, dict) else {})):
        inverse: dict[str, list[str]] = {}
        for foreign, scnas in mapping.items():
            if scnas in OPS and scnas != ZERO:
                inverse.setdefault(scnas, []).append(foreign)
        for scnas, foreigns in inverse.items():
            if scnas in chosen:
                continue
            if len(foreigns) > 1:
                raise GenotypeError(f"cannot write DARTS names: {origin} maps {' and '.join(sorted(foreigns))} all to "
                                    f"{scnas}, so the name to write back is a guess; choose one with --darts-op "
                                    f"{scnas}={sorted(foreigns)[0]}")
            chosen[scnas] = foreigns[0]
    return {**SCNAS_TO_DARTS, **chosen}


def to_darts(genotype: Genotype, *, op_map: dict[str, str] | None = None,
             cells: dict[str, tuple[str, ...]] | None = None, darts_names: dict[str, str] | None = None) -> str:
    """Write a DARTS ``Genotype(...)`` string. Every scnas cell a DARTS cell stands for must be
    identical (the default mapping needs decoder_normal == encoder_normal and expansion ==
    reduction); pass ``cells`` naming one scnas cell each to export just those. Op names are
    DARTS's own (see :func:`_darts_names`); an op with no DARTS name is refused.

    Args:
        genotype: the genotype to write.
        op_map: foreign op name -> scnas op name (written back as the foreign name).
        cells: DARTS cell -> the scnas cells it stands for.
        darts_names: scnas op -> the DARTS name to write (first choice).
    """
    cells = cells or DEFAULT_DARTS_CELLS
    if set(cells) != {"normal", "reduce"}:
        raise GenotypeError("a DARTS genotype needs both a normal and a reduce cell in the cell mapping")
    canonical = canonical_dict(genotype)["cells"]
    names = _darts_names(genotype, op_map, darts_names)
    parts, written = [], {}
    for darts_cell in ("normal", "reduce"):
        first, *others = cells[darts_cell]
        for other in others:
            if canonical[other] != canonical[first]:
                raise GenotypeError(f"cannot express in DARTS form: DARTS has one {darts_cell} cell but {first} and "
                                    f"{other} differ; export one of them with --darts-cells "
                                    f"\"normal=encoder_normal;reduce=reduction\" (the other cells are then left out)")
        cell = genotype.cell(first)
        pairs = []
        for node in genotype.intermediate_nodes:
            incoming = _in_darts_order(genotype, first, node)
            if len(incoming) != 2:
                raise GenotypeError(f"cannot express in DARTS form: node {node} of {first} has {len(incoming)} "
                                    "incoming edge(s); DARTS cells have exactly two per node")
            for edge in incoming:
                if edge.op not in names:
                    raise GenotypeError(f"cannot write DARTS names: {edge.op} (in {first}, node {node}) has no DARTS "
                                        f"counterpart; name the DARTS op to write with --darts-op {edge.op}=NAME (e.g. "
                                        f"{edge.op}=sep_conv_3x3), or --darts-op {edge.op}={edge.op} to keep the scnas "
                                        "name (DARTS code will not know it)")
                pairs.append((names[edge.op], edge.source))
                if names[edge.op] != edge.op:
                    written[names[edge.op]] = edge.op
        parts.append(f"{darts_cell}={pairs!r}, {darts_cell}_concat={sorted(cell.concat)!r}")
    text = f"Genotype({', '.join(parts)})"
    # DARTS has no field for provenance; a trailing comment keeps it (and the names written, so
    # scnas reads the file back without an --op-map) without disturbing DARTS code.
    provenance = {**genotype.to_dict().get("provenance", {}), DARTS_OPS_KEY: dict(sorted(written.items()))}
    if not written:
        del provenance[DARTS_OPS_KEY]
    if provenance:
        text += "\n" + PROVENANCE_COMMENT + json.dumps(provenance, sort_keys=True, separators=(",", ":"))
    return text


def _in_darts_order(genotype: Genotype, cell_name: str, node: int) -> list:
    """The edges into ``node`` in the order ``provenance.darts_order`` recorded when the genotype
    was read from DARTS, or by input where it recorded none, or where the cell no longer has
    exactly those inputs (edited since)."""
    incoming = genotype.cell(cell_name).incoming(node)
    recorded = getattr(genotype.provenance, DARTS_ORDER_KEY, None) if genotype.provenance else None
    orders = recorded.get(cell_name) if isinstance(recorded, dict) else None
    index = node - NUM_INPUTS
    if not isinstance(orders, list) or len(orders) != genotype.nodes or not isinstance(orders[index], list):
        return incoming
    sources = orders[index]
    if sorted(map(repr, sources)) != sorted(repr(edge.source) for edge in incoming):
        return incoming
    return sorted(incoming, key=lambda edge: sources.index(edge.source))


# ----------------------------------------------------------------------------- one-line form

def to_oneline(genotype: Genotype) -> str:
    """``scnas-v1;CELL=NODE+NODE+...@CONCAT;...`` with NODE = ``|op~input|op~input|`` (``||``: no input)."""
    cells = []
    for name in CELL_TYPES:
        cell = genotype.cell(name)
        groups = ["|" + "|".join(f"{e.op}~{e.source}" for e in cell.incoming(node)) + "|"
                  for node in genotype.intermediate_nodes]
        cells.append(f"{name}={'+'.join(groups)}@{','.join(str(n) for n in sorted(cell.concat))}")
    return ";".join([ONELINE_PREFIX, *cells])


def _oneline_int(text: str, what: str, source: str | None) -> int:
    if not text.isdigit():
        raise GenotypeError(f"one-line genotype: {what}: {text!r} is not a node number", source=source)
    return int(text)


def from_oneline(text: str, *, source: str | None = None) -> Genotype:
    """Parse the one-line form written by :func:`to_oneline`.

    Args:
        text: the one-line form.
        source: the file it came from, for error messages.
    """
    parts = text.strip().split(";")
    if parts[0] != ONELINE_PREFIX:
        raise GenotypeError(f"one-line genotype must start with {ONELINE_PREFIX!r}", source=source)
    cells: dict[str, Any] = {}
    node_counts = set()
    for part in parts[1:]:
        name, sep, body = part.partition("=")
        if not sep or name not in CELL_TYPES:
            raise GenotypeError(f"one-line genotype: {part[:40]!r} is not CELL=... with CELL one of {', '.join(CELL_TYPES)}",
                                source=source)
        if name in cells:
            raise GenotypeError(f"one-line genotype: cell {name} given twice", source=source)
        groups, sep, concat = body.partition("@")
        if not sep:
            raise GenotypeError(f"one-line genotype: cell {name} lacks '@CONCAT' (e.g. @2,3,4,5)", source=source)
        edges = []
        for index, group in enumerate(groups.split("+")):
            if len(group) < 2 or group[0] != "|" or group[-1] != "|":
                raise GenotypeError(f"one-line genotype: cell {name}, node {NUM_INPUTS + index}: {group!r} must look like "
                                    "|op~input|op~input| (or || for none)", source=source)
            for item in filter(None, group[1:-1].split("|")):
                op, sep, src = item.partition("~")
                if not sep:
                    raise GenotypeError(f"one-line genotype: cell {name}, node {NUM_INPUTS + index}: {item!r} is not "
                                        "op~input", source=source)
                edges.append({"from": _oneline_int(src, f"cell {name}", source), "to": NUM_INPUTS + index, "op": op})
        node_counts.add(len(groups.split("+")))
        cells[name] = {"edges": edges,
                       "concat": [_oneline_int(c, f"cell {name} concat", source) for c in concat.split(",")]}
    missing = [name for name in CELL_TYPES if name not in cells]
    if missing:
        raise GenotypeError(f"one-line genotype lacks cell(s) {', '.join(missing)}", source=source)
    if len(node_counts) != 1:
        raise GenotypeError(f"one-line genotype: cells have different node counts {sorted(node_counts)}", source=source)
    data = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "nodes": node_counts.pop(), "ops": list(PAPER_OPS),
            "cells": {name: cells[name] for name in CELL_TYPES}}
    return genotype_from_data(data, source)
