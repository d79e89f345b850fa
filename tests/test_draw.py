"""Drawings: Figure-2 cells, alpha strengths, the network; DOT without Graphviz, renders with it."""

from __future__ import annotations

import html
import re
import os
import shutil
import struct
import subprocess

import pytest

from scnas.build import BuildConfig, build_network, save_model
from scnas.export import DrawError, cells_graph, network_graph, write_drawing
from scnas.genotype import CELL_TYPES, PAPER_OPS, genotype_from_data, random_genotype

# CI installs Graphviz and sets SCNAS_REQUIRE_DOT=1, so rendering tests run there, never skip.
needs_dot = pytest.mark.skipif(shutil.which("dot") is None and not os.environ.get("SCNAS_REQUIRE_DOT"),
                               reason="Graphviz's dot is not installed (apt-get install graphviz)")


@pytest.fixture
def searched(small_doc):
    """A genotype as a search writes it: with softmax(alpha) for every candidate edge."""
    ops = [op for op in PAPER_OPS]
    entries = [{"from": s, "to": t, "p": {op: (0.65 if op == "conv_3x3x3" else 0.05) for op in ops}}
               for s, t in [(0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]]
    small_doc["provenance"] = {"probabilities": {name: entries for name in CELL_TYPES}}
    return genotype_from_data(small_doc)


@needs_dot
def test_svg_shows_every_cell_node_and_op(tmp_path):
    genotype = random_genotype(11, nodes=4, ops=[op for op in PAPER_OPS if op != "zero"])
    path = tmp_path / "cells.svg"
    write_drawing(cells_graph(genotype), path)
    svg = html.unescape(path.read_text())
    for op in {e.op for name in CELL_TYPES for e in genotype.cell(name).edges}:
        assert f">{op}<" in svg
    for text in ("encoder-normal", "reduction", "decoder-normal", "expansion", ">k-2<", ">k-1<", ">2<", ">5<"):
        assert text in svg


@needs_dot
def test_png_is_a_real_image(tmp_path, uresnet):
    path = tmp_path / "cells.png"
    write_drawing(cells_graph(uresnet), path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 300


@needs_dot
def test_dot_source_parses(tmp_path, uresnet):
    path = tmp_path / "cells.dot"
    write_drawing(cells_graph(uresnet), path)
    result = subprocess.run(["dot", "-Tcanon", str(path)], capture_output=True, text=True)
    assert result.returncode == 0 and "conv_3x3x3" in result.stdout


def test_dot_needs_no_graphviz_and_renders_say_how_to_install(tmp_path, uresnet, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    write_drawing(cells_graph(uresnet), tmp_path / "cells.dot")
    assert "identity" in (tmp_path / "cells.dot").read_text()
    with pytest.raises(DrawError, match="needs Graphviz's 'dot' program.*apt-get install graphviz"):
        write_drawing(cells_graph(uresnet), tmp_path / "cells.svg")
    assert not (tmp_path / "cells.svg").exists()


def test_unknown_drawing_format(tmp_path, uresnet):
    with pytest.raises(DrawError, match="use .svg, .png, .pdf or .dot"):
        write_drawing(cells_graph(uresnet), tmp_path / "cells.jpg")


def test_alpha_draws_every_candidate_with_its_strength(searched):
    source = cells_graph(searched, ["reduction"], alpha=True).source
    chosen = {(e.source, e.target): e.op for e in searched.cell("reduction").edges}
    concat = len(searched.cell("reduction").concat)
    assert source.count("->") == 5 + concat + 1   # one arrow per candidate edge (not per op), concat, layout
    labels = dict(((int(s), int(t)), label.split("\n")) for s, t, label in
                  re.findall(r'"0_(\d)" -> "0_(\d)" \[label="([^"]*)"', source))
    assert len(labels) == 5
    for edge, lines in labels.items():
        op = chosen.get(edge)
        assert lines[0] == ("conv_3x3x3 * 0.65" if op == "conv_3x3x3" else "conv_3x3x3 0.65")   # likeliest first
        assert len(lines) == (3 if op not in (None, "conv_3x3x3") and f"{op} * 0.05" != lines[1] else 2)
        if op is not None:   # the chosen op is on its edge's label, marked, with its probability
            assert f"{op} * {0.65 if op == 'conv_3x3x3' else 0.05:.2f}" in lines


def test_alpha_still_draws_chosen_edges_without_probabilities(small_doc):
    p = {op: 1 / 8 for op in PAPER_OPS}
    small_doc["provenance"] = {"probabilities": {"reduction": [{"from": 0, "to": 2, "p": p}]}}
    source = cells_graph(genotype_from_data(small_doc), ["reduction"], alpha=True).source
    assert '"0_2" -> "0_3" [label=avg_pool_3x3x3' in source and '"0_1" -> "0_2" [label=conv_3x3x3' in source


def test_alpha_without_probabilities_is_a_clear_error(uresnet):
    with pytest.raises(DrawError, match="--alpha needs per-edge probabilities"):
        cells_graph(uresnet, alpha=True)


def test_single_cell_and_dead_nodes(small_doc):
    small_doc["cells"]["reduction"]["concat"] = [2]  # node 3 is dead
    source = cells_graph(genotype_from_data(small_doc), ["reduction"]).source
    assert "cluster_reduction" in source and "cluster_expansion" not in source
    assert "dashed" in source


@needs_dot
def test_network_drawing_has_every_cell_and_the_skips(tmp_path, uresnet):
    path = tmp_path / "net.svg"
    write_drawing(network_graph(uresnet, BuildConfig(stem_channels=68)), path)
    svg = html.unescape(path.read_text())
    for name in ("stem", "reduction_1", "inter", "expansion_0", "decoder_normal_0", "out (1x1x1)", "544 ch"):
        assert name in svg
    assert svg.count("+ skip") == 3


def test_draw_command_from_genotype_and_model_file(cli, tmp_path, uresnet):
    save_model(build_network(uresnet, BuildConfig(stem_channels=4, in_channels=1)), tmp_path / "m.safetensors")
    assert cli("draw", "uresnet", "-o", tmp_path / "a.dot").code == 0
    assert cli("draw", tmp_path / "m.safetensors", "--network", "-o", tmp_path / "b.dot").code == 0
    assert "1 ch" in (tmp_path / "b.dot").read_text()
    result = cli("draw", "uresnet", "--alpha", "-o", tmp_path / "c.dot")
    assert result.code == 1 and "--alpha needs" in result.err and not (tmp_path / "c.dot").exists()
    result = cli("draw", "uresnet", "--cell", "middle", "-o", tmp_path / "d.dot")
    assert result.code == 1 and "unknown cell type 'middle'" in result.err


def test_draw_network_takes_the_tasks_channels_and_classes_as_build_does(cli, tmp_path):
    args = ("--network", "--stem", "4", "--in-channels", "1", "--classes", "2")
    assert cli("draw", "uresnet", *args, "-o", tmp_path / "net.dot").code == 0
    drawn = (tmp_path / "net.dot").read_text()
    assert "input\n1 ch" in drawn and "out (1x1x1)\n2 classes" in drawn
    assert cli("build", "uresnet", *args[1:], "-o", tmp_path / "m.safetensors").code == 0   # the same options
    assert cli("draw", tmp_path / "m.safetensors", "--network", "-o", tmp_path / "m.dot").code == 0
    assert (tmp_path / "m.dot").read_text() == drawn
