"""Property-based tests: round trips through every form keep the hash; corruptions only
ever raise GenotypeError."""

from __future__ import annotations

import copy

from hypothesis import HealthCheck, given, settings, strategies as st

from scnas.errors import GenotypeError
from scnas.genotype import (CELL_TYPES, PAPER_OPS, diff, dumps_genotype, genotype_from_data, genotype_hash,
                            parse_genotype)
from scnas.genotype.convert import parse_cell_map, to_darts

EDGE_OPS = [op for op in PAPER_OPS if op != "zero"]


@st.composite
def genotype_docs(draw, two_inputs: bool = False) -> dict:
    """Valid documents: every used node has an input; edges in random order."""
    nodes = draw(st.integers(1, 6))
    cells = {}
    for name in CELL_TYPES:
        edges, fed = [], set()
        for target in range(2, 2 + nodes):
            candidates = [0, 1] + [n for n in range(2, target) if n in fed]
            if two_inputs:
                sources = draw(st.lists(st.sampled_from(candidates), min_size=2, max_size=2, unique=True))
            else:
                sources = draw(st.lists(st.sampled_from(candidates), min_size=int(target == 2), max_size=3, unique=True))
            for source in sources:
                edges.append({"from": source, "to": target, "op": draw(st.sampled_from(EDGE_OPS))})
            if sources:
                fed.add(target)
        edges = draw(st.permutations(edges))
        concat = draw(st.lists(st.sampled_from(sorted(fed)), min_size=1, unique=True))
        cells[name] = {"edges": list(edges), "concat": concat}
    return {"format": "scnas-genotype", "version": 1, "nodes": nodes, "ops": list(PAPER_OPS), "cells": cells}


@settings(max_examples=60, deadline=None)
@given(genotype_docs())
def test_json_yaml_oneline_round_trip_keeps_the_hash(doc):
    genotype = genotype_from_data(doc)
    expected = genotype_hash(genotype)
    via_json = parse_genotype(dumps_genotype(genotype, "json"), "json")
    via_yaml = parse_genotype(dumps_genotype(via_json, "yaml"), "yaml")
    via_oneline = parse_genotype(dumps_genotype(via_yaml, "oneline"), "oneline")
    assert genotype_hash(via_json) == genotype_hash(via_yaml) == genotype_hash(via_oneline) == expected
    assert not diff(genotype, via_oneline)


@settings(max_examples=40, deadline=None)
@given(genotype_docs(two_inputs=True))
def test_darts_round_trip_keeps_the_exported_cells(doc):
    genotype = genotype_from_data(doc)
    cells = parse_cell_map("normal=encoder_normal;reduce=reduction")
    # Ops without a DARTS name are written as chosen ones; the written file says what they stand for.
    chosen = {"conv_3x3x3": "sep_conv_3x3", "sep_dil3_conv_3x3x3": "dil_conv_5x5", "sep_dil4_conv_3x3x3": "sep_conv_5x5"}
    back = parse_genotype(to_darts(genotype, cells=cells, darts_names=chosen), "darts")
    # DARTS has two cells: reading back repeats encoder_normal/reduction into the decoder cells.
    expected = {**doc, "cells": {"encoder_normal": doc["cells"]["encoder_normal"], "reduction": doc["cells"]["reduction"],
                                 "decoder_normal": doc["cells"]["encoder_normal"], "expansion": doc["cells"]["reduction"]}}
    assert genotype_hash(back) == genotype_hash(genotype_from_data(expected))


_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-5, 99), st.floats(allow_nan=True), st.text(max_size=12),
                  st.lists(st.integers(0, 9), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, prefix + (index,))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(genotype_docs(), st.data())
def test_corrupted_documents_raise_only_genotype_errors(doc, data):
    corrupted = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(corrupted) if p]
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = corrupted
        for part in path[:-1]:
            parent = parent[part]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(_JUNK)
    try:
        genotype_from_data(corrupted)
    except GenotypeError as exc:
        assert exc.problems and all(p.message for p in exc.problems)


@settings(max_examples=150, deadline=None)
@given(genotype_docs(), st.data(), st.sampled_from(["json", "yaml", "oneline"]))
def test_corrupted_text_raises_only_genotype_errors(doc, data, fmt):
    before = copy.deepcopy(doc)
    text = dumps_genotype(genotype_from_data(doc), fmt)
    position = data.draw(st.integers(0, max(0, len(text) - 1)))
    replacement = data.draw(st.text(min_size=0, max_size=4))
    corrupted = text[:position] + replacement + text[position + data.draw(st.integers(0, 5)):]
    try:
        parse_genotype(corrupted, fmt, source="x")
    except GenotypeError:
        pass
    assert doc == before  # reading, writing and parsing left the original document untouched
