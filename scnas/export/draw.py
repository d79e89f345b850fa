"""Drawings of genotypes: Figure-2-style cells, softmax(alpha) edge strengths, the whole U-Net.

DOT source is built in pure Python with the ``graphviz`` package; rendering to SVG, PNG or PDF
runs Graphviz's ``dot`` program, which comes from the operating system (Debian/Ubuntu:
``apt-get install graphviz``).
"""

from __future__ import annotations

import os
from pathlib import Path

import graphviz

from scnas.errors import ScnasError
from scnas.fileio import atomic_write_bytes, atomic_write_text
from scnas.genotype import CELL_TYPES, Genotype, short_hash
from scnas.genotype.ops import OPS

FAMILY_COLOURS = {"conv": "#1f77b4", "pool": "#2ca02c", "identity": "#7f7f7f", "zero": "#d62728"}
FAMILY_SHADES = {"conv": ("#08519c", "#3182bd", "#6baed6", "#9ecae1"), "pool": ("#238b45", "#74c476")}
"""Shades within a family, given to its ops in the vocabulary's order (so that the dilations and
the two pools tell apart); an op past the last shade, or of a family without shades, gets
the family colour."""
INPUT_LABELS = {0: "<c<SUB>k-2</SUB>>", 1: "<c<SUB>k-1</SUB>>"}  # Graphviz HTML labels
OUTPUT_LABEL = "<c<SUB>k</SUB>>"
RENDER_FORMATS = ("svg", "png", "pdf")
ALPHA_TOP = 2
"""With --alpha, each candidate edge is one arrow labelled with its ALPHA_TOP likeliest ops (and
the chosen op when it is not among them): 14 arrows a cell at 4 nodes, not one per op (112)."""


class DrawError(ScnasError):
    """A drawing that cannot be made (no probabilities for --alpha, no Graphviz to render, ...)."""


def op_colour(op: str) -> str:
    family = OPS[op].family
    index = [name for name, spec in OPS.items() if spec.family == family].index(op)
    shades = FAMILY_SHADES.get(family, ())
    return shades[index] if index < len(shades) else FAMILY_COLOURS[family]


def _cell_subgraph(genotype: Genotype, cell_type: str, alpha: bool, prefix: str) -> graphviz.Digraph:
    cell = genotype.cell(cell_type)
    graph = graphviz.Digraph(name=f"cluster_{cell_type}")
    graph.attr(label=cell_type.replace("_", "-"), fontsize="16", style="rounded", color="#bbbbbb")
    live = cell.live_nodes()
    with graph.subgraph() as inputs:  # c_{k-2} above c_{k-1}, as in the paper's Figure 2
        inputs.attr(rank="same")
        for index, label in INPUT_LABELS.items():
            inputs.node(f"{prefix}{index}", label, shape="box", style="filled", fillcolor="#c6dbef")
        inputs.edge(f"{prefix}1", f"{prefix}0", style="invis")  # in a left-to-right rank, this puts 0 on top
    fed = {e.target for e in cell.edges}
    shown = [n for n in genotype.intermediate_nodes if n in fed or n in cell.concat or alpha]
    for node in shown:
        dead = node not in live
        graph.node(f"{prefix}{node}", str(node), shape="circle", style="filled,dashed" if dead else "filled",
                   fillcolor="#eeeeee" if dead else "#fdd0a2")
    graph.node(f"{prefix}out", OUTPUT_LABEL, shape="box", style="filled", fillcolor="#fee391")
    if alpha:
        _alpha_edges(graph, genotype, cell_type, prefix)
    else:
        for edge in sorted(cell.edges, key=lambda e: (e.target, e.source)):
            colour = op_colour(edge.op)
            graph.edge(f"{prefix}{edge.source}", f"{prefix}{edge.target}", label=edge.op, color=colour,
                       fontcolor=colour, penwidth="2", style="dashed" if edge.target not in live else "solid")
    for node in sorted(cell.concat):
        graph.edge(f"{prefix}{node}", f"{prefix}out", color="#999999")
    return graph


def _alpha_edges(graph: graphviz.Digraph, genotype: Genotype, cell_type: str, prefix: str) -> None:
    entries = (genotype.provenance.probabilities or {}).get(cell_type) if genotype.provenance else None
    if not entries:
        raise DrawError(f"--alpha needs per-edge probabilities (provenance.probabilities.{cell_type}), which genotypes "
                        "written by 'scnas search' carry; this one has none. Draw without --alpha")
    chosen = {(e.source, e.target): e.op for e in genotype.cell(cell_type).edges}
    for (source, target), op in chosen.items():  # chosen edges the search recorded no probabilities for
        if not any((entry.source, entry.target) == (source, target) for entry in entries):
            graph.edge(f"{prefix}{source}", f"{prefix}{target}", label=op, color=op_colour(op),
                       fontcolor=op_colour(op), penwidth="2")
    for entry in entries:
        ranked = sorted(entry.p.items(), key=lambda item: -item[1])
        picked = chosen.get((entry.source, entry.target))
        lines = ranked[:ALPHA_TOP] + [(op, p) for op, p in ranked[ALPHA_TOP:] if op == picked]
        label = "\n".join(f"{op}{' *' if op == picked else ''} {p:.2f}" for op, p in lines)
        top_op, top_p = ranked[0]
        colour = op_colour(top_op)
        opacity = f"{max(60, int(255 * top_p)):02x}"
        graph.edge(f"{prefix}{entry.source}", f"{prefix}{entry.target}", label=label, color=colour + opacity,
                   fontcolor=colour, penwidth=f"{0.5 + 4 * top_p:.2f}", style="solid" if picked else "dashed")


def cells_graph(genotype: Genotype, cells: list[str] | None = None, alpha: bool = False,
                *, title: str | None = None) -> graphviz.Digraph:
    """Figure-2-style drawing of the given cells (default: all four), side by side.

    Args:
        genotype: the cells.
        cells: the cell types to draw (default: all four).
        alpha: label edges with softmax(alpha) (a genotype written by a search).
        title: the figure's title.
    """
    cells = cells or list(CELL_TYPES)
    for name in cells:
        genotype.cell(name)  # validates the name
    if alpha and not (genotype.provenance and genotype.provenance.probabilities):
        raise DrawError("--alpha needs per-edge probabilities (provenance.probabilities), which genotypes written by "
                        "'scnas search' carry; this one has none. Draw without --alpha")
    graph = graphviz.Digraph(name="scnas_cells")
    graph.attr(rankdir="LR", label=title or f"genotype {short_hash(genotype)}", labelloc="t", fontsize="18")
    graph.attr("edge", fontsize="10")
    # dot stacks clusters of a left-to-right graph bottom-up: add them last-first to read top-down.
    for index, name in reversed(list(enumerate(cells))):
        graph.subgraph(_cell_subgraph(genotype, name, alpha, prefix=f"{index}_"))
    return graph


def network_graph(genotype: Genotype, config) -> graphviz.Digraph:
    """Figure-1-style drawing of the whole U-Net of ``build_network(genotype, config)``:
    stem, cells by type and level with their output widths, used inputs, skip sums, out."""
    from scnas.build.network import genotype_graphs, live_cells, macro_layout, macro_wiring, node_width

    layout = macro_layout(config.depth)
    wiring = macro_wiring(layout)
    live = live_cells(genotype_graphs(genotype), layout, wiring)
    colours = {"encoder_normal": "#c6dbef", "reduction": "#fdd0a2", "decoder_normal": "#c7e9c0", "expansion": "#dadaeb"}
    graph = graphviz.Digraph(name="scnas_network")
    # One row per level (the U of Figure 1): the encoder goes down on the left, the decoder up on the right.
    graph.attr(rankdir="TB", label=f"genotype {short_hash(genotype)}, stem {config.stem_channels}, depth {config.depth}",
               labelloc="t", fontsize="18", newrank="true", nodesep="0.4")
    rows: dict[int, list[str]] = {level: [] for level in range(config.depth + 1)}
    graph.node("input", f"input\n{config.in_channels} ch", shape="box")
    graph.node("o0", f"stem\n{config.stem_channels} ch", shape="box", style="filled", fillcolor="#fee391")
    rows[0] += ["input", "o0"]
    graph.edge("input", "o0")
    for k, (slot, wire) in enumerate(zip(layout, wiring)):
        cell = genotype.cell(slot.cell_type)
        width = node_width(config, genotype.nodes, slot.level) * len(cell.concat)
        used = k in live
        graph.node(f"o{k + 1}", f"{slot.name}\nlevel {slot.level}, {width} ch" + ("" if used else "\n(unused)"),
                   shape="box", style="filled,rounded" if used else "dashed,rounded",
                   fillcolor=colours[slot.cell_type])
        rows[slot.level].append(f"o{k + 1}")
        uses = cell.live_nodes() if used else set()
        for index in (0, 1):
            if index in uses:
                graph.edge(f"o{wire.inputs[index]}", f"o{k + 1}", style="solid" if index else "dashed",
                           color="black" if index else "#888888")
        if wire.skip is not None and 1 in uses:
            graph.edge(f"o{wire.skip}", f"o{k + 1}", label="+ skip", style="dotted", color="#d62728",
                       fontcolor="#d62728")
    graph.node("out", f"out (1x1x1)\n{config.num_classes} classes", shape="box", style="filled", fillcolor="#fee391")
    rows[0].append("out")
    graph.edge(f"o{len(layout)}", "out")
    for level, names in rows.items():
        with graph.subgraph() as row:
            row.attr(rank="same")
            for name in names:
                row.node(name)
    return graph


def write_drawing(graph: graphviz.Digraph, path: str | os.PathLike) -> None:
    """Write DOT source (``.dot``/``.gv``) or render it (``.svg``, ``.png``, ``.pdf``) atomically."""
    name = str(path)
    suffix = Path(name).suffix.lower().lstrip(".")
    if suffix in ("dot", "gv"):
        atomic_write_text(path, graph.source)
        return
    if suffix not in RENDER_FORMATS:
        raise DrawError(f"cannot tell the drawing format from {suffix or 'no suffix'!r}: use .svg, .png, .pdf or .dot",
                        source=name)
    try:
        data = graph.pipe(format=suffix)
    except graphviz.ExecutableNotFound:
        raise DrawError(f"rendering .{suffix} needs Graphviz's 'dot' program, which is not installed "
                        "(Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz); "
                        "or write .dot and render it elsewhere", source=name) from None
    except graphviz.CalledProcessError as exc:
        raise DrawError(f"Graphviz failed: {exc.stderr.decode(errors='replace').strip()[:200]}", source=name) from None
    atomic_write_bytes(path, data)
