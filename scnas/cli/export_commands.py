"""``scnas export-onnx``, ``scnas info`` and ``scnas draw``: what leaves scnas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from scnas import defaults as D
from scnas.cli import options
from scnas.cli.app import app, stdout

MODEL_SUFFIXES = (".safetensors", ".onnx")


def _is_model_file(spec: str) -> bool:
    return spec.lower().endswith(MODEL_SUFFIXES)


@app.command("export-onnx")
def export_onnx_command(
    model_path: str = typer.Argument(..., metavar="MODEL", help="A model file (.safetensors), or a genotype (file or "
                                                                "built-in name) with the build options below "
                                                                "for an untrained export."),
    output: str = typer.Option(..., "-o", "--output", help="The .onnx file to write (one self-contained file)."),
    fp16: bool = typer.Option(False, "--fp16", help="Convert the verified graph to float16 inside (inputs and outputs "
                                                    "stay float32) for GPU inference; checked for precision."),
    provider: str = options.choice(D.ONNX_PROVIDER, "--provider", D.ONNX_PROVIDER_CHOICES, help="Verify on this onnxruntime execution provider: "
                                                           "cpu, cuda or tensorrt."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the file in onnxruntime against PyTorch."),
    stem: int = typer.Option(D.STEM_TRAIN, "--stem", min=1, help="For a genotype: stem channels."),
    in_channels: int = options.in_channels_option("For a genotype: "),
    classes: int = options.classes_option("For a genotype: "),
    depth: int = typer.Option(D.DEPTH, "--depth", min=1, max=8, help="For a genotype: down-samplings."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Export a network to ONNX with dynamic batch and spatial axes, and verify it.

    The genotype, build settings and preprocessing travel in the ONNX metadata, so the file
    alone is enough to predict. Verification: onnx.checker, then onnxruntime against PyTorch
    at two input shapes; the file is written only if max|onnx - torch| <= 1e-4 + 1e-3 x
    max|torch|. With --fp16, the float16 graph must also keep >= 95% of voxel labels and stay
    within 0.25 x max|torch| (untrained networks are poorly conditioned in half precision).
    Exit 1 otherwise.
    """
    from scnas.build import BuildConfig, build_network, load_model, read_model_info
    from scnas.export import export_onnx
    from scnas.genotype import load_genotype

    if _is_model_file(model_path):
        if model_path.lower().endswith(".onnx"):
            from scnas.export import ExportError
            raise ExportError("is already an ONNX file; export from the .safetensors model file", source=model_path)
        info = read_model_info(model_path)
        model, preprocessing = load_model(model_path), info.preprocessing
        carried = {key: info.metadata[key] for key in ("training",) if key in info.metadata}
    else:
        config = BuildConfig(stem_channels=stem, in_channels=in_channels, num_classes=classes, depth=depth)
        model, preprocessing, carried = build_network(load_genotype(model_path), config), None, {}
    report = export_onnx(model, output, preprocessing=preprocessing, fp16=fp16, verify=verify, provider=provider,
                         metadata=carried)
    if as_json:
        stdout.out(json.dumps(report.to_dict(), indent=2))
        return
    stdout.out(f"exported in {report.export_seconds:.1f} s: {output} ({report.file_bytes / 2**20:.1f} MiB, opset "
               f"{report.opset}, {report.dtype})")
    for check in report.checks:
        stdout.out(f"  onnxruntime {report.provider} {check.dtype} vs torch float32 at {'x'.join(map(str, check.shape))}: "
                   f"max abs {check.max_abs:.2e}, max rel {check.max_rel:.2e}, labels agree {check.label_agreement:.2%}"
                   f"  {'ok' if check.passed else 'FAILED'}")
    if not verify:
        stdout.out("  not verified (--no-verify)")


@app.command()
def info(
    model_path: str = typer.Argument(..., metavar="MODEL", help="A .safetensors model file or an .onnx file."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Print what a model file says about itself: genotype, build settings, preprocessing."""
    from scnas.build.model_file import read_any_model_info
    from scnas.genotype import short_hash

    model = read_any_model_info(model_path)
    data = {"file": model_path, "scnas_version": model.scnas_version, "genotype_hash": short_hash(model.genotype),
            "nodes": model.genotype.nodes, "build_config": model.config.model_dump(),
            "preprocessing": model.preprocessing, "dtype": model.metadata.get("dtype", "float32")}
    if as_json:
        stdout.out(json.dumps({**data, "genotype": model.genotype.to_dict()}, indent=2))
        return
    for key, value in data.items():
        stdout.out(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")


@app.command()
def draw(
    source: str = typer.Argument(..., metavar="GENOTYPE|MODEL", help="A genotype (file or built-in name) or a model "
                                                                     "file (.safetensors, .onnx)."),
    output: str = typer.Option(..., "-o", "--output", help="cells.svg, .png, .pdf or .dot (.dot needs no Graphviz)."),
    cell: Optional[str] = typer.Option(None, "--cell", help="Draw only this cell (encoder_normal, reduction, "
                                                            "decoder_normal, expansion)."),
    alpha: bool = typer.Option(False, "--alpha", help="Draw every candidate edge of a searched genotype as one arrow "
                                                      "labelled with its two likeliest ops and their softmax(alpha) "
                                                      "(* marks the chosen op), as thick as the likeliest."),
    network: bool = typer.Option(False, "--network", help="Draw the whole U-Net instead of the cells."),
    stem: int = typer.Option(D.STEM_TRAIN, "--stem", min=1, help="With --network and a genotype: stem channels."),
    depth: int = typer.Option(D.DEPTH, "--depth", min=1, max=8, help="With --network and a genotype: down-samplings."),
    in_channels: int = options.in_channels_option("With --network and a genotype: "),
    classes: int = options.classes_option("With --network and a genotype: "),
) -> None:
    """Draw the cells of a genotype as in the paper's Figure 2, or the whole network (Figure 1).

    Cells: inputs c_{k-2} and c_{k-1}, the intermediate nodes, the output c_{k}; edges labelled
    with their operation and coloured by family (convolutions blue, pooling green, identity
    grey); dead nodes dashed.
    """
    from scnas.build.model_file import read_any_model_info
    from scnas.export import cells_graph, network_graph, write_drawing
    from scnas.genotype import load_genotype

    if _is_model_file(source):
        model = read_any_model_info(source)
        genotype, config = model.genotype, model.config
    else:
        from scnas.build import BuildConfig
        genotype, config = load_genotype(source), BuildConfig(stem_channels=stem, depth=depth, in_channels=in_channels,
                                                              num_classes=classes)
    if network:
        graph = network_graph(genotype, config)
    else:
        graph = cells_graph(genotype, [cell] if cell else None, alpha=alpha, title=f"{Path(source).name}")
    write_drawing(graph, output)
    stdout.out(f"wrote {output}")


@app.command("export-bundle")
def export_bundle_command(
    model_path: str = typer.Argument(..., metavar="MODEL", help="A model file written by 'scnas train' "
                                                                "(.safetensors, with its preprocessing)."),
    output: str = typer.Option(..., "-o", "--output", help="The bundle folder to create; an existing one is refused."),
    onnx: bool = typer.Option(False, "--onnx", help="Also write models/model.onnx, verified in onnxruntime against "
                                                    "PyTorch as 'scnas export-onnx' does (10-20 s more)."),
) -> None:
    """Write a MONAI bundle that segments NIfTI images as 'scnas predict' does.

    configs/inference.json builds the network from the genotype written inline, repeats the
    model's preprocessing with MONAI transforms (crop to the nonzero box, z-score in the nonzero
    mask, resampling to the target spacing), slides windows of the model's patch over each
    image (a SlidingWindowInferer placing and blending them as scnas does) and writes each
    case's labels on its own grid; models/model.pt holds the weights. Its labels equal those of
    'scnas predict' (docs/integrations.md). Run it with MONAI (the monai extra of scnas):

    python -m monai.bundle run --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE
    --dataset_dir IMAGES --output_dir PREDICTIONS
    """
    from scnas.integrations.monai_bundle import export_bundle

    report = export_bundle(model_path, output, onnx=onnx, say=stdout.out)
    stdout.out(f"wrote MONAI bundle {output} in {report.seconds:.1f} s: {', '.join(report.files)}")
    if report.onnx is not None:
        for check in report.onnx.checks:
            stdout.out(f"  models/model.onnx: onnxruntime {check.dtype} vs torch at {'x'.join(map(str, check.shape))}: "
                       f"max abs {check.max_abs:.2e}, labels agree {check.label_agreement:.2%}")
    stdout.out(f"run it: python -m monai.bundle run --config_file {output}/configs/inference.json --bundle_root {output} "
               "--dataset_dir IMAGES --output_dir PREDICTIONS")
