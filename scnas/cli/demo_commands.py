"""``scnas demo``: the whole chain on phantoms, in a few minutes on 2 CPU cores."""

from __future__ import annotations

import typer

from scnas.cli.app import app, stdout


@app.command()
def demo(
    output: str = typer.Option("demo-run", "-o", "--output", help="Folder for everything the demo makes (must be new)."),
    quick: bool = typer.Option(False, "--quick", help="The smallest settings (a smoke test: about a minute)."),
) -> None:
    """Generate phantoms, search cells, draw them, build the stem-68 network, retrain a small
    one, export and verify ONNX, predict fold 0's validation cases with onnxruntime, evaluate Dice.

    Needs no network and no GPU. Every step prints where its output lies; summary.json holds
    the results. Runs on one torch thread unless --threads (or OMP_NUM_THREADS) says otherwise,
    so that its numbers are the README's on any machine with the same kind of CPU.
    """
    from scnas.apps.demo import run_demo
    from scnas.threads import reproducible_threads

    threads = reproducible_threads()
    summary = run_demo(output, quick, say=stdout.out, threads=threads)
    for line in summary_lines(summary, output):
        stdout.out(line)


def summary_lines(summary: dict, output: str) -> list[str]:
    """The demo's closing lines (the README shows them; a test compares them with a real run)."""
    dice = ", ".join(f"class {k}: {v:.3f}" for k, v in summary["validation_dice_per_class"].items())
    moved = ", ".join(f"{name} {m['largest_x_uniform']:.1f}x" for name, m in summary["alpha_moved"].items())
    return [f"\ndone in {summary['seconds']:.0f} s. Found genotype {summary['genotype_hash']} "
            f"({summary['genotype']}; largest alpha probability over uniform: {moved}); Dice of the last "
            f"epoch's model on fold 0's {len(summary['validation_cases'])} validation cases: {dice} "
            f"(mean {summary['validation_dice_mean']:.3f}).",
            f"files: cells {summary['files']['cells']}, model {summary['files']['model']}, ONNX "
            f"{summary['files']['onnx']}, predictions {summary['files']['predictions']}, Dice "
            f"{summary['files']['dice']}, summary {output}/summary.json"]
