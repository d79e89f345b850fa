"""The genotype document (format version 1) as pydantic models, with its semantic rules.

A genotype says, for each of the four cell types of the U-Net, which operation sits on
which edge of the cell's DAG. Node numbering: 0 is the cell input c_{k-2}, 1 is c_{k-1},
2 .. nodes+1 are the intermediate nodes; an edge goes from a lower to a higher node and
ends at an intermediate node. Structural rules live in the field types (and so in the
JSON Schema); the rules that need the whole document live in :func:`semantic_problems`.
"""

from __future__ import annotations

from typing import Any, Literal

import networkx as nx
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, model_validator

from scnas.errors import GenotypeError, Problem
from scnas.genotype.ops import OPS, PAPER_OPS, ZERO, known_ops_text

FORMAT_NAME = "scnas-genotype"
FORMAT_VERSION = 1
NUM_INPUTS = 2
CELL_TYPES: tuple[str, ...] = ("encoder_normal", "reduction", "decoder_normal", "expansion")
MAX_NODES = 64
"""Upper bound on ``nodes`` (16 times the paper's 4). The complete DAG of 64 nodes (2,144 edges
per cell) is the largest genotype of this size; scnas writes it in 0.87 MB of JSON and 60,000
YAML nodes, inside the reading bounds (1 MiB, 100,000 YAML nodes), so every genotype the bound
allows can be written and read back. At 128 neither would fit. The bound is a field constraint,
checked before any rule whose cost could grow with ``nodes``."""
CellName = Literal["encoder_normal", "reduction", "decoder_normal", "expansion"]

_EDGE_OPS_SCHEMA = {"enum": [name for name in OPS if name != ZERO]}


class _Model(BaseModel):
    # strict: "2" is not a node index and 1.0 is not a count, as the JSON Schema says too.
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class Edge(_Model):
    """One operation on the edge from node ``source`` to node ``target``."""

    source: StrictInt = Field(alias="from", ge=0, description="node the edge leaves: 0 = c_{k-2}, 1 = c_{k-1}, 2.. = intermediate")
    target: StrictInt = Field(alias="to", ge=0, description="intermediate node the edge enters (2 .. nodes+1), greater than 'from'")
    op: StrictStr = Field(description="operation name from the document's 'ops' (never 'zero': a missing edge is no connection)",
                          json_schema_extra=_EDGE_OPS_SCHEMA)


class Cell(_Model):
    """A cell's DAG: its edges and the intermediate nodes concatenated into its output."""

    edges: list[Edge] = Field(description="edges in any order; the canonical order sorts by (to, from)")
    concat: list[StrictInt] = Field(min_length=1, description="intermediate nodes whose outputs are concatenated, as a set (built in ascending order)")

    def incoming(self, node: int) -> list[Edge]:
        """Edges entering ``node``, ordered by source."""
        return sorted((e for e in self.edges if e.target == node), key=lambda e: e.source)

    def live_nodes(self) -> set[int]:
        """Nodes whose value reaches the output (the concat nodes and their ancestors, inputs
        included). Other nodes are dead: valid, but a builder need not compute them."""
        graph = nx.DiGraph()
        graph.add_edges_from((e.source, e.target) for e in self.edges)
        graph.add_nodes_from(self.concat)
        live = set(self.concat)
        for node in self.concat:
            live |= nx.ancestors(graph, node)
        return live


class Cells(_Model):
    """The four cell types of the paper; all cells of one type share one structure."""

    encoder_normal: Cell
    reduction: Cell
    decoder_normal: Cell
    expansion: Cell


class EdgeProbabilities(_Model):
    """softmax(alpha) over the vocabulary for one candidate edge of the search supernet."""

    source: StrictInt = Field(alias="from", ge=0)
    target: StrictInt = Field(alias="to", ge=0)
    p: dict[StrictStr, StrictFloat | StrictInt] = Field(description="operation name -> probability (sums to 1)")


class Provenance(BaseModel):
    """How the genotype was found. Optional, excluded from the hash; other tools may add fields."""

    model_config = ConfigDict(extra="allow", strict=True)

    scnas_version: StrictStr | None = None
    created: StrictStr | None = Field(None, description="ISO 8601 date-time")
    search: dict[str, Any] | None = Field(None, description="search settings (dataset, fold, seed, epochs, temperature, sampling, ...)")
    epoch: StrictInt | None = Field(None, ge=0, description="search epoch the genotype was derived at")
    probabilities: dict[CellName, list[EdgeProbabilities]] | None = None


class Genotype(_Model):
    """A complete scnas genotype, format version 1."""

    model_config = ConfigDict(title="scnas genotype (format version 1)")

    format: Literal["scnas-genotype"] = Field(description="always 'scnas-genotype'")
    version: Literal[1] = Field(description="format version; readers migrate older versions and refuse newer ones")
    nodes: StrictInt = Field(4, ge=1, le=MAX_NODES, description=f"intermediate nodes per cell (1 .. {MAX_NODES})")
    ops: list[StrictStr] = Field(default_factory=lambda: list(PAPER_OPS), min_length=1,
                                 description="the search space's operation vocabulary",
                                 json_schema_extra={"items": {"type": "string", "enum": list(OPS)}, "uniqueItems": True})
    cells: Cells
    provenance: Provenance | None = None

    @model_validator(mode="after")
    def _semantics(self) -> "Genotype":
        problems = semantic_problems(self)
        if problems:
            # Not a ValueError on purpose: pydantic must not fold these into one message.
            raise GenotypeError(problems=problems)
        return self

    @property
    def intermediate_nodes(self) -> range:
        return range(NUM_INPUTS, NUM_INPUTS + self.nodes)

    def cell(self, name: str) -> Cell:
        if name not in CELL_TYPES:
            raise GenotypeError(f"unknown cell type {name!r}; the cell types are {', '.join(CELL_TYPES)}")
        return getattr(self.cells, name)

    def to_dict(self) -> dict[str, Any]:
        """The document as plain data, with JSON names (``from``/``to``) and no empty fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def _edge_problems(cell: Cell, path: str, last: int, vocabulary: set[str]) -> list[Problem]:
    problems: list[Problem] = []
    seen: dict[tuple[int, int], int] = {}
    for i, edge in enumerate(cell.edges):
        at = f"{path}.edges[{i}]"
        if edge.op == ZERO:
            problems.append(Problem(f"{at}.op", "an edge with op 'zero' means no connection: delete the edge instead"))
        elif edge.op not in OPS:
            problems.append(Problem(f"{at}.op", f"unknown op {edge.op!r}; known ops: {known_ops_text()}"))
        elif edge.op not in vocabulary:
            problems.append(Problem(f"{at}.op", f"op {edge.op!r} is not in this document's vocabulary "
                                                f"(ops: {', '.join(sorted(vocabulary))}); add it to 'ops' or change the edge"))
        if edge.target < NUM_INPUTS:
            problems.append(Problem(f"{at}.to", f"edge into input node {edge.target}: nodes 0 and 1 are the cell inputs; "
                                                f"edges end at an intermediate node 2..{last}"))
        elif edge.target > last:
            problems.append(Problem(f"{at}.to", f"node {edge.target} is out of range: intermediate nodes are 2..{last}"))
        if edge.source > last:
            problems.append(Problem(f"{at}.from", f"node {edge.source} is out of range: nodes are 0..{last}"))
        if edge.source == edge.target:
            problems.append(Problem(at, f"edge from node {edge.source} to itself"))
        elif edge.source > edge.target:
            problems.append(Problem(at, f"edge goes backwards ({edge.source} -> {edge.target}): "
                                        "edges go from a lower to a higher node"))
        key = (edge.source, edge.target)
        if key in seen:
            problems.append(Problem(at, f"duplicate edge {edge.source} -> {edge.target} (also edges[{seen[key]}]); "
                                        "a pair of nodes has at most one operation"))
        else:
            seen[key] = i
    return problems


def _concat_problems(cell: Cell, path: str, last: int) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[int] = set()
    for i, node in enumerate(cell.concat):
        if not NUM_INPUTS <= node <= last:
            problems.append(Problem(f"{path}.concat[{i}]", f"concat names node {node}, which does not exist: "
                                                          f"intermediate nodes are 2..{last}"))
        elif node in seen:
            problems.append(Problem(f"{path}.concat[{i}]", f"node {node} is listed twice"))
        seen.add(node)
    return problems


def _graph_problems(cell: Cell, path: str, last: int) -> list[Problem]:
    """Intermediate nodes that something uses but that receive nothing.

    Every in-range edge counts as an input here, even one reported as wrong above, so a
    single bad edge gives one problem rather than a cascade. The work is proportional to the
    edges and concat entries written, never to ``nodes``."""
    fed = {e.target for e in cell.edges if e.source <= last and e.target <= last}
    uses: dict[int, list[str]] = {}
    for i, node in enumerate(cell.concat):
        uses.setdefault(node, []).append(f"concat[{i}]")
    for i, edge in enumerate(cell.edges):
        uses.setdefault(edge.source, []).append(f"edges[{i}]")
    problems: list[Problem] = []
    for node in sorted(uses):
        if NUM_INPUTS <= node <= last and node not in fed:
            problems.append(Problem(f"{path}.{uses[node][0]}", f"node {node} has no incoming edge but is used "
                                                               f"(by {', '.join(uses[node])}); give it an input or stop using it"))
    return problems


def _probability_problems(provenance: Provenance, last: int, vocabulary: set[str]) -> list[Problem]:
    problems: list[Problem] = []
    for cell_name, entries in (provenance.probabilities or {}).items():
        for i, entry in enumerate(entries):
            at = f"provenance.probabilities.{cell_name}[{i}]"
            if not (entry.source < entry.target <= last and entry.target >= NUM_INPUTS):
                problems.append(Problem(at, f"{entry.source} -> {entry.target} is not an edge of a cell with nodes 2..{last}"))
            for op, p in entry.p.items():
                if op not in vocabulary:
                    problems.append(Problem(f"{at}.p.{op}", f"op {op!r} is not in this document's vocabulary"))
                if not 0.0 <= p <= 1.0:
                    problems.append(Problem(f"{at}.p.{op}", f"probability {p} is outside [0, 1]"))
            total = sum(entry.p.values())
            if entry.p and abs(total - 1.0) > 1e-3:
                problems.append(Problem(f"{at}.p", f"probabilities sum to {total:.6g}, not 1"))
    return problems


def semantic_problems(genotype: Genotype) -> list[Problem]:
    """Every rule the field types cannot express, as a list of problems (empty: valid)."""
    problems: list[Problem] = []
    vocabulary: set[str] = set()
    for i, op in enumerate(genotype.ops):
        if op not in OPS:
            problems.append(Problem(f"ops[{i}]", f"unknown op {op!r}; known ops: {known_ops_text()}"))
        elif op in vocabulary:
            problems.append(Problem(f"ops[{i}]", f"op {op!r} is listed twice"))
        vocabulary.add(op)
    last = NUM_INPUTS + genotype.nodes - 1
    for name in CELL_TYPES:
        cell = getattr(genotype.cells, name)
        path = f"cells.{name}"
        problems += _edge_problems(cell, path, last, vocabulary)
        problems += _concat_problems(cell, path, last)
        problems += _graph_problems(cell, path, last)
    if genotype.provenance is not None:
        problems += _probability_problems(genotype.provenance, last, vocabulary)
    return problems
