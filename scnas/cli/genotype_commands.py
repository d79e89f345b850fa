"""Commands on genotype files: validate, show, diff, convert, schema, genotype random/builtin/list/ops."""

from __future__ import annotations

from collections import Counter
from typing import Optional

import typer
from rich.table import Table

from scnas.cli.app import app, stdout
from scnas.errors import ScnasError
from scnas.fileio import atomic_write_text
from scnas.genotype import (BUILTIN_NAMES, CELL_TYPES, MAX_NODES, OPS, builtin_genotype, diff as genotype_diff, load_genotype,
                            random_genotype, short_hash, write_genotype)
from scnas.genotype.convert import parse_cell_map, parse_darts_names, parse_op_map
from scnas.genotype.io import FORMATS
from scnas.genotype.schema import json_schema_text

genotype_app = typer.Typer(help="Make genotypes: built-ins, random baselines, the op vocabulary.",
                           no_args_is_help=True)
app.add_typer(genotype_app, name="genotype")

_FORMAT_HELP = f"Format ({', '.join(FORMATS)}); default: from the file suffix."


@app.command()
def validate(files: list[str] = typer.Argument(..., metavar="GENOTYPE...", help="Genotype files (or built-in names).")) -> None:
    """Check genotype files: syntax, schema and cell semantics.

    Prints 'ok' and the content hash per valid file, one line per problem otherwise
    (file: field path: reason). Exit 0 when all are valid, 1 otherwise.
    """
    failed = 0
    for name in files:
        try:
            genotype = load_genotype(name)
        except ScnasError as exc:
            failed += 1
            for line in exc.lines():
                stdout.out(line if exc.source else f"{name}: {line}")
            continue
        stdout.out(f"{name}: ok (hash {short_hash(genotype)}, {genotype.nodes} nodes)")
    if failed:
        raise typer.Exit(1)


@app.command()
def show(genotype_path: str = typer.Argument(..., metavar="GENOTYPE")) -> None:
    """Print a genotype per cell: edges as a table, op counts and the content hash."""
    genotype = load_genotype(genotype_path)
    stdout.print(f"[bold]{genotype_path}[/]  hash {short_hash(genotype)}  nodes {genotype.nodes}  "
                 f"format {genotype.format} v{genotype.version}")
    stdout.print(f"vocabulary: {', '.join(genotype.ops)}")
    description = getattr(genotype.provenance, "description", None) if genotype.provenance else None
    if description:
        stdout.print(f"description: {description}")
    for name in CELL_TYPES:
        cell = genotype.cell(name)
        table = Table(title=f"{name}  (concat {sorted(cell.concat)})", title_justify="left")
        table.add_column("from", justify="right")
        table.add_column("to", justify="right")
        table.add_column("op")
        for node in genotype.intermediate_nodes:
            for edge in cell.incoming(node):
                table.add_row(_node_name(edge.source), str(edge.target), edge.op)
        stdout.print(table)
        counts = Counter(edge.op for edge in cell.edges)
        stdout.print("  " + (", ".join(f"{op} x{n}" for op, n in sorted(counts.items())) or "no edges"))


def _node_name(node: int) -> str:
    return {0: "0 (c_k-2)", 1: "1 (c_k-1)"}.get(node, str(node))


@app.command()
def diff(a: str = typer.Argument(..., metavar="A"), b: str = typer.Argument(..., metavar="B")) -> None:
    """Compare two genotypes edge by edge (provenance and vocabulary ignored).

    Exit 0 when they describe the same cells, 1 when they differ.
    """
    first, second = load_genotype(a), load_genotype(b)
    changes = genotype_diff(first, second)
    if not changes:
        stdout.out(f"same cells (hash {short_hash(first)})")
        return
    stdout.out(f"--- {a} ({short_hash(first)})\n+++ {b} ({short_hash(second)})")
    current = None
    for change in changes:
        if change.cell != current and change.cell:
            stdout.out(f"{change.cell}:")
            current = change.cell
        stdout.out(f"  {change.description}" if change.cell else change.description)
    raise typer.Exit(1)


@app.command()
def convert(
    source: str = typer.Argument(..., metavar="IN", help="Genotype to read ('-': stdin)."),
    target: str = typer.Argument(..., metavar="OUT", help="File to write ('-': stdout)."),
    from_format: Optional[str] = typer.Option(None, "--from", help=_FORMAT_HELP),
    to_format: Optional[str] = typer.Option(None, "--to", help=_FORMAT_HELP + " '-' defaults to yaml."),
    op_map: Optional[list[str]] = typer.Option(
        None, "--op-map", metavar="DARTS=SCNAS,...",
        help="DARTS op names -> scnas ops, e.g. 'sep_conv_3x3=conv_3x3x3'. Several: repeat the option or separate "
             "entries with commas. Writing DARTS, each scnas op is written as the DARTS name mapped to it."),
    darts_op: Optional[list[str]] = typer.Option(
        None, "--darts-op", metavar="SCNAS=DARTS,...",
        help="Writing DARTS: the DARTS name to write for a scnas op, e.g. 'conv_3x3x3=sep_conv_3x3'; several: repeat "
             "the option or separate entries with commas. Needed for ops with no DARTS counterpart (conv_3x3x3, "
             "sep_dil3/4) and to choose when --op-map maps several DARTS names to one scnas op; "
             "'conv_3x3x3=conv_3x3x3' keeps the scnas name."),
    darts_cells: Optional[str] = typer.Option(
        None, "--darts-cells", metavar="MAP",
        help="Which scnas cells a DARTS cell stands for; default "
             "'normal=encoder_normal,decoder_normal;reduce=reduction,expansion'. "
             "Writing with 'normal=encoder_normal;reduce=reduction' exports those two cells only."),
) -> None:
    """Convert between YAML, JSON, DARTS Genotype(...) strings and the one-line form.

    Formats follow the suffixes .yaml/.yml, .json, .darts, .oneline. DARTS strings are read
    as data (never evaluated); 'none' edges are dropped, and the DARTS names used are kept in
    provenance.darts_ops. DARTS strings are written with DARTS's own op names (skip_connect,
    max_pool_3x3, avg_pool_3x3, dil_conv_3x3; others from --op-map, --darts-op or the names the
    genotype was read with) and the provenance in a trailing '# scnas-provenance:' comment.
    """
    options = {"op_map": parse_op_map(",".join(op_map or [])), "cells": parse_cell_map(darts_cells),
               "darts_names": parse_darts_names(",".join(darts_op or []))}
    genotype = load_genotype(source, from_format, **options)
    write_genotype(genotype, target, to_format, **options)
    if target != "-":
        stdout.out(f"wrote {target} (hash {short_hash(genotype)})")


@app.command()
def schema(output: Optional[str] = typer.Option(None, "-o", "--output", help="Write to this file instead of stdout.")) -> None:
    """Print or write the JSON Schema of the genotype format (draft 2020-12).

    The schema checks structure; the semantic rules (node ranges, duplicate edges, reachability)
    are in docs/genotype-format.md and are checked by 'scnas validate'.
    """
    text = json_schema_text()
    if output:
        atomic_write_text(output, text)
        stdout.out(f"wrote {output}")
    else:
        stdout.out(text.rstrip("\n"))


@genotype_app.command("random")
def genotype_random(
    seed: int = typer.Option(..., "--seed", help="Random seed; the same seed gives the same genotype."),
    nodes: int = typer.Option(4, "--nodes", min=1, max=MAX_NODES, help=f"Intermediate nodes per cell (1..{MAX_NODES})."),
    inputs: int = typer.Option(2, "--inputs-per-node", min=1, help="Incoming edges per node (fewer where fewer nodes precede)."),
    ops: Optional[str] = typer.Option(None, "--ops", help="Comma-separated vocabulary; default: the paper's eight ops."),
    output: str = typer.Option("-", "-o", "--output", help="File to write ('-': YAML to stdout)."),
) -> None:
    """Write a seeded random genotype (a baseline of the same size as a searched one)."""
    vocabulary = [op.strip() for op in ops.split(",")] if ops else None
    genotype = random_genotype(seed, nodes=nodes, ops=vocabulary, inputs_per_node=inputs)
    write_genotype(genotype, output)
    if output != "-":
        stdout.out(f"wrote {output} (hash {short_hash(genotype)})")


@genotype_app.command("builtin")
def genotype_builtin(
    name: str = typer.Argument(..., help=f"One of: {', '.join(BUILTIN_NAMES)}."),
    output: str = typer.Option("-", "-o", "--output", help="File to write ('-': YAML to stdout)."),
) -> None:
    """Write a built-in genotype to a file, to read or edit."""
    genotype = builtin_genotype(name)
    write_genotype(genotype, output)
    if output != "-":
        stdout.out(f"wrote {output} (hash {short_hash(genotype)})")


@genotype_app.command("list")
def genotype_list() -> None:
    """List the built-in genotypes."""
    table = Table("name", "hash", "nodes", "description")
    for name in BUILTIN_NAMES:
        genotype = builtin_genotype(name)
        table.add_row(name, short_hash(genotype), str(genotype.nodes),
                      getattr(genotype.provenance, "description", "") or "")
    stdout.print(table)


@genotype_app.command("ops")
def genotype_ops() -> None:
    """List the operation vocabulary (the names genotypes may use)."""
    table = Table("name", "family", "parametric", "description")
    for spec in OPS.values():
        table.add_row(spec.name, spec.family, "yes" if spec.parametric else "no", spec.description)
    stdout.print(table)

