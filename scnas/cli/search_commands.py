"""``scnas search``: the paper's architecture search, writing genotypes into a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from scnas import defaults as D
from scnas.cli import options
from scnas.cli.app import app, settings_error, stderr, stdout


@app.command()
def search(
    ctx: typer.Context,
    output: str = typer.Option(..., "-o", "--output", help="Run folder: config, metrics, genotypes, plots, checkpoint."),
    data: Optional[str] = typer.Option(None, "--data", help="Task folder (prepared once into its shared cache, $SCNAS_CACHE) or prepared cache."),
    fold: int = typer.Option(D.FOLD, "--fold", min=0, help="Cross-validation fold; its training cases are split 4:1 into "
                                                      "weight and architecture sets."),
    stem: int = typer.Option(D.STEM_SEARCH, "--stem", min=1, help="Stem channels of the supernet (paper: 48)."),
    patch: tuple[int, int, int] = typer.Option(D.PATCH, "--patch", help="Patch size D H W (multiples of 2**depth)."),
    depth: int = typer.Option(D.DEPTH, "--depth", min=1, max=8, help="Down-samplings of the supernet (the paper: 3)."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Augment the patches of both sets (spatial, "
                                 "intensity, flips: the training default). Off for a task whose labels follow an "
                                 "exact rule that augmentation would bend (the planted context task)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Epochs (default and paper: 200; with "
                                                                        "--resume: extend the run to this many)."),
    steps: int = typer.Option(D.STEPS_PER_EPOCH, "--steps-per-epoch", min=1, help="Theta/alpha step pairs per epoch."),
    batch_size: int = typer.Option(D.SEARCH_BATCH_SIZE, "--batch-size", min=1, help="Patches per step over all processes (the paper: 4 "
                                                                   "on 4 GPUs); a multiple of the process count."),
    micro_batch: Optional[int] = options.MICRO_BATCH,
    checkpoint: Optional[str] = options.CHECKPOINT,
    gpu_memory: Optional[str] = options.GPU_MEMORY,
    sampling: str = options.choice(D.SAMPLING, "--sampling", D.SAMPLING_CHOICES,
                                   help="pair (Algorithm 1), one (GDAS-like) or full (DARTS)."),
    ops: Optional[str] = typer.Option(None, "--ops", help="Comma-separated vocabulary (default: the paper's eight)."),
    nodes: int = typer.Option(D.NODES, "--nodes", min=1, help="Intermediate nodes per cell."),
    tau_max: float = typer.Option(D.TAU_MAX, "--tau-max", help="Temperature at the first epoch."),
    tau_min: float = typer.Option(D.TAU_MIN, "--tau-min", help="Temperature at the last epoch."),
    tau_schedule: str = options.choice(D.TAU_SCHEDULE, "--tau-schedule", D.TAU_SCHEDULE_CHOICES,
                                       help="How tau falls from --tau-max to --tau-min: linear or exponential."),
    alpha_lr: float = typer.Option(D.ALPHA_LR, "--alpha-lr", min=0.0, help="Adam learning rate of alpha (paper: 0.003, "
                                                                      "sized for 200 x 250 steps; a short search "
                                                                      "needs more, e.g. 0.1 for ~40 steps)."),
    derive: str = options.choice(D.DERIVE, "--derive", D.DERIVE_CHOICES, help="How cells are derived from alpha: top-k (DARTS: per node "
                                                         "the --top-k strongest inputs, each with its best non-zero "
                                                         "op) or argmax (per edge, zero = no edge). 'scnas derive' "
                                                         "re-derives a finished run."),
    top_k: int = typer.Option(D.TOP_K, "--top-k", min=1, help="Incoming edges per node with --derive top-k."),
    warmup_epochs: int = typer.Option(0, "--warmup-epochs", min=0, help="Countermeasure: epochs that train Theta "
                                                                        "alone before alpha moves (PC-DARTS)."),
    free_penalty: float = typer.Option(0.0, "--free-penalty", min=0.0, help="Countermeasure: add this times "
                                       "softmax(alpha)'s mass on parameter-free ops to alpha's objective."),
    max_free: Optional[int] = options.MAX_FREE,
    aux_skip: float = typer.Option(0.0, "--aux-skip", min=0.0, help="Countermeasure (DARTS-): every mixed edge "
                                   "adds this times its input, outside alpha, decayed linearly to 0 at the last "
                                   "epoch, so that identity's head start is no reason to choose it (DARTS-: 1)."),
    hessian_iterations: int = typer.Option(0, "--hessian-iterations", min=0, help="Measure the dominant eigenvalue of "
                                           "alpha's Hessian each epoch with this many power iterations (R-DARTS's "
                                           "collapse indicator, in metrics.jsonl; 0: off)."),
    loss: str = options.LOSS,
    spacing: Optional[tuple[float, float, float]] = typer.Option(
        None, "--spacing", help="Target spacing (mm) when --data is a task folder [default: 0.7 0.7 0.7]; a prepared "
                                "cache has its own (another is refused)."),
    seed: int = typer.Option(D.SEED, "--seed"),
    workers: str = typer.Option(D.WORKERS, "--workers", help="Data loader processes per loader (weights, architecture "
                                                          "set): a number, or auto (on CUDA the cores but one, "
                                                          "split between the two; on the CPU none)."),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", min=0, help="Also checkpoint every N steps."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Draw plots/*.png (losses, softmax(alpha)); their "
                                                                "data are in metrics.jsonl and plots/alpha.json either way."),
    device: str = options.DEVICE,
    amp: str = options.AMP,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT from its checkpoint (its own "
                                                        "settings; --epochs may extend it, and --checkpoint, "
                                                        "--micro-batch, --gpu-memory, --workers, --plots, --device "
                                                        "may change; another setting given with a different value "
                                                        "is refused)."),
    demo: bool = typer.Option(False, "--demo", help="Make a phantom dataset in OUT/phantoms and run a small search "
                                                    "(3 epochs on 10 small cases: under a minute on 2 CPU cores)."),
) -> None:
    """Search the four cell types with the paper's stochastic bi-level optimisation.

    Each step: a Theta step on the weight set and an alpha step on the architecture set,
    with operations sampled per edge by Algorithm 1 (two ops per edge, Gumbel-softmax with
    temperature tau annealed from --tau-max to --tau-min). Adam with the paper's settings;
    the Theta learning rate is divided by 10 after 20 epochs without a lower training loss;
    soft Jaccard loss. A genotype is derived every epoch (genotypes/, genotype.yaml). Runs
    under torchrun (DistributedDataParallel) on several GPUs or processes.

    Before the first step the memory of a step is predicted (see 'scnas plan --search'):
    checkpointing and micro-batch are chosen to fit the GPU, or the setting is refused with
    one that fits.
    Example: scnas search --data Task01_BrainTumour --fold 0 --stem 48 -o runs/brats-f0
    """
    from pydantic import ValidationError

    from scnas.search import SearchConfig, SearchError, run_search
    from scnas.engine.runs import read_run_config

    run = Path(output)
    overrides: dict = {}

    def make_config(values: dict) -> SearchConfig:
        try:
            return SearchConfig.model_validate(values)
        except ValidationError as exc:
            raise settings_error(exc, SearchError) from None

    given = {
        "data": data, "fold": fold, "stem": stem, "patch": patch, "depth": depth, "augment": augment, "epochs": epochs or 200, "steps_per_epoch": steps,
        "batch_size": batch_size, "sampling": sampling, "nodes": nodes, "tau_max": tau_max, "tau_min": tau_min,
        "tau_schedule": tau_schedule, "alpha_lr": alpha_lr, "derive": derive, "top_k": top_k, "loss": loss,
        "warmup_epochs": warmup_epochs, "free_penalty": free_penalty, "max_free": max_free,
        "aux_skip": aux_skip, "hessian_iterations": hessian_iterations,
        "spacing": spacing, "seed": seed, "workers": workers, "checkpoint_every_steps": checkpoint_every,
        "device": device, "amp": amp, "plots": plots, **options.fitting_overrides(checkpoint, micro_batch, gpu_memory),
        **({"ops": [o.strip() for o in ops.split(",")]} if ops else {})}
    if resume:
        saved = run / "config.json"
        if not saved.exists():
            raise SearchError("has no config.json: nothing to resume", source=str(run))
        config = options.resume_settings(ctx, given, {"steps_per_epoch": "steps", "checkpoint_every_steps":
                                                      "checkpoint_every"}, saved=read_run_config(saved,
                                                                                                 "search")["search"],
                                         make_config=make_config, run=run, error=SearchError)
    else:
        if demo:
            from scnas.data import PrepareSettings, prepare_dataset, write_phantom_dataset

            from scnas.fileio import ensure_folder
            from scnas.threads import reproducible_threads

            reproducible_threads()   # the README shows this output: one thread unless --threads
            ensure_folder(run, SearchError, "a run folder")
            phantoms = write_phantom_dataset(run / "phantoms", cases=10, channels=2, foreground_classes=2, shape=(40, 40, 20),
                                             spacing=(1.0, 1.0, 2.0), seed=seed, force=True)
            # the demo keeps its cache in its own folder (a real task's goes to the shared one)
            data = str(prepare_dataset(phantoms, run / "cache", PrepareSettings(target_spacing=(1.0, 1.0, 1.0)),
                                       progress=False).cache)
            overrides = {"stem": 4, "patch": (32, 32, 32), "epochs": 3, "steps_per_epoch": 8, "spacing": (1.0, 1.0, 1.0),
                         "tau_max": 5.0, "tau_min": 0.5, "val_batches": 2, "alpha_lr": 0.1}
        if data is None:
            raise SearchError("--data is required (a task folder or a prepared cache), or use --demo")
        config = make_config({**given, "data": data, **overrides})
    result = run_search(config, run, resume=resume, say=stderr.out, on_epoch=lambda r: stdout.out(
        f"epoch {r['epoch']}: theta loss {r['theta_loss']:.4f}, alpha loss {r['alpha_loss']:.4f}, "
        f"Dice (derived cells, architecture set) {r['architecture_dice']:.3f}, tau {r['tau']:.3f}"))
    stdout.out(f"searched {result.epochs_done} epoch(s) ({result.plan.describe()}); genotype: {result.genotype_path} "
               f"(skipped steps: {result.skipped_steps}); run folder: {run}")
    from scnas.genotype import read_genotype
    from scnas.search.derive import alpha_movement, describe_movement, recorded_probabilities

    stdout.out(describe_movement(alpha_movement(recorded_probabilities(read_genotype(result.genotype_path)))))


@app.command()
def derive(
    source: str = typer.Argument(..., metavar="RUN", help="A search run folder (its genotype.yaml) or a genotype file "
                                                          "written by a search (genotypes/epoch_N.yaml)."),
    output: str = typer.Option(..., "-o", "--output", help="Genotype file to write (.yaml or .json)."),
    rule: str = options.choice(D.DERIVE, "--derive", D.DERIVE_CHOICES, help="top-k: per node the --top-k strongest incoming edges, each "
                                                       "with its best non-zero op (DARTS); argmax: per edge the most "
                                                       "probable op, zero = no edge (denser cells)."),
    top_k: int = typer.Option(D.TOP_K, "--top-k", min=1, help="Incoming edges per node with --derive top-k."),
    max_free: Optional[int] = options.MAX_FREE,
    by: str = options.choice(D.DERIVE_BY, "--by", D.DERIVE_BY_CHOICES,
                             help="What the rule ranks. alpha: softmax(alpha) from the genotype's provenance. "
                                  "perturbation (DARTS-PT): how much the run's supernet loss rises when an op is "
                                  "removed from an edge, measured on architecture-set patches; needs the run folder "
                                  "(checkpoint and data), best after --sampling full."),
    patches: int = typer.Option(D.PERTURBATION_PATCHES, "--patches", min=1, help="Architecture-set patches the loss is measured on, "
                                                            "with --by perturbation."),
    device: str = options.DEVICE,
) -> None:
    """Derive cells again from a finished search, without searching again.

    By alpha (the default), the probabilities come from the genotype's provenance (every
    genotype a search writes records them). By perturbation, each operation is scored by the
    rise of the supernet's loss when it is taken out of its edge (DARTS-PT, Wang et al. 2021):
    1 + cells x edges x ops forward passes, kept in RUN/perturbation.json for the next call.
    Prints how far alpha moved from uniform: cells derived from an alpha that barely moved
    are the initialisation plus noise, whatever rule derives them.
    Example: scnas derive runs/brats-f0 --derive argmax -o brats-argmax.yaml
    Example: scnas derive runs/full-f0 --by perturbation -o full-pt.yaml
    """
    from scnas.genotype import CELL_TYPES, GenotypeError, read_genotype, short_hash, write_genotype
    from scnas.search.derive import alpha_movement, describe_movement, recorded_probabilities, rederive

    run = Path(source) if Path(source).is_dir() else None
    path = run / "genotype.yaml" if run else Path(source)
    if not path.exists():
        if run and ((run / "checkpoint.pt").exists() or (run / "config.json").exists()):
            raise GenotypeError("is a search that has not finished its first epoch: a genotype is derived at the end "
                                f"of each epoch, and there is none yet; continue the search with: scnas search -o "
                                f"{source} --resume", source=source)
        raise GenotypeError("has no genotype.yaml (not a search run folder)" if run else "does not exist", source=source)
    genotype = read_genotype(path)
    if path.name == "genotype.yaml":     # a run's latest genotype: say when the run stopped early
        search = (genotype.provenance.search if genotype.provenance else None) or {}
        epoch, epochs = genotype.provenance.epoch if genotype.provenance else None, search.get("epochs")
        if isinstance(epoch, int) and isinstance(epochs, int) and epoch < epochs:
            stderr.out(f"warning: {path}: the search did not finish: this genotype is from epoch {epoch} of {epochs} "
                       f"(derived from it all the same); continue the search with: scnas search -o "
                       f"{run or path.parent} --resume")
    scores = None
    if by == "perturbation":
        from scnas.search.perturb import PerturbationError, run_scores

        if run is None:
            raise PerturbationError("--by perturbation needs the search run folder (its checkpoint holds the "
                                    "supernet), not a genotype file", source=source)
        scores = run_scores(run, patches=patches, device=device, say=stderr.out,
                            epoch=genotype.provenance.epoch if genotype.provenance else None)
        stdout.out(f"loss of the full mixture {scores['base_loss']:.4f}; largest rise per cell: " + ", ".join(
            f"{name} {max(max(row) for row in rows):+.4f}" for name, rows in scores["scores"].items()))
    derived = rederive(genotype, rule, top_k, source=str(path), max_free=max_free, perturbation=scores)
    write_genotype(derived, output)
    edges = {name: len(getattr(derived.cells, name).edges) for name in CELL_TYPES}
    stdout.out(f"{output}: hash {short_hash(derived)}, edges per cell {edges}")
    stdout.out(describe_movement(alpha_movement(recorded_probabilities(genotype, str(path)))))
