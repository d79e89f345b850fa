"""``scnas nnunet-plans`` and ``scnas nnunet-import``: train a genotype with nnU-Net v2's own
commands, and bring the trained network back as a scnas model file."""

from __future__ import annotations

import json
from typing import Optional

import typer

from scnas.cli import options
from scnas.cli.app import app, stdout

NEEDS_NNUNET = "needs nnU-Net v2: pip install 'scnas[nnunet]' (nnunetv2 2.8)"


def _require_nnunet() -> None:
    from scnas.integrations.nnunet import NNUNetError

    try:
        import nnunetv2  # noqa: F401
    except ImportError:
        raise NNUNetError(NEEDS_NNUNET) from None


@app.command("nnunet-plans")
def nnunet_plans_command(
    plans: str = typer.Argument(..., metavar="PLANS.json", help="nnU-Net v2 plans file, as nnUNetv2_plan_and_preprocess "
                                                                "wrote it (nnUNet_preprocessed/DatasetXXX_Name/"
                                                                "nnUNetPlans.json)."),
    genotype_path: str = typer.Argument(..., metavar="GENOTYPE", help="Genotype file or built-in name."),
    stem: Optional[int] = typer.Option(None, "--stem", min=1, help="Stem channels of the network (level-l cells are "
                                                                   "stem * 2**l wide)."),
    match: bool = typer.Option(False, "--match-flops", help="Instead of --stem: the stem whose FLOPs at the plans' "
                                                            "patch size are nearest to those of nnU-Net's own planned "
                                                            "network for the base configuration (both counted by "
                                                            "torch's FLOP counter, inference, batch 1)."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="The plans copy to write [default: PLANS_scnas.json "
                                                                      "beside PLANS]; its name without .json is "
                                                                      "nnU-Net's -p."),
    name: str = typer.Option("3d_fullres_scnas", "--name", help="Name of the new configuration (nnU-Net's CONFIG)."),
    base: str = typer.Option("3d_fullres", "--base", help="The 3D configuration whose preprocessed data, patch and "
                                                         "batch size the new one inherits (inherits_from)."),
    depth: Optional[int] = typer.Option(None, "--depth", min=1, max=8, help="Down-samplings [default: as many as "
                                                                           "nnU-Net planned]; needed where nnU-Net "
                                                                           "planned anisotropic strides: the patch "
                                                                           "must divide by 2**depth."),
    dataset_json: Optional[str] = typer.Option(None, "--dataset-json", help="The dataset.json giving channels and "
                                                                            "labels [default: beside PLANS]."),
    upsampling: str = options.UPSAMPLING,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Add a configuration that trains GENOTYPE's network to a copy of an nnU-Net v2 plans file.

    The configuration inherits from --base (3d_fullres), so nnU-Net trains on the data it has
    already preprocessed: no new preprocessing. Its architecture block names
    scnas.integrations.nnunet.SCNASUNetForNNUNet with the genotype inline, so the plans file is
    self-contained. Then train and predict with nnU-Net's own commands, e.g.

      scnas nnunet-plans $nnUNet_preprocessed/Dataset001_BrainTumour/nnUNetPlans.json found.yaml --match-flops

      nnUNetv2_train Dataset001_BrainTumour 3d_fullres_scnas 0 -p nnUNetPlans_scnas

    Refused (exit 1, nothing written): a file that is not an nnU-Net v2 (>= 2.4) plans file, a 2D
    base configuration, strides the cells cannot take (every down-sampling halves all three
    axes; see --depth), a patch not divisible by 2**depth.
    """
    from scnas.genotype import load_genotype, short_hash
    from scnas.integrations.nnunet import NNUNetError, write_nnunet_plans

    _require_nnunet()
    genotype = load_genotype(genotype_path)
    edit = write_nnunet_plans(plans, genotype, output, stem_channels=stem, match_nnunet_flops=match,
                              configuration=name, base=base, depth=depth, dataset_json=dataset_json,
                              upsampling=upsampling)
    if as_json:
        stdout.out(json.dumps({"plans": str(edit.output), "configuration": edit.configuration, "base": edit.base,
                               "dataset": edit.dataset, "plans_identifier": edit.plans_identifier,
                               "genotype_hash": short_hash(genotype), "stem": edit.stem_channels, "depth": edit.depth,
                               "patch": list(edit.patch), "in_channels": edit.in_channels,
                               "num_classes": edit.num_classes, "params": edit.params, "flops": edit.flops,
                               "nnunet_params": edit.nnunet_params, "nnunet_flops": edit.nnunet_flops,
                               "train_command": edit.train_command}, indent=2))
        return
    if edit.nnunet_flops is not None:
        stdout.out(f"--match-flops: stem {edit.stem_channels} gives {edit.flops / 1e9:.2f} GFLOPs, "
                   f"{edit.flops / edit.nnunet_flops - 1:+.1%} from nnU-Net's {edit.base} network "
                   f"({edit.nnunet_flops / 1e9:.2f} GFLOPs, {edit.nnunet_params:,} parameters) at patch "
                   f"{'x'.join(map(str, edit.patch))}")
    stdout.out(f"configuration {edit.configuration} (inherits {edit.base}): genotype {short_hash(genotype)}, stem "
               f"{edit.stem_channels}, depth {edit.depth}, {edit.in_channels} -> {edit.num_classes} channels, "
               f"{edit.params:,} parameters (deep-supervision heads included), {edit.flops / 1e9:.2f} GFLOPs at "
               f"{'x'.join(map(str, edit.patch))}")
    stdout.out(f"wrote {edit.output}")
    from pathlib import Path

    if Path(edit.output).resolve().parent != Path(plans).resolve().parent:
        stdout.out(f"nnU-Net reads -p {edit.plans_identifier} from its preprocessed dataset folder: move the file to "
                   f"{Path(plans).resolve().parent}")
    stdout.out(f"train with: {edit.train_command}")


@app.command("nnunet-import")
def nnunet_import_command(
    checkpoint: str = typer.Argument(..., metavar="CHECKPOINT", help="nnU-Net's checkpoint_final.pth (or _best) of a "
                                                                     "configuration written by 'scnas nnunet-plans'."),
    output: str = typer.Option(..., "-o", "--output", help="The scnas model file (.safetensors) to write."),
) -> None:
    """Turn the network nnU-Net trained into a scnas model file (for scnas info, export-onnx, draw).

    The checkpoint is read with torch.load(weights_only=True): tensors, plain containers and
    numpy scalars only, never code. nnU-Net's preprocessing is not recorded (it is not scnas's);
    predict with nnUNetv2_predict, or export the network with scnas export-onnx.
    """
    from scnas.genotype import short_hash
    from scnas.integrations.nnunet import checkpoint_to_model_file

    model = checkpoint_to_model_file(checkpoint, output)
    config = model.config
    stdout.out(f"genotype {short_hash(model.genotype)}, stem {config.stem_channels}, depth {config.depth}, "
               f"{config.in_channels} -> {config.num_classes} channels, "
               f"{sum(p.numel() for p in model.parameters()):,} parameters")
    stdout.out(f"wrote {output}")
