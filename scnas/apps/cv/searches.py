"""A search per fold (``scnas cv --search-per-fold``): the honest protocol, where the genotype
scored on fold K was searched on fold K's training cases only.

For each fold a search (:func:`scnas.search.run_search`, in ``searches/fold_K/``) on the
fold's training cases, split 4:1 into weight and architecture sets as ``scnas search --fold K``
does; its last epoch's genotype is kept as ``genotypes/searched/fold_K.yaml`` and retrained
on the fold like any other genotype. Random genotypes are widened to that genotype's FLOPs
fold by fold. ``search.json`` records what the search saw (``provenance.search.task`` and
``.cases``, checked to hold none of the fold's validation cases), how far alpha moved and
where each random genotype landed; a search killed before it is written resumes from its
checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from scnas.fileio import atomic_write_text
from scnas.apps.cv.claims import job_claim
from scnas.apps.cv.records import (SEARCH_DONE, SEARCHED, CVError, FlopMatch, FoldSearch, Plan, SearchJob,
                                    search_record)

SEARCH_FIELDS = ("stem", "patch", "epochs", "steps_per_epoch", "batch_size", "nodes", "ops", "sampling", "tau_max",
                 "tau_min", "tau_schedule", "alpha_lr", "derive", "top_k", "warmup_epochs", "free_penalty",
                 "max_free", "val_batches", "architecture_share", "seed")
# and, only where not the default: "derive_by" (alpha or perturbation, applied after the search) and "aux_skip"
"""The search settings a study records (``request["search"]``); the rest (device, precision,
loss, loaders) are the study's own."""


def search_config(plan: Plan, fold: int):
    """The settings of fold ``fold``'s search: the study's search settings on its cache."""
    from scnas.search import SearchConfig

    train = plan.request["train"]
    shared = {key: train[key] for key in ("device", "amp", "loss", "workers", "depth", "augment") if key in train}
    settings = {k: v for k, v in plan.request["search"].items() if k != "derive_by"}
    return SearchConfig(**{**settings, **shared, "data": plan.cache, "fold": fold, "plots": False})


def searched_genotype_path(out: Path, fold: int) -> Path:
    return out / "genotypes" / SEARCHED / f"fold_{fold}.yaml"


def finished_search(out: Path, fold: int, say: Callable[[str], None] | None = None) -> FoldSearch | None:
    """Fold ``fold``'s search record, or None; a damaged one is named (by ``say``) and counts as
    not finished, so that the search is finished again from its checkpoint."""
    from scnas.errors import DamagedFileError

    try:
        return search_record(out, fold)
    except DamagedFileError as exc:
        if say is not None:
            say(f"{exc}: finishing it again")
        return None


def claim_and_search(out: Path, plan: Plan, fold: int, *, wait: bool, progress: bool = False,
                     say: Callable[[str], None] = print) -> FoldSearch | None:
    """Fold ``fold``'s search record, searching first unless it is done. Claimed like a job; a
    search another process holds is waited for (``wait``) or left to it (None).

    Args:
        out: the study folder.
        plan: the study's plan.
        fold: the fold searched.
        wait: wait for a search another process holds (True) or leave it to that process (None is returned).
        progress: show progress bars.
        say: called with each line to print.
    """
    record = finished_search(out, fold, say)
    if record is not None:
        return record
    job = SearchJob(fold)
    with job_claim(job.folder(out)) as free:
        if free:
            return finished_search(out, fold) or run_fold_search(out, plan, fold, progress=progress, say=say)
    if not wait:
        return None
    say(f"{job.name}: being run by another process; waiting for it")
    with job_claim(job.folder(out), wait=True):
        return finished_search(out, fold) or run_fold_search(out, plan, fold, progress=progress, say=say)


def run_fold_search(out: Path, plan: Plan, fold: int, *, progress: bool = False,
                    say: Callable[[str], None] = print) -> FoldSearch:
    """Search fold ``fold``'s training cases (or resume the search), keep the derived genotype,
    match the random genotypes to its FLOPs, and write the record. The caller holds the claim.

    Args:
        out: the study folder.
        plan: the study's plan.
        fold: the fold searched.
        progress: show progress bars.
        say: called with each line to print.
    """
    from scnas.genotype import read_genotype, short_hash, write_genotype
    from scnas.search import run_search
    from scnas.search.derive import alpha_movement, recorded_probabilities

    job = SearchJob(fold)
    run = job.folder(out)
    config = search_config(plan, fold)
    resume = (run / "checkpoint.pt").exists()
    say(f"{job.name}: {'resuming the' if resume else 'a'} search on fold {fold}'s training cases "
        f"({config.epochs} epochs x {config.steps_per_epoch} steps, stem {config.stem})")
    started = time.perf_counter()
    result = run_search(config, run, resume=resume, progress=progress)
    genotype = read_genotype(result.genotype_path)
    by = plan.request["search"].get("derive_by", "alpha")
    if by == "perturbation":
        from scnas.search.derive import rederive
        from scnas.search.perturb import run_scores

        scores = run_scores(run, device=config.device, say=say,
                            epoch=genotype.provenance.epoch if genotype.provenance else None)
        genotype = rederive(genotype, config.derive, config.top_k, source=str(result.genotype_path),
                            max_free=config.max_free, perturbation=scores)
    searched = (genotype.provenance.search if genotype.provenance else None) or {}
    cases = [str(c) for c in searched.get("cases") or []]
    validation = plan.validation[str(fold)]
    seen = sorted(set(cases) & set(validation))
    if seen or not cases:   # the search reads fold_cases(fold)["train"]: this would be a bug, never a result
        raise CVError(f"{job.name}: the search's recorded cases {'include' if seen else 'are missing'} "
                      f"{', '.join(seen)}{' of the fold' if seen else ''}'s validation cases; it cannot be scored "
                      "on them", source=str(result.genotype_path))
    kept = searched_genotype_path(out, fold)
    kept.parent.mkdir(parents=True, exist_ok=True)
    write_genotype(genotype, kept)
    stem, flops, matches = match_randoms(out, plan, genotype, fold=fold)
    record = FoldSearch(fold=fold, genotype=str(kept.relative_to(out)), hash=short_hash(genotype),
                        epoch=result.epochs_done, epochs=config.epochs, task=str(searched.get("task", "")),
                        cases=cases, validation_in_search=seen,
                        alpha_movement=alpha_movement(recorded_probabilities(genotype, str(kept))),
                        stem=stem, flops=flops, random=matches, seconds=round(time.perf_counter() - started, 1),
                        derived_by=by)
    atomic_write_text(run / SEARCH_DONE, record.model_dump_json(indent=2) + "\n")
    say(f"{job.name}: derived {record.hash} ({describe(record)}); {flops / 1e9:.4f} GFLOPs at stem {stem}")
    for match in matches:
        say(f"  {match.genotype} on fold {fold}: stem {match.stem}, {match.flops / 1e9:.4f} GFLOPs "
            f"({match.relative:+.1%} from the target)")
    return record


def match_randoms(out: Path, plan: Plan, genotype, *, fold: int) -> tuple[int, float, list[FlopMatch]]:
    """The derived genotype's retraining stem and FLOPs, and each random genotype of the plan
    widened to those FLOPs.

    Args:
        out: the study folder.
        plan: the study's plan.
        genotype: the fold's derived genotype.
        fold: the fold (named in the records).
    """
    from scnas.build import BuildConfig
    from scnas.build.stats import match_flops, network_flops
    from scnas.genotype import read_genotype

    train = plan.request["train"]
    stem = plan.request["stem"]
    base = BuildConfig(stem_channels=stem, in_channels=_channels(plan), num_classes=len(plan.labels),
                       depth=train.get("depth", 3))
    patch = tuple(train["patch"])
    target = network_flops(genotype, base, patch)
    matches = []
    for entry in plan.genotypes:
        if entry.kind == "random" and entry.per_fold:
            other = read_genotype(out / "genotypes" / f"{entry.name}.yaml")
            at, flops = match_flops(other, target, base, patch=patch)
            matches.append(FlopMatch(genotype=entry.name, fold=fold, stem=at, flops=flops, target=target,
                                     target_genotype=SEARCHED))
    return stem, target, matches


def _channels(plan: Plan) -> int:
    from scnas.data.cache import Cache

    return len(Cache(plan.cache).channel_names)


def describe(record: FoldSearch) -> str:
    """How far alpha moved, shortly: the largest probability as a multiple of uniform per cell type
    (and the cells' choice by perturbation, where it was)."""
    return ("cells by perturbation; " if record.derived_by == "perturbation" else "") + "alpha moved " + ", ".join(f"{name} {m['largest_x_uniform']:.2f}x"
                                      for name, m in record.alpha_movement.items())


def summary(record: FoldSearch) -> dict[str, Any]:
    """The report's line for a fold's search."""
    return {"fold": record.fold, "hash": record.hash, "epoch": record.epoch, "epochs": record.epochs,
            "task": record.task, "searched_cases": len(record.cases),
            "validation_cases_in_search": len(record.validation_in_search),
            "alpha_movement": record.alpha_movement, "stem": record.stem, "flops": record.flops}
