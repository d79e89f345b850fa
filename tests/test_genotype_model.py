"""Semantic rules of the genotype document, built-ins and the random generator."""

from __future__ import annotations

import pytest

from scnas.errors import GenotypeError
from scnas.genotype import (BUILTIN_NAMES, CELL_TYPES, OPS, PAPER_OPS, builtin_genotype, genotype_from_data,
                            MAX_NODES, genotype_hash, random_genotype)


def _problems(doc: dict) -> list[tuple[str, str]]:
    with pytest.raises(GenotypeError) as info:
        genotype_from_data(doc, source="doc.yaml")
    return [(p.path, p.message) for p in info.value.problems]


def test_paper_vocabulary_has_the_eight_operations_of_section_3():
    assert len(PAPER_OPS) == 8
    families = [OPS[name].family for name in PAPER_OPS]
    assert families.count("conv") == 4 and families.count("pool") == 2
    assert {OPS[name].dilation for name in PAPER_OPS if OPS[name].separable} == {2, 3, 4}


def test_valid_document_parses_and_exposes_cells(small_doc):
    genotype = genotype_from_data(small_doc)
    assert genotype.nodes == 2 and list(genotype.intermediate_nodes) == [2, 3]
    assert [e.source for e in genotype.cell("reduction").incoming(2)] == [0, 1]


def test_every_problem_is_reported_with_its_path(small_doc):
    small_doc["cells"]["reduction"]["edges"][1]["op"] = "conv_5x5x5"
    small_doc["cells"]["expansion"]["concat"] = [2, 9]
    problems = _problems(small_doc)
    assert problems[0][0] == "cells.reduction.edges[1].op" and "known ops: zero, identity" in problems[0][1]
    assert problems[1][0] == "cells.expansion.concat[1]"


def test_error_message_names_file_and_field(small_doc):
    small_doc["cells"]["decoder_normal"]["edges"][2]["to"] = 1
    with pytest.raises(GenotypeError) as info:
        genotype_from_data(small_doc, source="cells.yaml")
    assert str(info.value).startswith("cells.yaml: cells.decoder_normal.edges[2].to: edge into input node 1")


@pytest.mark.parametrize("edge, path_end, words", [
    ({"from": 2, "to": 2, "op": "identity"}, "edges[2]", "to itself"),
    ({"from": 3, "to": 2, "op": "identity"}, "edges[2]", "backwards"),
    ({"from": 2, "to": 4, "op": "identity"}, "edges[2].to", "out of range"),
    ({"from": 0, "to": 2, "op": "identity"}, "edges[2]", "duplicate edge"),
    ({"from": 2, "to": 3, "op": "zero"}, "edges[2].op", "delete the edge"),
])
def test_bad_edges_are_rejected(small_doc, edge, path_end, words):
    small_doc["cells"]["encoder_normal"]["edges"][2] = edge
    path, message = _problems(small_doc)[0]
    assert path == f"cells.encoder_normal.{path_end}" and words in message


def test_op_outside_declared_vocabulary_is_rejected(small_doc):
    small_doc["ops"] = ["conv_3x3x3", "identity"]
    path, message = _problems(small_doc)[0]
    assert path == "cells.encoder_normal.edges[2].op" and "not in this document's vocabulary" in message


def test_used_node_without_input_is_rejected_but_unused_one_is_not(small_doc):
    cell = small_doc["cells"]["reduction"]
    cell["edges"] = [cell["edges"][0]]           # node 3 loses its only input...
    path, message = _problems(small_doc)[0]      # ...and concat still uses it
    assert path == "cells.reduction.concat[1]" and "no incoming edge" in message
    cell["concat"] = [2]                         # nothing uses node 3 any more: valid
    assert genotype_from_data(small_doc).cell("reduction").concat == [2]


def test_live_nodes_exclude_dead_ones(small_doc):
    small_doc["cells"]["reduction"]["concat"] = [2]
    cell = genotype_from_data(small_doc).cell("reduction")
    assert cell.live_nodes() == {0, 1, 2}


def test_strict_types_do_not_coerce(small_doc):
    small_doc["nodes"] = 2.0
    assert _problems(small_doc)[0][0] == "nodes"


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtins_are_valid_and_cover_all_cells(name):
    genotype = builtin_genotype(name)
    assert all(genotype.cell(cell).edges for cell in CELL_TYPES)


def test_random_genotype_is_deterministic_and_seed_dependent():
    a, b, c = random_genotype(7), random_genotype(7), random_genotype(8)
    assert genotype_hash(a) == genotype_hash(b) != genotype_hash(c)


@pytest.mark.parametrize("nodes", [1, 2, 3, 6])
def test_random_genotype_shape(nodes):
    genotype = random_genotype(0, nodes=nodes, ops=["identity", "conv_3x3x3"], inputs_per_node=2)
    for name in CELL_TYPES:
        cell = genotype.cell(name)
        assert sorted(cell.concat) == list(genotype.intermediate_nodes)
        assert all(len(cell.incoming(n)) == 2 for n in genotype.intermediate_nodes)
        assert {e.op for e in cell.edges} <= {"identity", "conv_3x3x3"}


def test_random_genotype_needs_a_non_zero_op():
    with pytest.raises(GenotypeError, match="no operation besides 'zero'"):
        random_genotype(0, ops=["zero"])


@pytest.mark.parametrize("nodes", [MAX_NODES + 1, 10**9, 10**18])
def test_node_count_above_the_bound_is_refused_in_constant_time_and_memory(small_doc, nodes):
    import time
    import tracemalloc

    small_doc["nodes"] = nodes
    tracemalloc.start()
    start = time.perf_counter()
    problems = _problems(small_doc)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [path for path, _ in problems] == ["nodes"] and str(MAX_NODES) in problems[0][1]
    assert elapsed < 0.5 and peak < 5 * 2**20, (elapsed, peak)


def test_semantic_rules_cost_follows_the_edges_written_not_nodes(small_doc):
    """Defence in depth behind the bound: the whole-document rules never visit every node id."""
    import time

    from scnas.genotype.model import semantic_problems

    unbounded = genotype_from_data(small_doc).model_copy(update={"nodes": 10**6})  # skips the field check
    start = time.perf_counter()
    assert semantic_problems(unbounded) == []
    assert time.perf_counter() - start < 0.1


def test_the_largest_genotype_the_bound_allows_fits_the_reading_bounds():
    """The argument for MAX_NODES: the complete DAG at the bound is written and read back."""
    import json

    from scnas.genotype import dumps_genotype, parse_genotype
    from scnas.genotype.io import MAX_BYTES, MAX_YAML_NODES

    cell = {"edges": [{"from": s, "to": t, "op": "sep_dil2_conv_3x3x3"} for t in range(2, MAX_NODES + 2) for s in range(t)],
            "concat": list(range(2, MAX_NODES + 2))}
    doc = {"format": "scnas-genotype", "version": 1, "nodes": MAX_NODES, "cells": {name: cell for name in CELL_TYPES}}
    text = dumps_genotype(genotype_from_data(doc), "json")
    assert len(text.encode()) < MAX_BYTES
    assert 4 * 7 * len(cell["edges"]) < MAX_YAML_NODES  # edge mappings: 3 keys + 3 values + the mapping
    assert genotype_hash(parse_genotype(text, "json")) == genotype_hash(genotype_from_data(doc))
    doc["nodes"] = MAX_NODES + 1
    assert json.dumps(doc)  # one more node is refused, however it is written
    with pytest.raises(GenotypeError):
        genotype_from_data(doc)


def test_validate_command_refuses_a_huge_node_count_with_one_line(cli, tmp_path, small_doc):
    import yaml

    small_doc["nodes"] = 10**9
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(small_doc, sort_keys=False))
    result = cli("validate", path)
    assert result.code == 1 and result.out.strip().splitlines() == [
        f"{path}: nodes: Input should be less than or equal to {MAX_NODES} (got 1000000000): a genotype has at most "
        f"{MAX_NODES} intermediate nodes (docs/genotype-format.md, rule S7)"]
