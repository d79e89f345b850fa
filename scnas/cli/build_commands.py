"""``scnas build``: a genotype plus a channel width becomes a network; print its size and cost."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from scnas import defaults as D
from scnas.cli import options
from scnas.cli.app import app, stdout
from scnas.genotype import load_genotype, short_hash


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


@app.command()
def build(
    genotype_path: str = typer.Argument(..., metavar="GENOTYPE", help="Genotype file or built-in name."),
    stem: int = typer.Option(D.STEM_TRAIN, "--stem", min=1, help="Stem channels; level-l cells are stem * 2**l wide "
                                                      "(paper: 48 for search, 68 for retraining)."),
    in_channels: int = options.in_channels_option(),
    classes: int = options.classes_option(),
    depth: int = typer.Option(D.DEPTH, "--depth", min=1, max=8, help="Down-samplings; patch sizes must be multiples of 2**depth."),
    upsampling: str = options.UPSAMPLING,
    deep_supervision: bool = typer.Option(D.DEEP_SUPERVISION, "--deep-supervision", help="Add 1x1x1 heads on coarser "
                                                                                      "decoder cells (trained by 'scnas train --deep-supervision')."),
    patch: tuple[int, int, int] = typer.Option(D.PATCH, "--patch", help="D H W of the input for the cost figures."),
    batch: int = typer.Option(1, "--batch", min=1, help="Batch size for the memory estimate."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Write a model file (.safetensors) with "
                                                                      "freshly initialised weights."),
    seed: int = typer.Option(D.SEED, "--seed", help="Seed of the initial weights written with -o: the same seed gives the "
                                               "same weights (with the same torch on the same kind of CPU)."),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON instead of tables."),
    match: Optional[str] = typer.Option(None, "--match-flops", metavar="REF",
                                        help="Choose the stem (instead of --stem) whose FLOPs are nearest to REF's: "
                                             "a genotype at a stem (uresnet@68; same channels, classes, depth and "
                                             "patch) or FLOPs (425G). How the paper sized its cells against "
                                             "U-ResNet."),
) -> None:
    """Build the 3D U-Net of a genotype and report parameters, MACs, FLOPs and activation memory.

    The figures come from a shape-only (meta device) pass, so they take seconds even at
    128^3. Example: scnas build uresnet --stem 68 --in-channels 4 --classes 3 --patch 128 128 128
    To compare cells at equal cost: scnas build found.yaml --match-flops uresnet@68
    """
    import torch

    from scnas.build import BuildConfig, BuildError, build_network, network_stats, save_model

    genotype = load_genotype(genotype_path)
    config = BuildConfig(stem_channels=stem, in_channels=in_channels, num_classes=classes, depth=depth,
                         upsampling=upsampling, deep_supervision=deep_supervision)
    matched = None
    if match:
        from scnas.build.stats import match_flops, parse_flops_reference

        target, described = parse_flops_reference(match, config, patch)
        stem, flops = match_flops(genotype, target, config, patch=patch)
        config = config.model_copy(update={"stem_channels": stem})
        matched = {"reference": described, "reference_flops": target, "stem": stem, "flops": flops,
                   "difference": flops / target - 1}
    stats = network_stats(genotype, config, patch, batch=batch)
    if output:
        from scnas.build.memory_plan import physical_memory_bytes
        from scnas.byte_sizes import format_bytes

        host = physical_memory_bytes()
        if host is not None and 4 * stats.params > host // 2:   # refused before allocating a single weight
            raise BuildError(f"-o {output}: stem {stem} gives {stats.params:,} parameters, {format_bytes(4 * stats.params)} "
                             f"of float32 weights to initialise and write; this machine has {format_bytes(host)} "
                             "(at most half is used): use a smaller --stem")
        with torch.random.fork_rng(devices=[]):   # seeded here only: the caller's global RNG state is left as it was
            torch.manual_seed(seed)
            network = build_network(genotype, config)
        save_model(network, output)
    if as_json:
        stdout.out(json.dumps({"genotype": genotype_path, **stats.to_dict(), "model_file": output,
                               **({"match_flops": matched} if matched else {})}, indent=2))
        return
    if matched:
        stdout.out(f"--match-flops: stem {stem} gives {matched['flops'] / 1e9:.2f} GFLOPs, "
                   f"{matched['difference']:+.1%} from {matched['reference']} ({matched['reference_flops'] / 1e9:.2f} "
                   "GFLOPs); the nearest stem")
    stdout.print(f"[bold]{genotype_path}[/] (hash {short_hash(genotype)}, {genotype.nodes} nodes per cell), "
                 f"stem {stem}, in {in_channels}, classes {classes}, depth {depth}, {upsampling} upsampling")
    cells = Table("cell", "level", "node width", "out channels", "params", "GMACs", title="cells",
                  title_justify="left")
    for cell in stats.cells:
        cells.add_row(cell.name + ("" if cell.used else " (unused)"), str(cell.level), str(cell.node_width), str(cell.out_channels),
                      f"{cell.params:,}", f"{cell.macs / 1e9:.2f}")
    stdout.print(cells)
    levels = Table("level", "resolution", "width", "node width", "params", "GMACs", "train activations",
                   title=f"levels at batch {batch} x {in_channels} x {' x '.join(map(str, stats.patch))}",
                   title_justify="left")
    for level in stats.levels:
        levels.add_row(str(level.level), "x".join(map(str, level.resolution)), str(level.channels),
                       str(level.node_width), f"{level.params:,}", f"{level.macs / 1e9:.2f}", _gib(level.activation_bytes))
    stdout.print(levels)
    stdout.out(f"parameters: {stats.params:,} ({stats.params / 1e6:.2f} M)")
    stdout.out(f"MACs: {stats.macs / 1e9:.2f} G   FLOPs: {stats.flops / 1e9:.2f} G   ({stats.flop_note})")
    stdout.out(f"activation memory: training ~{_gib(stats.train_activation_bytes)}, inference "
               f"~{_gib(stats.inference_activation_bytes)}   ({stats.memory_note})")
    if output:
        stdout.out(f"wrote {output}")
