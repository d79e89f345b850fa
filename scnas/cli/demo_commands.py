"""``scnas demo``: the whole chain on phantoms, in a few minutes on 2 CPU cores."""

from __future__ import annotations

import typer

from scnas.cli.main import app, stdout


@app.command()
def demo(
    output: str = typer.Option("demo-run", "-o", "--output", help="Folder for everything the demo makes (must be new)."),
    quick: bool = typer.Option(False, "--quick", help="The smallest settings (a smoke test: about a minute)."),
) -> None:
    """Generate phantoms, search cells, draw them, build the stem-68 network, retrain a small
    one, export and verify ONNX, predict held-out cases with onnxruntime, evaluate Dice.

    Needs no network and no GPU. Every step prints where its output lies; summary.json holds
    the results.
    """
    from scnas.demo import run_demo

    summary = run_demo(output, quick, say=stdout.out)
    dice = ", ".join(f"class {k}: {v:.3f}" for k, v in summary["test_dice_per_class"].items())
    stdout.out(f"\ndone in {summary['seconds']:.0f} s. Found genotype {summary['genotype_hash']} "
               f"({summary['genotype']}); Dice on {len(summary['held_out_cases'])} held-out cases: {dice} "
               f"(mean {summary['test_dice_mean']:.3f}).")
    stdout.out(f"files: cells {summary['files']['cells']}, model {summary['files']['model']}, ONNX "
               f"{summary['files']['onnx']}, predictions {summary['files']['predictions']}, Dice "
               f"{summary['files']['dice']}, summary {output}/summary.json")
