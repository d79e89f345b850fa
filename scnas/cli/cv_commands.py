"""``scnas cv``: the paper's Table-1 protocol, with random genotypes of equal FLOPs beside, and
the honest protocol for a search: a search per fold on the fold's training cases."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scnas import defaults as D
from scnas.cli import options
from scnas.cli.app import app, settings_error, stdout


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
    depth: int = typer.Option(D.DEPTH, "--depth", min=1, max=8, help="Down-samplings of every network the study "
                                                                     "trains, and of its searches per fold; patches "
                                                                     "must be multiples of 2**depth."),
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
    search_per_fold: bool = typer.Option(False, "--search-per-fold", rich_help_panel="Search per fold",
                                         help="The honest protocol: on each fold, search on the fold's training "
                                              "cases only, derive, retrain and score the derived genotype there "
                                              "(the first genotype of the study, 'searched'); --random genotypes "
                                              "are matched to each fold's derived genotype's FLOPs."),
    search_stem: int = typer.Option(D.STEM_SEARCH, "--search-stem", min=1, rich_help_panel="Search per fold",
                                    help="Stem channels of the supernet (paper: 48)."),
    search_patch: Optional[tuple[int, int, int]] = typer.Option(None, "--search-patch", rich_help_panel="Search "
                                                                "per fold", help="Search patch D H W (default: --patch)."),
    search_epochs: int = typer.Option(D.SEARCH_EPOCHS, "--search-epochs", min=1, rich_help_panel="Search per fold",
                                      help="Epochs of each search (paper: 200)."),
    search_steps: int = typer.Option(D.STEPS_PER_EPOCH, "--search-steps", min=1, rich_help_panel="Search per fold",
                                     help="Theta/alpha step pairs per search epoch."),
    search_batch_size: int = typer.Option(D.SEARCH_BATCH_SIZE, "--search-batch-size", min=1,
                                          rich_help_panel="Search per fold", help="Patches per search step."),
    alpha_lr: float = typer.Option(D.ALPHA_LR, "--alpha-lr", min=0.0, rich_help_panel="Search per fold",
                                   help="Adam learning rate of alpha (paper: 0.003 for 200 x 250 steps; a short "
                                        "search needs more, see docs/search.md)."),
    nodes: int = typer.Option(D.NODES, "--nodes", min=1, rich_help_panel="Search per fold",
                              help="Intermediate nodes per searched cell (and per random genotype's)."),
    tau_max: float = typer.Option(D.TAU_MAX, "--tau-max", rich_help_panel="Search per fold",
                                  help="Gumbel-softmax temperature at the first search epoch."),
    tau_min: float = typer.Option(D.TAU_MIN, "--tau-min", rich_help_panel="Search per fold",
                                  help="... at the last."),
    warmup_epochs: int = typer.Option(0, "--warmup-epochs", min=0, rich_help_panel="Search per fold",
                                      help="Countermeasure: search epochs that train Theta alone before alpha moves."),
    free_penalty: float = typer.Option(0.0, "--free-penalty", min=0.0, rich_help_panel="Search per fold",
                                       help="Countermeasure: penalty on softmax(alpha)'s mass on parameter-free ops."),
    max_free: Optional[int] = typer.Option(None, "--max-free", min=0, metavar="K", rich_help_panel="Search per fold",
                                           help="Countermeasure: at most K parameter-free ops per derived cell."),
    aux_skip: float = typer.Option(0.0, "--aux-skip", min=0.0, rich_help_panel="Search per fold",
                                   help="Countermeasure (DARTS-): an auxiliary skip on every mixed edge of stride 1, "
                                        "decayed to 0."),
    ops: Optional[str] = typer.Option(None, "--ops", rich_help_panel="Search per fold",
                                      help="Comma-separated vocabulary of the searches and of the random genotypes "
                                           "(default: the paper's eight)."),
    sampling: str = options.choice(D.SAMPLING, "--sampling", D.SAMPLING_CHOICES, rich_help_panel="Search per fold",
                                   help="Operations per edge and step of each search: pair (Algorithm 1), one or "
                                        "full (DARTS)."),
    derive_by: str = options.choice(D.DERIVE_BY, "--derive-by", D.DERIVE_BY_CHOICES, rich_help_panel="Search per fold",
                                    help="Cells of each fold's search by alpha, or by perturbation (scnas derive --by "
                                         "perturbation; best with --sampling full)."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Augment the training patches (and those of "
                                 "the searches per fold); off for a task whose labels follow an exact rule."),
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

    A genotype searched on some of the study's cases scores optimistically on the folds whose
    validation cases its search saw: the report names them and compares on the clean folds
    alone. --search-per-fold runs the honest protocol instead, one search per fold on the
    fold's training cases (resumable and shardable like the jobs, recorded in
    searches/fold_K/search.json): scnas cv --search-per-fold uresnet --data Task
    --search-epochs 50 --alpha-lr 0.03 --random 5 -o runs/cv-honest
    """
    from pydantic import ValidationError

    from scnas.train import TrainConfig
    from scnas.apps.cv import CVError, parse_shard, run_study, write_report

    if report:
        write_report(output, say=stdout.out)
        return
    searching = {"search_stem": search_stem, "search_patch": search_patch, "search_epochs": search_epochs,
                 "search_steps": search_steps, "search_batch_size": search_batch_size, "alpha_lr": alpha_lr,
                 "nodes": nodes, "tau_max": tau_max, "tau_min": tau_min, "warmup_epochs": warmup_epochs,
                 "free_penalty": free_penalty, "max_free": max_free, "sampling": sampling, "derive_by": derive_by,
                 "aux_skip": aux_skip, "ops": options.vocabulary(ops)}
    if not search_per_fold and data is not None:
        stray = [options.flag_name(ctx, name) for name in searching if options.given_on_command_line(ctx, name)]
        if stray:
            raise CVError(f"{', '.join(stray)} set{'s' if len(stray) == 1 else ''} the search of a search per fold: "
                          "add --search-per-fold (or leave it out)")
    parse_shard(shard)
    try:
        chosen = sorted({int(f) for f in folds.split(",")}) if folds else None
    except ValueError:
        raise CVError(f"--folds {folds!r}: give comma-separated fold numbers, e.g. 0,1,2,3,4") from None
    try:
        train = TrainConfig(data=data or ".", patch=patch, depth=depth, batch_size=batch_size, epochs=epochs,
                            steps_per_epoch=steps, lr=lr, loss=loss, seed=seed, device=device, amp=amp,
                            deep_supervision=deep_supervision, augment=augment)
    except ValidationError as exc:
        raise settings_error(exc, CVError) from None
    # deep_supervision only when asked for: studies begun before it existed continue with the same arguments.
    unset = set() if deep_supervision else {"deep_supervision"}
    settings = train.model_dump(mode="json", exclude={"data", "fold", "stem", "spacing", *unset})
    study = {"data": data, "spacing": list(spacing) if spacing else None, "folds": chosen, "random": random,
             "random_seed": random_seed, "stem": stem}
    search = _search_settings(searching, patch, seed) if search_per_fold else None
    # checked before planning: a study of a patch its networks cannot take would fail every job
    from scnas.build import BuildConfig, BuildError
    from scnas.build.network import check_spatial_size

    for flag, size in (("--patch", patch), ("--search-patch", search["patch"] if search else None)):
        try:
            if data is not None and size:
                check_spatial_size(tuple(size), BuildConfig(depth=depth))
        except BuildError as exc:
            raise CVError(f"{flag} {' '.join(map(str, size))} at --depth {depth}: {exc}") from None
    request = None
    if genotypes or (search_per_fold and data is not None):
        if data is None:
            raise CVError("--data is required to start a study (a task folder or a prepared cache)")
        # "search" only with a search per fold: studies begun before it continue with the same arguments.
        request = {"genotypes": list(genotypes or []), **study, "train": settings, **({"search": search} if search
                                                                                      else {})}
    elif data is not None:
        raise CVError("give the genotypes to cross-validate, or --search-per-fold (or leave --data out to continue "
                      "the study in OUT)")
    else:
        _refuse_other_settings(ctx, output, study, train.model_dump(mode="json"), searching if search_per_fold or any(
            options.given_on_command_line(ctx, name) for name in searching) else None)
    run_study(output, request, shard=shard, progress=False, say=stdout.out)


_SEARCH_FLAGS = {"search_stem": "stem", "search_patch": "patch", "search_epochs": "epochs",
                 "search_steps": "steps_per_epoch", "search_batch_size": "batch_size", "alpha_lr": "alpha_lr",
                 "nodes": "nodes", "tau_max": "tau_max", "tau_min": "tau_min", "warmup_epochs": "warmup_epochs",
                 "free_penalty": "free_penalty", "max_free": "max_free", "sampling": "sampling", "derive_by": "derive_by",
                 "aux_skip": "aux_skip", "ops": "ops"}
"""Parameters of 'scnas cv' that are settings of its search per fold: parameter -> SearchConfig field (derive_by:
the study's, applied to the search's result)."""

_SEARCH_DEFAULTS = {"derive_by": D.DERIVE_BY, "aux_skip": 0.0}
"""What a study stores no value of means: settings recorded only where they are not the default,
so that studies begun before they existed continue with the same arguments."""


def _search_settings(given: dict, patch: tuple[int, int, int], seed: int) -> dict:
    """The search settings of a search per fold, checked as 'scnas search' checks them."""
    from pydantic import ValidationError

    from scnas.search import SearchConfig, SearchError
    from scnas.apps.cv import SEARCH_FIELDS

    values = {field: given[name] for name, field in _SEARCH_FLAGS.items()}
    values["patch"] = values["patch"] or patch
    if values["ops"] is None:
        del values["ops"]              # the paper's vocabulary
    by = values.pop("derive_by")
    try:
        config = SearchConfig(data=".", seed=seed, **values)
    except ValidationError as exc:
        raise settings_error(exc, SearchError) from None
    # derive_by and aux_skip only when not the default: studies begun before them continue with the same arguments
    optional = {key: value for key, value in (("derive_by", by), ("aux_skip", config.aux_skip))
                if value != _SEARCH_DEFAULTS[key]}
    return {**config.model_dump(mode="json", include=set(SEARCH_FIELDS)), **optional}


_TRAINING_FLAGS = {"patch": "patch", "depth": "depth", "batch_size": "batch_size", "epochs": "epochs", "steps": "steps_per_epoch",
                   "lr": "lr", "loss": "loss", "deep_supervision": "deep_supervision", "seed": "seed",
                   "device": "device", "amp": "amp", "augment": "augment"}
"""Parameters of 'scnas cv' that are training settings of the study: parameter -> setting."""


def _refuse_other_settings(ctx, output: str, study: dict, training: dict, search: dict | None) -> None:
    """Continuing a study ('scnas cv -o OUT' without genotypes) runs it with its own settings:
    a setting given with another value than the study's is refused, naming both (ignoring
    it silently would run something else than asked)."""
    from scnas.train import TrainConfig
    from scnas.apps.cv import CVError, plan_study

    given = {name: ("", name, study[name]) for name in ("folds", "spacing", "random", "random_seed", "stem")
             if options.given_on_command_line(ctx, name)}
    given.update({name: ("train", key, training[key]) for name, key in _TRAINING_FLAGS.items()
                  if options.given_on_command_line(ctx, name)})
    if search is not None:   # the flags as given (a patch as a list, as the study stores it)
        if options.given_on_command_line(ctx, "search_per_fold"):
            given["search_per_fold"] = ("", "search_per_fold", True)
        given.update({name: ("search", key, list(search[name]) if isinstance(search[name], tuple) else search[name])
                      for name, key in _SEARCH_FLAGS.items() if options.given_on_command_line(ctx, name)})
    if not given:
        return
    stored = plan_study(Path(output), None, say=lambda _: None).request
    stored = {**stored, "search_per_fold": bool(stored.get("search"))}
    differing = []
    for name, (part, key, value) in given.items():
        # a training setting a study predates (deep_supervision) has its default there
        if part == "search" and not stored.get("search"):
            differing.append(f"{options.flag_name(ctx, name)} {options.shown(value)} (the study searches no fold)")
            continue
        if part == "search":
            old = stored["search"].get(key, _SEARCH_DEFAULTS.get(key))
        else:
            old = stored["train"].get(key, TrainConfig.model_fields[key].default) if part else stored.get(key)
        if value != old:
            differing.append(f"{options.flag_name(ctx, name)} {options.shown(value)} (the study's: "
                             f"{options.shown(old)})")
    if differing:
        raise CVError(f"continues the study with its own settings, but {'; '.join(differing)} "
                      f"differ{'s' if len(differing) == 1 else ''}: leave {'it' if len(differing) == 1 else 'them'} "
                      "out to continue, or start another study in another folder", source=output)
