"""DARTS strings and the one-line form: parsing as data, mappings, and what cannot be expressed."""

from __future__ import annotations

import pytest

from scnas.errors import GenotypeError
from scnas.genotype import genotype_hash, parse_genotype, random_genotype
from scnas.genotype.convert import (DARTS_OPS_KEY, PROVENANCE_COMMENT, from_darts, from_oneline, parse_cell_map,
                                    parse_darts_names, parse_op_map, to_darts, to_oneline)

DARTS_V2 = ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
            "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], "
            "normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), "
            "('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), "
            "('max_pool_3x3', 1)], reduce_concat=range(2, 6))")


def test_darts_v2_reads_with_an_op_mapping():
    genotype = from_darts(DARTS_V2, op_map={"sep_conv_3x3": "conv_3x3x3"})
    assert genotype.nodes == 4
    normal = genotype.cell("encoder_normal")
    assert [(e.source, e.op) for e in normal.incoming(5)] == [(0, "identity"), (2, "sep_dil2_conv_3x3x3")]
    assert genotype.cell("decoder_normal") == normal and genotype.cell("expansion") == genotype.cell("reduction")
    assert sorted(genotype.cell("reduction").concat) == [2, 3, 4, 5]  # from range(2, 6)


def test_darts_op_without_equivalent_names_the_fix():
    with pytest.raises(GenotypeError, match=r"op 'sep_conv_3x3' has no scnas equivalent; give a mapping such as "
                                            r"--op-map sep_conv_3x3="):
        from_darts(DARTS_V2)


def test_darts_none_edges_are_dropped():
    text = ("Genotype(normal=[('none', 0), ('skip_connect', 1)], normal_concat=[2], "
            "reduce=[('max_pool_3x3', 0), ('skip_connect', 1)], reduce_concat=[2])")
    genotype = from_darts(text)
    assert [(e.source, e.op) for e in genotype.cell("encoder_normal").edges] == [(1, "identity")]


def test_darts_cell_map_and_positional_fields():
    text = ("genotype = Genotype([('skip_connect', 0), ('skip_connect', 1)], [2], "
            "[('max_pool_3x3', 0), ('max_pool_3x3', 1)], [2])")
    cells = parse_cell_map("normal=encoder_normal,decoder_normal,expansion;reduce=reduction")
    genotype = from_darts(text, cells=cells)
    assert genotype.cell("expansion").edges[0].op == "identity"


@pytest.mark.parametrize("text, words", [
    ("__import__('os').system('echo pwned')", "expected one Genotype"),
    ("Genotype(normal=[('skip_connect', 0)], normal_concat=[2], reduce=[], reduce_concat=[2])", "two (op, input) pairs"),
    ("Genotype(normal=[('a', 0), ('b', 0)], normal_concat=[2], reduce=[('a', 0), ('b', 1)], reduce_concat=[2], x=1)",
     "unknown DARTS Genotype field 'x'"),
    ("Genotype(normal=[('skip_connect', 0), ('max_pool_3x3', 0)], normal_concat=[2], "
     "reduce=[('skip_connect', 0), ('skip_connect', 1)], reduce_concat=[2])", "takes input 0 twice"),
    ("Genotype(normal=[(op, 0)], normal_concat=[2], reduce=[], reduce_concat=[2])", "must be a pair"),
    ("Genotype(normal=[", "not a DARTS Genotype(...) string"),
    ("Genotype(normal=[('skip_connect', 0), ('skip_connect', 1)], normal_concat=sorted([2]), "
     "reduce=[('skip_connect', 0), ('skip_connect', 1)], reduce_concat=[2])", "list of integers or range"),
])
def test_bad_darts_strings(text, words):
    with pytest.raises(GenotypeError, match=words.replace("(", r"\(").replace(")", r"\)")):
        from_darts(text, source="g.darts")


def test_darts_export_refuses_what_it_cannot_express(uresnet):
    with pytest.raises(GenotypeError, match="node 2 of encoder_normal has 1 incoming edge"):
        to_darts(uresnet)
    with pytest.raises(GenotypeError, match="encoder_normal and decoder_normal differ"):
        to_darts(random_genotype(1))


_CHOSEN = {"conv_3x3x3": "sep_conv_3x3", "sep_dil3_conv_3x3x3": "dil_conv_5x5", "sep_dil4_conv_3x3x3": "sep_conv_5x5"}


def test_darts_round_trip_of_two_cells_is_lossless_for_those_cells():
    genotype = random_genotype(4)
    cells = parse_cell_map("normal=encoder_normal;reduce=reduction")
    back = from_darts(to_darts(genotype, cells=cells, darts_names=_CHOSEN))  # the names written travel in the comment
    assert back.cell("encoder_normal") == genotype.cell("encoder_normal")
    assert back.cell("reduction") == genotype.cell("reduction")


def test_darts_export_with_foreign_op_names_reads_back():
    genotype = from_darts(DARTS_V2, op_map={"sep_conv_3x3": "conv_3x3x3"})
    text = to_darts(genotype, op_map={"sep_conv_3x3": "conv_3x3x3", "skip_connect": "identity",
                                      "max_pool_3x3": "max_pool_3x3x3", "dil_conv_3x3": "sep_dil2_conv_3x3x3"})
    assert "'sep_conv_3x3'" in text and "'skip_connect'" in text
    assert genotype_hash(from_darts(text, op_map={"sep_conv_3x3": "conv_3x3x3"})) == genotype_hash(genotype)


def _ast_names(text: str) -> set[str]:
    import ast

    call = ast.parse(text).body[0].value
    return {pair.elts[0].value for kw in call.keywords if kw.arg in ("normal", "reduce") for pair in kw.value.elts}


def test_darts_export_writes_darts_names_that_darts_primitives_hold():
    """DARTS's PRIMITIVES (cnn/genotypes.py); scnas names would not load in DARTS code."""
    primitives = {"none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
                  "dil_conv_3x3", "dil_conv_5x5"}
    genotype = random_genotype(4, ops=["identity", "max_pool_3x3x3", "avg_pool_3x3x3", "sep_dil2_conv_3x3x3"])
    cells = parse_cell_map("normal=encoder_normal;reduce=reduction")
    text = to_darts(genotype, cells=cells)
    assert _ast_names(text) <= primitives and _ast_names(text)
    assert to_darts(genotype, cells=cells, darts_names=_CHOSEN).splitlines()[0] == text.splitlines()[0]


def test_darts_export_of_an_op_without_darts_name_says_how_to_choose():
    genotype = random_genotype(4, ops=["conv_3x3x3"])
    cells = parse_cell_map("normal=encoder_normal;reduce=reduction")
    with pytest.raises(GenotypeError, match=r"conv_3x3x3 \(in encoder_normal, node 2\) has no DARTS counterpart.*"
                                            r"--darts-op conv_3x3x3=NAME"):
        to_darts(genotype, cells=cells)
    kept = to_darts(genotype, cells=cells, darts_names=parse_darts_names("conv_3x3x3=conv_3x3x3"))
    assert _ast_names(kept) == {"conv_3x3x3"}


def test_many_to_one_op_map_is_refused_on_export_unless_chosen():
    genotype = from_darts(DARTS_V2, op_map={"sep_conv_3x3": "conv_3x3x3"})
    many = {"sep_conv_3x3": "conv_3x3x3", "sep_conv_5x5": "conv_3x3x3"}
    with pytest.raises(GenotypeError, match=r"--op-map maps sep_conv_3x3 and sep_conv_5x5 all to conv_3x3x3.*"
                                            r"--darts-op conv_3x3x3="):
        to_darts(genotype, op_map=many)
    text = to_darts(genotype, op_map=many, darts_names={"conv_3x3x3": "sep_conv_5x5"})
    assert "'sep_conv_5x5'" in text and "'sep_conv_3x3'" not in text
    assert from_darts(DARTS_V2, op_map=many).cell("encoder_normal").edges  # reading many-to-one is fine


def test_darts_conversion_keeps_provenance_both_ways():
    genotype = from_darts(DARTS_V2, op_map={"sep_conv_3x3": "conv_3x3x3"}, source="v2.darts")
    assert getattr(genotype.provenance, DARTS_OPS_KEY) == {"dil_conv_3x3": "sep_dil2_conv_3x3x3",
                                                          "max_pool_3x3": "max_pool_3x3x3",
                                                          "sep_conv_3x3": "conv_3x3x3", "skip_connect": "identity"}
    described = genotype.model_copy(update={"provenance": genotype.provenance.model_copy(
        update={"epoch": 49, "scnas_version": "0.1.0"})})
    text = to_darts(described)  # no --op-map: the names it was read with come back
    assert _ast_names(text.splitlines()[0]) == _ast_names(DARTS_V2)  # pairs come sorted by input, names as read
    assert text.splitlines()[1].startswith(PROVENANCE_COMMENT)
    back = from_darts(text)  # nor here: the comment says what sep_conv_3x3 stands for
    assert genotype_hash(back) == genotype_hash(genotype)
    assert (back.provenance.epoch, back.provenance.scnas_version) == (49, "0.1.0")
    with pytest.raises(GenotypeError, match="comment is not one line of JSON"):
        from_darts(DARTS_V2 + "\n" + PROVENANCE_COMMENT + "{oops", op_map={"sep_conv_3x3": "conv_3x3x3"})


def test_op_and_cell_map_syntax_errors():
    with pytest.raises(GenotypeError, match="is not a scnas op"):
        parse_op_map("sep_conv_3x3=conv_5x5")
    with pytest.raises(GenotypeError, match="is not NAME=SCNAS_OP"):
        parse_op_map("sep_conv_3x3")
    with pytest.raises(GenotypeError, match="'middle' is not a cell type"):
        parse_cell_map("normal=middle")
    with pytest.raises(GenotypeError, match="'zero' is not a scnas edge op"):
        parse_darts_names("zero=none")
    with pytest.raises(GenotypeError, match="conv_3x3x3 is already written as 'a'"):
        parse_darts_names("conv_3x3x3=a,conv_3x3x3=b")


def test_oneline_round_trip_and_shape(uresnet):
    text = to_oneline(uresnet)
    assert text.startswith("scnas-v1;encoder_normal=|conv_3x3x3~1|+|identity~1|conv_3x3x3~2|+")
    assert genotype_hash(from_oneline(text)) == genotype_hash(uresnet)
    assert genotype_hash(parse_genotype(text, "oneline")) == genotype_hash(uresnet)


def test_oneline_node_without_input():
    text = ("scnas-v1;encoder_normal=|identity~1|+||@2;reduction=|identity~1|+||@2;"
            "decoder_normal=|identity~1|+||@2;expansion=|identity~1|+|identity~0|@2,3")
    genotype = from_oneline(text)
    assert genotype.nodes == 2 and genotype.cell("encoder_normal").incoming(3) == []
    assert to_oneline(genotype) == text


@pytest.mark.parametrize("text, words", [
    ("nasbench;encoder_normal=|identity~1|@2", "must start with 'scnas-v1'"),
    ("scnas-v1;encoder_normal=|identity~1|@2", "lacks cell(s) reduction"),
    ("scnas-v1;middle=|identity~1|@2", "is not CELL=..."),
    ("scnas-v1;encoder_normal=|identity-1|@2", "is not op~input"),
    ("scnas-v1;encoder_normal=|identity~x|@2", "'x' is not a node number"),
    ("scnas-v1;encoder_normal=identity~1@2", "must look like |op~input|"),
    ("scnas-v1;encoder_normal=|identity~1|", "lacks '@CONCAT'"),
])
def test_bad_oneline_strings(text, words):
    with pytest.raises(GenotypeError, match=words.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        from_oneline(text)


def test_convert_command_refuses_many_to_one_map_and_takes_darts_op(cli, tmp_path):
    src = tmp_path / "v2.darts"
    src.write_text(DARTS_V2 + "\n")
    many = "sep_conv_3x3=conv_3x3x3,sep_conv_5x5=conv_3x3x3"
    refused = cli("convert", src, tmp_path / "out.darts", "--op-map", many)
    assert refused.code == 1 and "--darts-op conv_3x3x3=" in refused.err and refused.err.count("\n") == 1
    assert not (tmp_path / "out.darts").exists()
    done = cli("convert", src, tmp_path / "out.darts", "--op-map", many, "--darts-op", "conv_3x3x3=sep_conv_3x3")
    assert done.code == 0, done
    assert genotype_hash(from_darts((tmp_path / "out.darts").read_text())) == genotype_hash(
        from_darts(DARTS_V2, op_map={"sep_conv_3x3": "conv_3x3x3"}))


# DARTS's genotypes.py: NASNet's normal cell (input 0 twice at node 3, input 1 twice at node 6).
NASNET = ("Genotype(normal=[('sep_conv_5x5', 1), ('sep_conv_3x3', 0), ('sep_conv_5x5', 0), ('sep_conv_3x3', 0), "
          "('avg_pool_3x3', 1), ('skip_connect', 0), ('avg_pool_3x3', 0), ('avg_pool_3x3', 0), "
          "('sep_conv_3x3', 1), ('skip_connect', 1)], normal_concat=[2, 3, 4, 5, 6], "
          "reduce=[('sep_conv_5x5', 1), ('sep_conv_7x7', 0), ('max_pool_3x3', 1), ('sep_conv_7x7', 0), "
          "('avg_pool_3x3', 1), ('sep_conv_5x5', 0), ('skip_connect', 3), ('avg_pool_3x3', 2), "
          "('sep_conv_3x3', 2), ('max_pool_3x3', 1)], reduce_concat=[4, 5, 6])")


def _pairs(text):
    from scnas.genotype.convert import _parse_darts_call

    parsed = _parse_darts_call(text, None)
    return parsed["normal"], parsed["reduce"]


def test_a_darts_round_trip_keeps_darts_order_so_its_checkpoints_still_load(tmp_path):
    """DARTS builds a cell's _ops in the order of its (op, input) pairs; DARTS_V2 lists node 4 of
    normal as inputs (1, 0) and node 3 of reduce as (2, 1). Sorting them by input reordered
    _ops, and a DARTS checkpoint no longer loaded (or, with equal shapes, swapped weights)."""
    from scnas.genotype import read_genotype, write_genotype
    from scnas.genotype.convert import DARTS_ORDER_KEY

    genotype = from_darts(DARTS_V2, op_map={"sep_conv_3x3": "conv_3x3x3"})
    assert getattr(genotype.provenance, DARTS_ORDER_KEY)["encoder_normal"][2] == [1, 0]
    assert _pairs(to_darts(genotype)) == _pairs(DARTS_V2)
    write_genotype(genotype, tmp_path / "v2.yaml")                      # through a YAML file, edges written by input
    again = read_genotype(tmp_path / "v2.yaml")
    assert genotype_hash(again) == genotype_hash(genotype)              # the order is provenance, not the cells
    written = to_darts(again)
    assert _pairs(written) == _pairs(DARTS_V2)
    assert _pairs(to_darts(from_darts(written))) == _pairs(DARTS_V2)     # and again from the written DARTS text
    # cells whose pairs are listed by input record nothing
    by_input = DARTS_V2.replace("('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0)",
                                "('skip_connect', 0), ('sep_conv_3x3', 1), ('skip_connect', 0)")
    recorded = getattr(from_darts(by_input, op_map={"sep_conv_3x3": "conv_3x3x3"}).provenance, DARTS_ORDER_KEY)
    assert sorted(recorded) == ["expansion", "reduction"]


def test_a_stale_or_malformed_darts_order_is_ignored():
    from scnas.genotype import genotype_from_data

    data = from_darts(DARTS_V2, op_map={"sep_conv_3x3": "conv_3x3x3"}).to_dict()
    for cell in ("encoder_normal", "decoder_normal"):     # node 4 now takes inputs 1 and 2: the recorded order is stale
        for edge in data["cells"][cell]["edges"]:
            if edge["to"] == 4 and edge["from"] == 0:
                edge["from"] = 2
    normal, reduce = _pairs(to_darts(genotype_from_data(data)))
    assert normal[4:6] == [("sep_conv_3x3", 1), ("skip_connect", 2)] and reduce == _pairs(DARTS_V2)[1]
    data["provenance"]["darts_order"] = {"encoder_normal": "no", "reduction": [[0, 1]]}
    normal, reduce = _pairs(to_darts(genotype_from_data(data)))
    assert reduce[2:4] == [("max_pool_3x3", 1), ("skip_connect", 2)]       # by input


def test_darts_nasnet_is_refused_saying_why():
    with pytest.raises(GenotypeError) as raised:
        from_darts(NASNET, op_map={name: "conv_3x3x3" for name in ("sep_conv_3x3", "sep_conv_5x5", "sep_conv_7x7")})
    message = str(raised.value)
    assert "node 3 takes input 0 twice" in message and "NASNet and AmoebaNet" in message and "rule R6" in message


def test_op_map_and_darts_op_may_be_repeated(cli, tmp_path):
    src = tmp_path / "v2.darts"
    src.write_text(DARTS_V2.replace("('max_pool_3x3', 1)], reduce_concat", "('sep_conv_5x5', 1)], reduce_concat"))
    repeated = cli("convert", src, tmp_path / "a.yaml", "--op-map", "sep_conv_3x3=conv_3x3x3", "--op-map",
                   "sep_conv_5x5=sep_dil4_conv_3x3x3")
    assert repeated.code == 0, repeated
    commas = cli("convert", src, tmp_path / "b.yaml", "--op-map", "sep_conv_3x3=conv_3x3x3,sep_conv_5x5=sep_dil4_conv_3x3x3")
    assert (tmp_path / "a.yaml").read_text() == (tmp_path / "b.yaml").read_text() and commas.code == 0
    written = cli("convert", tmp_path / "a.yaml", tmp_path / "a.darts", "--darts-op", "conv_3x3x3=conv3",
                  "--darts-op", "sep_dil4_conv_3x3x3=dil5")
    assert written.code == 0, written
    normal, reduce = _pairs((tmp_path / "a.darts").read_text())
    assert ("conv3", 0) in normal and ("dil5", 1) in reduce
