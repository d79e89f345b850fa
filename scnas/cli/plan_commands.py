"""``scnas plan``: will a training or search step fit on a GPU, and what would."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from scnas import defaults as D
from scnas.cli import options
from scnas.cli.app import app, stderr, stdout
from scnas.genotype.model import MAX_NODES


@app.command()
def plan(
    genotype_path: Optional[str] = typer.Argument(None, metavar="[GENOTYPE]", help="Genotype to retrain (file or "
                                                  "built-in name); leave out with --search."),
    search: bool = typer.Option(False, "--search", help="Plan a search step (the supernet) instead of retraining."),
    stem: Optional[int] = typer.Option(None, "--stem", min=1, help=f"Stem channels (default: {D.STEM_TRAIN} to retrain, "
                                                                   f"{D.STEM_SEARCH} to search)."),
    patch: tuple[int, int, int] = typer.Option(D.PATCH, "--patch", help="Patch size D H W."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help=f"Global batch (default: "
                                             f"{D.TRAIN_BATCH_SIZE} to retrain, {D.SEARCH_BATCH_SIZE} to search)."),
    world_size: int = typer.Option(1, "--world-size", min=1, help="Processes (GPUs) sharing the batch."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", min=1, help="Patches per forward pass (default: "
                                                                               "the process's whole share)."),
    amp: str = options.choice(D.AMP, "--amp", D.AMP_CHOICES, help="Mixed precision as train and search take it; "
                              "auto: fp16, what they use on a CUDA device."),
    checkpoint: str = options.choice("auto", "--checkpoint", D.CHECKPOINT_CHOICES, help="Activation checkpointing; "
                                     "auto: every mode side by side."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Budget, e.g. 24GiB or 16GB: adds the plan and "
                                             "the largest micro-batch, patch and stem that fit (default: this "
                                             "machine's CUDA device, if any)."),
    data: Optional[str] = typer.Option(None, "--data", help="Take input channels and classes from a task folder or "
                                                            "prepared cache."),
    in_channels: int = typer.Option(D.IN_CHANNELS, "--in-channels", min=1, help="Input channels (BraTS: 4), without --data."),
    classes: int = typer.Option(D.NUM_CLASSES, "--classes", min=1, help="Classes including background (BraTS: 4 labels -> 4), "
                                                            "without --data."),
    depth: int = typer.Option(D.DEPTH, "--depth", min=1, max=8),
    nodes: int = typer.Option(D.NODES, "--nodes", min=1, max=MAX_NODES, help="Search: intermediate nodes per cell "
                                                                          "(plans simulate at most 8)."),
    sampling: str = options.choice(D.SAMPLING, "--sampling", D.SAMPLING_CHOICES, help="Search: how ops are drawn."),
    ops: Optional[str] = typer.Option(None, "--ops", help="Search: comma-separated vocabulary (default: the paper's)."),
    deep_supervision: bool = options.DEEP_SUPERVISION,
    no_stem: bool = typer.Option(False, "--no-largest-stem", help="Skip the search for the largest stem (saves a "
                                                                  "few simulations)."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Also write the report as JSON."),
) -> None:
    """Predict the peak GPU memory of one training or search step, per process.

    The step is simulated on the CPU in a few seconds (allocations tracked at two small sizes
    and extrapolated exactly to the patch and batch); a 512 MiB allowance covers convolution
    workspaces, and plans fill at most 90% of the budget. With a budget it prints what
    'scnas train' / 'scnas search' would run with, and the largest micro-batch, cubic patch
    and stem that fit. Examples:

      scnas plan uresnet --stem 68 --batch-size 8 --gpu-memory 24GiB

      scnas plan --search --stem 68 --amp fp16 --gpu-memory 12GiB
    """
    import torch

    from scnas.build import BuildConfig
    from scnas.build.memory_plan import MemoryPlanError
    from scnas.byte_sizes import format_bytes, parse_bytes
    from scnas.engine.processes import device_memory
    from scnas.build.network import check_spatial_size
    from scnas.errors import ScnasError
    from scnas.fileio import atomic_write_text
    from scnas.genotype import PAPER_OPS, load_genotype
    from scnas.apps.memory_report import memory_report

    if search == (genotype_path is not None):
        raise ScnasError("give a GENOTYPE to plan retraining, or --search to plan a search (not both)")
    from scnas.engine.steps import resolve_amp

    amp = resolve_amp(amp, torch.device("cuda"))   # a plan is for a GPU
    try:
        available = parse_bytes(gpu_memory) if gpu_memory else None
    except ValueError as exc:
        raise ScnasError(f"--gpu-memory: {exc}") from None
    if available is None:
        if torch.cuda.is_available():
            available = device_memory(torch.device("cuda"))
    if data:
        from scnas.data import Cache, read_dataset
        from pathlib import Path

        if (Path(data) / "cache.json").exists():
            cache = Cache(data)
            in_channels, classes = len(cache.channel_names), len(cache.labels)
        else:
            dataset = read_dataset(data)
            in_channels, classes = len(dataset.channel_names), len(dataset.labels)
    genotype = load_genotype(genotype_path) if genotype_path else None
    vocabulary = options.vocabulary(ops) or list(PAPER_OPS)
    if deep_supervision and search:
        raise ScnasError("--deep-supervision plans retraining (with a GENOTYPE); a search has no heads")
    build = BuildConfig(stem_channels=stem or (D.STEM_SEARCH if search else D.STEM_TRAIN), in_channels=in_channels,
                        num_classes=classes,
                        depth=depth, deep_supervision=deep_supervision)
    try:
        check_spatial_size(tuple(patch), build)
    except ScnasError as exc:
        raise ScnasError(f"--patch {' '.join(map(str, patch))}: {exc}") from None
    try:
        report = memory_report(build, patch, batch_size or (1 if search else 8), amp=amp, checkpoint=checkpoint,
                               micro_batch=micro_batch,
                               available=available, world=world_size, genotype=genotype, nodes=nodes, ops=vocabulary,
                               sampling=sampling, find_stem=not no_stem,
                               progress=lambda message: stderr.out(message, style="dim"))
    except (ValueError, MemoryPlanError) as exc:
        raise ScnasError(str(exc)) from None
    setting = report.setting
    what = f"retraining {genotype_path}" if genotype else f"search ({sampling} sampling, {nodes} nodes)"
    table = Table("checkpointing", "micro-batch", "peak", "weights + optimiser", "step", *(["typical draw"] if search else []),
                  *(["fits", "largest micro-batch", "largest cubic patch"] if available else []),
                  title=f"{what}: stem {setting['stem']}, patch {'x'.join(map(str, patch))}, {amp}, "
                        f"batch {setting['batch_size']} over {world_size} process(es); per process",
                  title_justify="left")
    for row in report.rows:
        cells = [row.checkpoint, str(row.micro_batch), format_bytes(row.peak), format_bytes(row.persistent),
                 format_bytes(row.transient)]
        if search:
            cells.append(format_bytes(row.typical_peak))
        if available:
            cells += ["yes" if row.fits else "no", str(row.largest_micro_batch or "-"),
                      f"{row.largest_cubic_patch}^3" if row.largest_cubic_patch else "-"]
        table.add_row(*cells)
    stdout.print(table)
    for note in report.notes:
        stdout.out(f"note: {note}")
    if available is None:
        stdout.out("no budget: give --gpu-memory (e.g. 24GiB) for a plan and the largest settings that fit")
    elif report.refusal:
        stdout.out(f"budget {format_bytes(available)}: does not fit. {report.refusal}")
    else:
        chosen = report.plan
        stdout.out(f"budget {format_bytes(available)}: {'scnas search' if search else 'scnas train'} would run with "
                   f"checkpointing {chosen['checkpoint']}, micro-batch {chosen['micro_batch']} (peak "
                   f"{format_bytes(chosen['predicted_peak_bytes'])})"
                   + (f"; the largest stem that fits so is {'at least ' if report.largest_stem_is_a_bound else ''}"
                      f"{report.largest_stem}" if report.largest_stem else ""))
    if output:
        atomic_write_text(output, json.dumps(report.to_dict(), indent=2) + "\n")
        stdout.out(f"wrote {output}")
    if available is not None and report.refusal:
        raise typer.Exit(1)
