"""``scnas search-report``: whether several searches of the same data found something."""

from __future__ import annotations

import json
from typing import Optional

import typer

from scnas import defaults as D
from scnas.cli import options
from scnas.cli.app import app, stdout


@app.command("search-report")
def search_report_command(
    runs: list[str] = typer.Argument(..., metavar="RUN...", help="Search run folders of the same data and search "
                                                                 "space, e.g. one per --seed."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Also write the report as JSON here."),
    permutations: int = typer.Option(10_000, "--permutations", min=100, help="Permutations of the agreement test."),
    seed: int = typer.Option(0, "--seed", help="Seed of the permutation test."),
    planted: Optional[str] = typer.Option(None, "--planted", metavar="GENOTYPE",
                                          help="The genotype planted in the task (scnas.search.planted): also "
                                               "report how often the runs recover its operations."),
    planted_cells: Optional[str] = typer.Option(None, "--planted-cells", metavar="CELL,...",
                                                help="With --planted: count only these cell types, e.g. "
                                                     "decoder_normal for a task that needs its operation there "
                                                     "(scnas.search.planted.context_cases). Default: all four."),
    by: str = options.choice(D.DERIVE_BY, "--by", D.DERIVE_BY_CHOICES,
                             help="Each edge's operation by alpha (genotype.yaml) or by perturbation (the scores "
                                  "'scnas derive RUN --by perturbation' kept in RUN/perturbation.json)."),
) -> None:
    """Tell a finding from noise: agreement between seeds, collapse, alpha over the epochs.

    Per cell type: how often two searches give a candidate edge the same best non-zero
    operation, against chance (1 / non-zero operations) with a permutation p-value (each run's
    operations shuffled over the edges: a collapse that puts one operation everywhere agrees
    and is not significant) and a second one that renames each run's operations at random
    (do the seeds choose the same operations?), and a third that renames them within their kind
    (with weights, parameter-free: runs that all avoid one kind agree by that alone); a run whose
    supernet's loss ended far above the best run's is named; the share of parameter-free operations (identity, pooling) in the
    derived cells against random genotypes'; softmax(alpha)'s mass on them per epoch; and the
    Hessian eigenvalue of the alpha loss per epoch where the search computed it
    (--hessian-iterations), R-DARTS's collapse indicator. See docs/search.md.
    Example: for s in 0 1 2 3 4; do scnas search --data T --seed $s -o runs/s$s; done;
    scnas search-report runs/s0 runs/s1 runs/s2 runs/s3 runs/s4 -o report.json
    """
    from rich.table import Table

    from scnas.fileio import atomic_write_text
    from scnas.genotype import CELL_TYPES, load_genotype
    from scnas.search.report import SearchReportError, search_report

    if planted_cells and not planted:
        raise SearchReportError("--planted-cells counts the recovery of a planted genotype: give it with --planted")
    report = search_report(runs, seed=seed, permutations=permutations,
                           planted=load_genotype(planted) if planted else None,
                           planted_cells=tuple(c.strip() for c in planted_cells.split(",")) if planted_cells else None,
                           by=by)
    table = Table(title=f"{len(report['runs'])} search(es); chance agreement {report['agreement_chance']:.3f}; "
                        f"random genotypes' parameter-free share {report['random_parameter_free_share']:.0%}")
    for column in ("cell type", "agreement", "p (edges shuffled)", "p (ops renamed)", "p (renamed within kind)",
                   "parameter-free share per run"):
        table.add_column(column)
    for cell in CELL_TYPES:
        entry = report["cells"][cell]
        table.add_row(cell, f"{entry['agreement']:.3f}" if "agreement" in entry else "-",
                      f"{entry['agreement_p']:.4f}" if "agreement_p" in entry else "-",
                      f"{entry['agreement_p_relabelled']:.4f}" if "agreement_p_relabelled" in entry else "-",
                      f"{entry['agreement_p_relabelled_within_kind']:.4f}"
                      if "agreement_p_relabelled_within_kind" in entry else "-",
                      ", ".join(f"{v:.0%}" for v in entry["parameter_free_share"]))
    stdout.print(table)
    epochs = Table(title="softmax(alpha) on parameter-free operations, mean over edges (first run; per epoch)")
    rows = report["per_epoch"][report["runs"][0]["folder"]]
    epochs.add_column("epoch")
    for cell in CELL_TYPES:
        epochs.add_column(cell)
    if any("hessian_eigenvalue" in row for row in rows):
        epochs.add_column("Hessian eigenvalue")
    for row in rows:
        values = [f"{row['parameter_free'][c]:.3f}" for c in CELL_TYPES]
        if "hessian_eigenvalue" in row or len(epochs.columns) > 1 + len(CELL_TYPES):
            values.append(f"{row['hessian_eigenvalue']:.4g}" if row.get("hessian_eigenvalue") is not None else "-")
        epochs.add_row(str(row["epoch"]), *values)
    stdout.print(epochs)
    for line in report["verdict"]:
        stdout.out(line)
    if output:
        atomic_write_text(output, json.dumps(report, indent=2) + "\n")
        stdout.out(f"wrote {output}")
