"""``scnas train``, ``scnas predict``, ``scnas evaluate``: from a genotype to a segmentation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from scnas import defaults as D
from scnas.cli import options
from scnas.cli.app import app, settings_error, stderr, stdout


@app.command()
def train(
    ctx: typer.Context,
    genotype_path: str = typer.Argument(..., metavar="GENOTYPE", help="Genotype file or built-in name."),
    data: Optional[str] = typer.Option(None, "--data", help="Task folder (prepared once into its shared cache, $SCNAS_CACHE) or prepared cache "
                                                            "(not needed with --resume)."),
    output: str = typer.Option(..., "-o", "--output", help="Run folder: models, metrics, plot, checkpoint."),
    fold: int = typer.Option(D.FOLD, "--fold", min=0, help="Cross-validation fold (validation = its 'val' cases)."),
    stem: int = typer.Option(D.STEM_TRAIN, "--stem", min=1, help="Stem channels (paper: 68)."),
    patch: tuple[int, int, int] = typer.Option(D.PATCH, "--patch", help="Patch size D H W (multiples of 8)."),
    batch_size: int = typer.Option(D.TRAIN_BATCH_SIZE, "--batch-size", min=1, help="Patches per step over all processes (paper: 8); a "
                                                                   "multiple of the process count."),
    micro_batch: Optional[int] = options.MICRO_BATCH,
    checkpoint: Optional[str] = options.CHECKPOINT,
    gpu_memory: Optional[str] = options.GPU_MEMORY,
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="At most this many epochs (paper: 500)."),
    steps: int = typer.Option(D.STEPS_PER_EPOCH, "--steps-per-epoch", min=1),
    lr: float = typer.Option(D.TRAIN_LR, "--lr", help="Adam learning rate (paper: 3e-4; /5 after a 30-epoch plateau)."),
    spacing: Optional[tuple[float, float, float]] = typer.Option(
        None, "--spacing", help="Target spacing (mm) when --data is a task folder [default: 0.7 0.7 0.7]; a prepared "
                                "cache has its own (another is refused)."),
    loss: str = options.LOSS,
    seed: int = typer.Option(D.SEED, "--seed"),
    workers: str = typer.Option(D.WORKERS, "--workers", help="Data loader processes: a number, or auto (on CUDA one "
                                                          "per core, one core left for training; on the CPU none)."),
    device: str = options.DEVICE,
    amp: str = options.AMP,
    compile: bool = options.COMPILE,
    deep_supervision: bool = options.DEEP_SUPERVISION,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT (its settings and genotype; --epochs "
                                                        "may extend, --checkpoint, --micro-batch, --gpu-memory, "
                                                        "--workers, --device, --compile may change; another setting "
                                                        "given with a different value is refused)."),
) -> None:
    """Train the network of a genotype from scratch with the paper's retraining settings.

    Input channels and classes follow the dataset, so a genotype found on one task transfers
    to another. Writes model.safetensors (the last epoch's: the one to score on the fold's
    validation cases) and model_best.safetensors (best validation Dice, so selected on those
    cases: 'scnas predict --validation-of' refuses it), with the preprocessing inside, so
    'scnas predict' needs nothing else.

    Before the first step the memory of a step is predicted (see 'scnas plan'): checkpointing
    and micro-batch are chosen to fit the GPU, or the setting is refused with one that fits.
    Example, the paper's retraining on one 24 GiB GPU:
    scnas train found.yaml --data Task01_BrainTumour --batch-size 8 --stem 68 -o runs/f0
    """
    from pydantic import ValidationError

    from scnas.genotype import genotype_from_data, load_genotype
    from scnas.train import TrainConfig, TrainError, run_training
    from scnas.engine.runs import read_run_config

    run = Path(output)
    given = dict(data=data, fold=fold, stem=stem, patch=patch, batch_size=batch_size, epochs=epochs or 500,
                 steps_per_epoch=steps, lr=lr, spacing=spacing, seed=seed, workers=workers, device=device, amp=amp,
                 loss=loss, compile=compile, deep_supervision=deep_supervision, **options.fitting_overrides(checkpoint, micro_batch, gpu_memory))
    try:
        if resume:
            saved = run / "config.json"
            if not saved.exists():
                raise TrainError("has no config.json: nothing to resume", source=str(run))
            stored = read_run_config(saved, "train", "genotype")
            config = options.resume_settings(ctx, given, {"steps_per_epoch": "steps"}, saved=stored["train"],
                                             make_config=TrainConfig.model_validate, run=run, error=TrainError)
            genotype = genotype_from_data(stored["genotype"], source=str(saved))
            _check_resumed_genotype(genotype, genotype_path, run)
        else:
            if data is None:
                raise TrainError("--data is required (a task folder or a prepared cache)")
            genotype = load_genotype(genotype_path)
            config = TrainConfig(**given)
    except ValidationError as exc:
        raise settings_error(exc, TrainError) from None
    result = run_training(genotype, config, run, resume=resume, on_epoch=lambda r: stdout.out(
        f"epoch {r['epoch']}: training loss {r['train_loss']:.4f}, validation Dice {r['val_dice']:.3f}, lr {r['lr']:.2g}"),
        say=stderr.out)
    stdout.out(f"trained {result.epochs_done} epoch(s) ({result.plan.describe()}); validation Dice of the last "
               f"epoch {result.history[-1]['val_dice'] if result.history else float('nan'):.3f} (best "
               f"{result.best_dice:.3f}); model: {run / 'model.safetensors'} (last epoch; "
               f"model_best.safetensors was selected on the validation cases: never score it on them)")


@app.command()
def predict(
    model_path: str = typer.Argument(..., metavar="MODEL", help="model.safetensors from 'scnas train', or its .onnx."),
    inputs: str = typer.Option(..., "-i", "--input", help="A NIfTI image, or a folder of them (CASE_0000.nii.gz, "
                                                          "CASE_0001.nii.gz, ... are the channels of one case)."),
    output: str = typer.Option(..., "-o", "--output", help="Folder for the label maps (CASE.nii.gz)."),
    backend: str = options.choice(D.BACKEND, "--backend", D.BACKEND_CHOICES,
                                  help="torch (.safetensors) or onnxruntime (.onnx)."),
    device: str = options.choice(D.DEVICE, "--device", D.DEVICE_CHOICES, help="auto (CUDA when available), cpu or cuda. On a GPU windows "
                                                        "are cut, mirrored, predicted and blended on the device."),
    overlap: float = typer.Option(D.OVERLAP, "--overlap", min=0.0, max=0.95, help="Window overlap (paper: 0.5)."),
    tta: bool = typer.Option(False, "--tta", help="Average over the 8 mirrorings (slower, slightly better)."),
    batch_size: int = typer.Option(D.PREDICT_BATCH_SIZE, "--batch-size", min=1, help="Windows per forward pass."),
    amp: str = options.choice(D.AMP, "--amp", D.AMP_CHOICES, help="torch backend: fp16 or bf16 autocast, off for exact float32; auto: "
                                                  "fp16 on CUDA, off on CPU (fp16 runs there too, emulated and slower)."),
    compile: bool = options.COMPILE,
    validation_of: Optional[str] = typer.Option(None, "--validation-of", metavar="RUN",
                                                help="Only the validation cases of this training run (its fold), "
                                                     "for cross-validation. MODEL must be that run's last-epoch "
                                                     "model (model.safetensors or its ONNX export): a model "
                                                     "selected on those cases, or trained on another fold, is "
                                                     "refused."),
) -> None:
    """Segment images: preprocessing from the model's metadata, sliding-window inference with
    Gaussian weighting, labels mapped back to the original grid, the input's affine and header."""
    from scnas.build.model_file import read_any_model_info
    from scnas.train import predict_folder
    from scnas.train.trainer import check_unselected

    only = None
    if validation_of:
        only = _validation_cases(validation_of)
        check_unselected(read_any_model_info(model_path).metadata, only, model_path)
    written = predict_folder(model_path, inputs, output, backend=backend, device=device, overlap=overlap, tta=tta,
                             batch_size=batch_size, only=only, amp=amp,
                             compile=compile, say=stderr.out)
    stdout.out(f"wrote {len(written)} segmentation(s) to {output}")


@app.command()
def evaluate(
    predictions: str = typer.Argument(..., metavar="PRED_FOLDER"),
    truth: str = typer.Argument(..., metavar="GT_FOLDER"),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated label values (default: every "
                                                                "nonzero value in the ground truth)."),
    output: Optional[list[str]] = typer.Option(None, "-o", "--output", help="Also write .csv and/or .json."),
    validation_of: Optional[str] = typer.Option(None, "--validation-of", metavar="RUN",
                                                help="Only the validation cases of this training run (its fold)."),
) -> None:
    """Dice per class and case, paired by file name, and the means.

    A class absent from both prediction and truth of a case counts as undefined (NaN) and is
    left out of the means (nnU-Net's convention); absent from one only, its Dice is 0.
    """
    from scnas.train import evaluate_folders, write_evaluation

    wanted = [int(v) for v in labels.split(",")] if labels else None
    result = evaluate_folders(predictions, truth, wanted,
                              cases=_validation_cases(validation_of) if validation_of else None)
    table = Table("case", *[f"Dice {label}" for label in result.labels])
    for case, scores in result.cases.items():
        table.add_row(case, *[f"{scores[label]:.4f}" for label in result.labels])
    table.add_row("mean", *[f"{value:.4f}" for value in result.mean().values()], style="bold")
    stdout.print(table)
    stdout.out(f"mean Dice over classes: {result.overall():.4f} ({len(result.cases)} cases)")
    for path in output or []:
        write_evaluation(result, path)
        stdout.out(f"wrote {path}")


def _check_resumed_genotype(genotype, given: str, run: Path) -> None:
    """Refuse to resume a training run with a GENOTYPE other than the one it trains."""
    from scnas.genotype import load_genotype, short_hash
    from scnas.train import TrainError

    other = load_genotype(given)
    if short_hash(other) != short_hash(genotype):
        raise TrainError(f"--resume continues the run with its own genotype ({short_hash(genotype)}), but GENOTYPE "
                         f"{given} is another one ({short_hash(other)}): give the run's genotype, or start a new run in "
                         "another folder", source=str(run))


def _validation_cases(run: str) -> list[str]:
    """The validation cases of a 'scnas train' run folder."""
    from scnas.train import TrainError

    config = Path(run) / "config.json"
    if not config.exists():
        raise TrainError("has no config.json (not a 'scnas train' run folder)", source=run)
    try:
        return list(json.loads(config.read_text())["cases"]["validation"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise TrainError("has no list of validation cases (cases.validation)", source=str(config)) from None
