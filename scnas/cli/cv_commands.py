"""``scnas cv``: the paper's Table-1 protocol, with random genotypes of equal FLOPs beside."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scnas import defaults as D
from scnas.cli import options
from scnas.cli.main import app, settings_error, stdout


@app.command()
def cv(
    ctx: typer.Context,
    genotypes: Optional[list[str]] = typer.Argument(None, metavar="[GENOTYPE[@STEM]]...",
                                                    help="Genotype files or built-in names, optionally at a stem "
                                                         "(found.yaml uresnet@68); the first is the one compared "
                                                         "with the others and the random ones. Leave out to "
                                                         "continue the study in OUT."),
    output: str = typer.Option(..., "-o", "--output", help="Study folder: plan, one job per genotype "
                                                           "and fold, results."),
    data: Optional[str] = typer.Option(None, "--data", help="Task folder (dataset.json; prepared once into "
                                                            "its shared cache, $SCNAS_CACHE), or a prepared cache of one."),
    folds: Optional[str] = typer.Option(None, "--folds", help="Comma-separated folds (default: every fold of the "
                                                              "splits file, nnU-Net's 5)."),
    random: int = typer.Option(0, "--random", min=0, help="Add N seeded random genotypes (2 inputs per node), each "
                                                          "widened to the first genotype's FLOPs, and compare."),
    random_seed: int = typer.Option(0, "--random-seed", help="Seed of the first random genotype (then +1, +2, ...)."),
    stem: int = typer.Option(D.STEM_TRAIN, "--stem", min=1, help="Stem of genotypes given without @STEM (paper: 68)."),
    patch: tuple[int, int, int] = typer.Option(D.PATCH, "--patch", help="Training patch D H W."),
    batch_size: int = typer.Option(D.TRAIN_BATCH_SIZE, "--batch-size", min=1, help="Patches per step (paper: 8)."),
    epochs: int = typer.Option(D.TRAIN_EPOCHS, "--epochs", min=1, help="At most this many epochs per job (paper: 500)."),
    steps: int = typer.Option(D.STEPS_PER_EPOCH, "--steps-per-epoch", min=1),
    lr: float = typer.Option(D.TRAIN_LR, "--lr", help="Adam learning rate (paper: 3e-4)."),
    loss: str = options.LOSS,
    deep_supervision: bool = options.DEEP_SUPERVISION,
    spacing: Optional[tuple[float, float, float]] = typer.Option(None, "--spacing", help="Target spacing for "
                                                                                        "preparing (default 0.7 mm)."),
    seed: int = typer.Option(D.SEED, "--seed", help="Training seed (the same for every job)."),
    device: str = options.DEVICE,
    amp: str = options.AMP,
    shard: Optional[str] = typer.Option(None, "--shard", metavar="i/n|auto",
                                        help="Run only jobs i, i+n, ... of the study (1-based), e.g. one shard "
                                             "per GPU or machine sharing OUT. 'auto' takes i and n from the "
                                             "Slurm job array this runs in (sbatch --array=0-3: 4 shards)."),
    report: bool = typer.Option(False, "--report", help="Only gather the finished jobs into the results (refused "
                                                        "while a job is missing)."),
) -> None:
    """Cross-validate genotypes as in the paper's Table 1, and against random genotypes.

    Every genotype is retrained on every fold; the LAST epoch's model (never one selected on
    validation Dice) predicts the fold's validation cases on their original grid; Dice per
    class is averaged over the fold's cases. The results give mean +- sd over folds per
    genotype and class, the per-fold values (results.md, .csv, .json, .png), and with
    --random N a closing line: did the first genotype beat random genotypes of equal FLOPs,
    on how many folds, and how sure (paired t-test over folds).

    Finished jobs are skipped and a killed one resumes, so the same command continues a
    study. Example: scnas cv found.yaml uresnet --data Task01_BrainTumour --random 5 -o runs/cv
    On 4 GPUs: CUDA_VISIBLE_DEVICES=i scnas cv ... --shard i+1/4, then scnas cv -o runs/cv --report
    As a Slurm job array: sbatch --array=0-3 with 'scnas cv ... --shard auto' (docs/training.md).
    """
    from pydantic import ValidationError

    from scnas.train import TrainConfig
    from scnas.train.cv import CVError, parse_shard, run_study, write_report

    if report:
        write_report(output, say=stdout.out)
        return
    parse_shard(shard)
    try:
        chosen = sorted({int(f) for f in folds.split(",")}) if folds else None
    except ValueError:
        raise CVError(f"--folds {folds!r}: give comma-separated fold numbers, e.g. 0,1,2,3,4") from None
    try:
        train = TrainConfig(data=data or ".", patch=patch, batch_size=batch_size, epochs=epochs, steps_per_epoch=steps,
                            lr=lr, loss=loss, seed=seed, device=device, amp=amp, deep_supervision=deep_supervision)
    except ValidationError as exc:
        raise settings_error(exc, CVError) from None
    # deep_supervision only when asked for: studies begun before it existed continue with the same arguments.
    unset = set() if deep_supervision else {"deep_supervision"}
    settings = train.model_dump(mode="json", exclude={"data", "fold", "stem", "spacing", *unset})
    study = {"data": data, "spacing": list(spacing) if spacing else None, "folds": chosen, "random": random,
             "random_seed": random_seed, "stem": stem}
    request = None
    if genotypes:
        if data is None:
            raise CVError("--data is required to start a study (a task folder or a prepared cache)")
        request = {"genotypes": list(genotypes), **study, "train": settings}
    elif data is not None:
        raise CVError("give the genotypes to cross-validate (or leave --data out to continue the study in OUT)")
    else:
        _refuse_other_settings(ctx, output, study, train.model_dump(mode="json"))
    run_study(output, request, shard, progress=False, say=stdout.out)


_TRAINING_FLAGS = {"patch": "patch", "batch_size": "batch_size", "epochs": "epochs", "steps": "steps_per_epoch",
                   "lr": "lr", "loss": "loss", "deep_supervision": "deep_supervision", "seed": "seed",
                   "device": "device", "amp": "amp"}
"""Parameters of 'scnas cv' that are training settings of the study: parameter -> setting."""


def _refuse_other_settings(ctx, output: str, study: dict, training: dict) -> None:
    """Continuing a study ('scnas cv -o OUT' without genotypes) runs it with its own settings:
    a setting given with another value than the study's is refused, naming both (ignoring
    it silently would run something else than asked)."""
    from scnas.train import TrainConfig
    from scnas.train.cv import CVError, plan_study

    given = {name: ("", name, study[name]) for name in ("folds", "spacing", "random", "random_seed", "stem")
             if options.given_on_command_line(ctx, name)}
    given.update({name: ("train", key, training[key]) for name, key in _TRAINING_FLAGS.items()
                  if options.given_on_command_line(ctx, name)})
    if not given:
        return
    stored = plan_study(Path(output), None, say=lambda _: None)["request"]
    differing = []
    for name, (part, key, value) in given.items():
        # a training setting a study predates (deep_supervision) has its default there
        old = stored["train"].get(key, TrainConfig.model_fields[key].default) if part else stored.get(key)
        if value != old:
            differing.append(f"{options.flag_name(ctx, name)} {options.shown(value)} (the study's: "
                             f"{options.shown(old)})")
    if differing:
        raise CVError(f"continues the study with its own settings, but {'; '.join(differing)} "
                      f"differ{'s' if len(differing) == 1 else ''}: leave {'it' if len(differing) == 1 else 'them'} "
                      "out to continue, or start another study in another folder", source=output)
