"""``scnas data phantom | prepare | check``: from a task folder to a preprocessed cache."""

from __future__ import annotations

from typing import Optional

import typer

from scnas import defaults as D
from scnas.cli import options
from scnas.cli.app import app, stderr, stdout

data_app = typer.Typer(help="Datasets: synthetic phantoms, preprocessing into a cache, checks.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("phantom")
def phantom(
    out: str = typer.Argument(..., metavar="OUT", help="Folder to create (an MSD-layout task folder)."),
    cases: int = typer.Option(20, "--cases", min=1, help="Number of training cases."),
    channels: int = typer.Option(4, "--channels", min=1, max=8, help="Image channels (modalities)."),
    classes: int = typer.Option(4, "--classes", min=2, max=9, metavar="K", help="Classes including background, as 'scnas build "
                                                                   "--classes', nnU-Net's labels and MONAI's "
                                                                   "out_channels count them: labels 0..K-1, K-1 nested "
                                                                   "blobs (it used to count the blobs: add one to an old "
                                                                   "command)."),
    shape: tuple[int, int, int] = typer.Option((48, 48, 24), "--shape", help="Voxels per axis."),
    spacing: tuple[float, float, float] = typer.Option((1.0, 1.0, 2.5), "--spacing", help="Voxel size in mm (anisotropic "
                                                                                          "by default)."),
    seed: int = typer.Option(D.SEED, "--seed", help="The same seed writes the same dataset."),
    layout: str = options.choice(D.LAYOUT, "--layout", D.LAYOUT_CHOICES, help="msd (4D images, MSD v1 dataset.json) or nnunetv2 "
                                                       "(one file per channel)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Write a synthetic dataset a small network can learn to segment (for demos and tests)."""
    from scnas.data import write_phantom_dataset

    path = write_phantom_dataset(out, cases, channels, foreground_classes=classes - 1, shape=shape,
                                 spacing=spacing, seed=seed, layout=layout, force=force)
    stdout.out(f"wrote {path}: {cases} cases, {channels} channels, {classes} classes (labels 0..{classes - 1}), "
               f"shape {shape}, spacing {spacing}")


@data_app.command("prepare")
def prepare(
    dataset: str = typer.Argument(..., metavar="DATASET", help="Task folder with dataset.json (MSD or nnU-Net v2)."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Cache folder to write (default: the task's "
                                                                     "shared cache under $SCNAS_CACHE or ~/.cache/scnas, "
                                                                     "which search, train and cv find by themselves)."),
    spacing: tuple[float, float, float] = typer.Option(D.SPACING, "--spacing", help="Target voxel size in mm "
                                                                                          "(paper: 0.7 isotropic)."),
    workers: str = typer.Option(D.WORKERS, "--workers", help="Processes preparing cases in parallel: a number, or auto "
                                                          "(one per usable core; each needs about 3x a prepared "
                                                          "case's float32 size in memory: 0.8 GB for BraTS at 0.7 mm)."),
    dtype: str = options.choice(D.IMAGE_DTYPE, "--dtype", D.IMAGE_DTYPE_CHOICES, help="Image storage: float16 (half the bytes, ~3 significant "
                                                         "digits of the z-scores) or float32 (lossless)."),
    force: bool = typer.Option(False, "--force", help="Prepare every case again (and replace other settings)."),
    splits: Optional[str] = typer.Option(None, "--splits", help="A splits_final.json to use instead of nnU-Net's "
                                                                "5 folds (seed 12345 over the sorted case IDs)."),
) -> None:
    """Crop to the nonzero region, resample (cubic; labels per-label linear), z-normalise per
    channel; store compressed chunked arrays (Blosc2, read a patch at a time) and the records
    needed to map predictions back.

    Cases already prepared with the same settings are skipped, after checking every file
    against the size and checksum recorded with it: a damaged case (truncated, deleted, a
    flipped byte) is named and prepared again. A cache made with other settings is refused.
    Writes splits_final.json beside the cases, as nnU-Net does.
    """
    from scnas.data import PrepareSettings, prepare_dataset
    from scnas.data.cache import shared_cache_folder
    from scnas.data.preprocess import resolve_workers

    settings = PrepareSettings(target_spacing=spacing, image_dtype=dtype)
    target = output or shared_cache_folder(dataset, settings)
    report = prepare_dataset(dataset, target, settings, workers=resolve_workers(workers), force=force,
                             splits_file=splits)
    for line in report.damaged:
        stderr.out(f"prepared again: {line}")
    rate = len(report.prepared) / report.seconds if report.seconds > 0 and report.prepared else 0.0
    stdout.out(f"prepared {len(report.prepared)} case(s), skipped {len(report.skipped)} already prepared, in "
               f"{report.seconds:.1f} s ({rate:.2f} cases/s, {report.input_bytes / 2**20 / max(report.seconds, 1e-9):.1f} "
               f"MB/s of input) -> {report.cache}")


@data_app.command("check")
def check(dataset: str = typer.Argument(..., metavar="DATASET", help="Task folder with dataset.json.")) -> None:
    """Read every case and report every problem (one line each); exit 1 if there is any.

    Checks: referenced files exist and read (truncated or non-gzip files), the size a header
    declares against the file (and memory) before reading, image and label shape and affine
    (a singular affine is refused), channel count, training entries without a label,
    undeclared label values, non-integer labels, NaN/Inf voxels, all-zero images, 2D images
    and zero-size axes. dataset.json's label values must be 0..K-1.
    """
    from scnas.data import check_dataset

    count, lines = check_dataset(dataset)
    for line in lines:
        stdout.out(line)
    problems = [line for line in lines if "(allowed" not in line]
    stdout.out(f"{count} case(s) checked: {len(problems)} problem(s)" +
               (f", {len(lines) - len(problems)} note(s)" if len(lines) > len(problems) else ""))
    if problems:
        raise typer.Exit(1)
