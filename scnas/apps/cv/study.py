"""Running a cross-validation study: its plan, its jobs, who runs which (shards, claims).

A study is planned once (``cv.json``); its jobs are (genotype, fold) retrainings and, with a
search per fold, one search per fold (:mod:`scnas.apps.cv.searches`) that the fold's
retrainings of the searched genotype and of the random ones wait for. A job is done when its
record reads back (``evaluation.json``, ``search.json``); a damaged one is named and the job
done again; a job killed midway resumes from its checkpoint. ``shard i/n`` runs jobs i, i+n,
... (1-based, searches first), so n processes or machines sharing OUT run the study between
them; every job is claimed with a flock, so two processes never run the same one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from scnas.errors import DamagedFileError
from scnas.fileio import atomic_write_text
from scnas.apps.cv.claims import job_claim, study_lock
from scnas.apps.cv.records import (DONE, PLAN_FORMAT, PLAN_VERSION, SEARCHED, CVError, Entry, Job, Plan, SearchJob,
                                    job_record, leak_lines, missing_jobs, read_plan, search_jobs, study_jobs)
from scnas.apps.cv.report import write_report
from scnas.apps.cv.searches import claim_and_search, finished_search, searched_genotype_path


def parse_shard(text: str | None, environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``"i/n"`` (1-based) as (i, n); None means the whole study (1/1); ``"auto"`` reads the
    Slurm job array this process is a task of (see ``slurm_array_shard``)."""
    if text is None:
        return 1, 1
    if text.strip().lower() == "auto":
        return slurm_array_shard(os.environ if environ is None else environ)
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise CVError(f"--shard {text!r}: write it as i/n, e.g. 1/4 (the first of 4 shares), or auto inside "
                      "a Slurm job array")
    index, count = int(parts[0]), int(parts[1])
    if count < 1 or not 1 <= index <= count:
        raise CVError(f"--shard {text!r}: i must be between 1 and n (here n = {count})")
    return index, count


def slurm_array_shard(environ: Mapping[str, str]) -> tuple[int, int]:
    """(i, n) of this Slurm array task: ``sbatch --array=0-4`` (or ``1-5``, or ``0-8:2``) gives
    tasks 1..5 of 5; a throttle (``--array=0-4%2``) changes nothing. The array must be one
    evenly stepped range, so that every task id maps to exactly one share: a list such as
    ``--array=1,3,7`` is refused rather than leaving shares unrun."""
    def number(name: str) -> int | None:
        value = environ.get(name)
        if value is None or value.strip() == "":
            return None
        if not value.strip().isdigit():
            raise CVError(f"--shard auto: {name}={value!r} is not a whole number")
        return int(value)

    task = number("SLURM_ARRAY_TASK_ID")
    if task is None:
        raise CVError("--shard auto: not a task of a Slurm job array (SLURM_ARRAY_TASK_ID is not set); "
                      "submit with 'sbatch --array=0-N' or give --shard i/n")
    low, high = number("SLURM_ARRAY_TASK_MIN"), number("SLURM_ARRAY_TASK_MAX")
    count, step = number("SLURM_ARRAY_TASK_COUNT"), number("SLURM_ARRAY_TASK_STEP") or 1
    if low is None or high is None or count is None:
        raise CVError("--shard auto: SLURM_ARRAY_TASK_MIN, _MAX and _COUNT must be set beside "
                      "SLURM_ARRAY_TASK_ID (Slurm sets all four in an array task)")
    if count < 1 or (task - low) % step or not low <= task <= high or (high - low) // step + 1 != count:
        raise CVError(f"--shard auto: the job array is not one evenly stepped range (ids {low}..{high} step "
                      f"{step}, {count} tasks, this one {task}); use --array=A-B[:S] or give --shard i/n")
    return (task - low) // step + 1, count


def parse_spec(spec: str, default_stem: int) -> tuple[str, int]:
    """``GENOTYPE`` or ``GENOTYPE@STEM`` as (genotype, stem)."""
    name, at, stem = spec.rpartition("@")
    if not at:
        return spec, default_stem
    if not stem.isdigit() or int(stem) < 1:
        raise CVError(f"genotype {spec!r}: the stem after '@' must be a positive whole number")
    return name, int(stem)


def _display_name(spec: str, taken: set[str]) -> str:
    base = Path(spec).name
    for ending in (".yaml", ".yml", ".json"):
        base = base[: -len(ending)] if base.endswith(ending) else base
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in base) or "genotype"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name




def _finished(out: Path, job: Job, prefix: str, skipped: str, say: Callable[[str], None],
              quiet: bool = False) -> bool:
    """Whether ``job`` has its evaluation record (saying so); a damaged record is named (unless
    ``quiet``) and the job counts as not done, so it is done again."""
    try:
        if job_record(out, job) is not None:
            say(f"{prefix} {job.name}: {skipped}")
            return True
    except DamagedFileError as exc:
        if not quiet:
            say(f"{prefix} {exc}: doing it again")
    return False


def _differences(request: dict[str, Any], stored: dict[str, Any]) -> list[str]:
    """The settings in which ``request`` differs from ``stored``, nested ones by their path
    (``search.epochs 3 (the study's: 2)``)."""
    found = []
    for key in sorted(set(request) | set(stored)):
        new, old = request.get(key), stored.get(key)
        if new == old:
            continue
        if isinstance(new, dict) and isinstance(old, dict):
            found += [f"{key}.{line}" for line in _differences(new, old)]
        else:
            found.append(f"{key} {json.dumps(new)} (the study's: {json.dumps(old)})")
    return found


def plan_study(out: Path, request: dict[str, Any] | None, *, say: Callable[[str], None] = print) -> Plan:
    """Create the study in ``out`` from ``request``, or check that ``request`` is the one it was
    created with (``request`` None: continue the stored study). Returns the plan.

    Args:
        out: the study folder.
        request: the study's settings (None: continue the stored study).
        say: called with each line to print.
    """
    plan_path = out / "cv.json"
    with study_lock(out):
        if plan_path.exists():
            plan = read_plan(plan_path)
            if plan.format != PLAN_FORMAT or plan.version != PLAN_VERSION:
                raise CVError(f"is not a version-{PLAN_VERSION} scnas cv plan", source=str(plan_path))
            if request is not None and request != plan.request:
                raise CVError(f"holds a study with other settings ({'; '.join(_differences(request, plan.request))})"
                              "; continue it with 'scnas cv -o OUT' alone (or the same arguments), or use another "
                              "folder", source=str(out))
            return plan
        if request is None:
            raise CVError("holds no study (no cv.json): give genotypes and --data to start one", source=str(out))
        plan = _new_plan(out, request, say)
        atomic_write_text(plan_path, plan.model_dump_json(indent=2) + "\n")
        return plan


def _new_plan(out: Path, request: dict[str, Any], say: Callable[[str], None]) -> Plan:
    from scnas.build import BuildConfig
    from scnas.build.stats import network_flops
    from scnas.genotype import load_genotype, random_genotype, short_hash, write_genotype

    per_fold = bool(request.get("search"))
    if not request["genotypes"] and not per_fold:
        raise CVError("give at least one genotype (a file or a built-in name, optionally NAME@STEM)")
    cache = _open_cache(request["data"], request["spacing"])
    task = _task_folder(request["data"], cache)
    folds = request["folds"] if request["folds"] is not None else list(range(len(cache.splits)))
    absent = [f for f in folds if not 0 <= f < len(cache.splits)]
    if absent:
        raise CVError(f"--folds {absent}: the splits file has folds 0..{len(cache.splits) - 1}",
                      source=str(cache.folder / "splits_final.json"))
    train = request["train"]
    base = BuildConfig(stem_channels=1, in_channels=len(cache.channel_names), num_classes=len(cache.labels),
                       depth=train.get("depth", 3))
    patch = tuple(train["patch"])
    entries, genotypes, taken = [], {}, {SEARCHED} if per_fold else set()
    if per_fold:
        entries.append(Entry(name=SEARCHED, source="a search per fold on the fold's training cases", kind="searched"))
    for spec in request["genotypes"]:
        source, stem = parse_spec(spec, request["stem"])
        genotype = load_genotype(source)
        name = _display_name(source, taken)
        taken.add(name)
        flops = network_flops(genotype, base.model_copy(update={"stem_channels": stem}), patch)
        entry = Entry(name=name, source=source, kind="given", stem=stem, flops=flops, hash=short_hash(genotype),
                      search_data=search_overlap(genotype, cache, task=task, folds=folds))
        for line in leak_lines([entry], folds):
            say(f"warning: {line}")
        entries.append(entry)
        genotypes[name] = genotype
    if request["random"]:
        from scnas.build.stats import match_flops

        first = entries[0]
        search = request.get("search") or {}
        for i in range(request["random"]):
            seed = request["random_seed"] + i
            if per_fold:    # the search's vocabulary and nodes; widened fold by fold to what it derives
                from scnas.genotype import PAPER_OPS

                genotype = random_genotype(seed, search.get("nodes", 4), list(search.get("ops") or PAPER_OPS))
            else:
                genotype = random_genotype(seed, genotypes[first.name].nodes, list(genotypes[first.name].ops))
            name = _display_name(f"random-{seed}", taken)
            taken.add(name)
            entry = Entry(name=name, source=f"random seed {seed}", kind="random", hash=short_hash(genotype))
            if not per_fold:
                entry.stem, entry.flops = match_flops(genotype, first.flops, base, patch=patch)
                say(f"random genotype {name}: stem {entry.stem}, {entry.flops / 1e9:.4f} GFLOPs "
                    f"({entry.flops / first.flops - 1:+.1%} from {first.name})")
            entries.append(entry)
            genotypes[name] = genotype
    (out / "genotypes").mkdir(exist_ok=True)
    for name, genotype in genotypes.items():
        write_genotype(genotype, out / "genotypes" / f"{name}.yaml")
    return Plan(format=PLAN_FORMAT, version=PLAN_VERSION, request=request, cache=str(cache.folder),
                task=str(task.resolve()), folds=folds, genotypes=entries,
                labels={name: int(value) for name, value in cache.labels.items()},
                validation={str(f): list(cache.splits[f]["val"]) for f in folds})


def _task_folder(data: str, cache) -> Path:
    """The task folder whose images are predicted and whose labels are the ground truth."""
    if (Path(data) / "dataset.json").exists():
        return Path(data)
    source = Path(cache.header.get("dataset", {}).get("source", ""))
    if not (source / "dataset.json").exists():
        raise CVError(f"is a prepared cache whose task folder ({source}) is not here; give the task folder as "
                      "--data (its images are predicted on their original grid)", source=data)
    return source


def _open_cache(data: str, spacing: tuple[float, float, float] | None):
    from scnas.data.cache import Cache, open_or_prepare

    if (Path(data) / "cache.json").exists():
        cache = Cache(data)
        cache.check_spacing(spacing, CVError)
        return cache
    if not (Path(data) / "dataset.json").exists():
        raise CVError("is neither a task folder (dataset.json) nor a prepared cache (cache.json)", source=data)
    return open_or_prepare(data, spacing)   # the task's shared cache, prepared once


def search_overlap(genotype, cache, *, task: Path, folds: list[int]) -> dict[str, Any] | None:
    """What ``genotype``'s search saw of each fold's validation cases, from its provenance:
    ``search.task`` and ``search.cases`` (scnas >= 0.1 writes both), or, for genotypes written
    before, the cases of ``search.fold``'s training split when ``search.data`` names this task
    (inferred: the same splits file is assumed). None when the provenance says nothing about
    this task (another task's search is a transfer, not a leak).

    Args:
        genotype: the genotype whose provenance is read.
        cache: the task's prepared cache.
        task: the task folder.
        folds: the folds of the study.
    """
    search = (genotype.provenance.search if genotype.provenance else None) or {}
    name = cache.header["dataset"]["name"]
    if isinstance(search.get("cases"), list):
        if search.get("task") != name:
            return None
        seen, how = {str(c) for c in search["cases"]}, "recorded"
    elif isinstance(search.get("fold"), int) and isinstance(search.get("data"), str) and \
            Path(search["data"]).name in {task.name, cache.folder.name} and 0 <= search["fold"] < len(cache.splits):
        seen, how = set(cache.splits[search["fold"]]["train"]), f"inferred from search fold {search['fold']}"
    else:
        return None
    return {"task": name, "cases": how, "searched_cases": len(seen),
            "validation_in_search": {str(f): sorted(seen & set(cache.splits[f]["val"])) for f in folds}}


def job_genotype(out: Path, plan: Plan, job: Job, *, say: Callable[[str], None] = print,
                 progress: bool = False) -> tuple[Path, int, str]:
    """The genotype file, stem and hash that ``job`` retrains. A genotype that differs per fold
    (search per fold) needs the fold's search: run here, or waited for if another process runs it.

    Args:
        out: the study folder.
        plan: the study's plan.
        job: the retraining job.
        say: called with each line to print.
        progress: show progress bars (of a search run here).
    """
    entry = plan.entry(job.genotype)
    if not entry.per_fold:
        return out / "genotypes" / f"{entry.name}.yaml", int(entry.stem), str(entry.hash)
    record = claim_and_search(out, plan, job.fold, wait=True, progress=progress, say=say)
    if entry.kind == "searched":
        return searched_genotype_path(out, job.fold), record.stem, record.hash
    match = next(m for m in record.random if m.genotype == entry.name)
    return out / "genotypes" / f"{entry.name}.yaml", match.stem, str(entry.hash)


def run_job(out: Path, plan: Plan, job: Job, *, progress: bool = False,
            say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume), predict the fold's validation cases with the last-epoch model,
    evaluate; writes and returns the job's evaluation record.

    Args:
        out: the study folder.
        plan: the study's plan.
        job: the job to run.
        progress: show progress bars.
        say: called with each line to print.
    """
    from scnas.build.model_file import read_any_model_info
    from scnas.genotype import read_genotype
    from scnas.train.evaluate import evaluate_folders
    from scnas.train.predict import predict_folder
    from scnas.train.trainer import TrainConfig, check_unselected, run_training

    folder = job.folder(out)
    path, stem, hash_ = job_genotype(out, plan, job, say=say, progress=progress)
    genotype = read_genotype(path)
    settings = plan.request["train"]
    config = TrainConfig(**{**settings, "data": plan.cache, "fold": job.fold, "stem": stem})
    started = time.perf_counter()
    resume = (folder / "train" / "checkpoint.pt").exists()
    result = run_training(genotype, config, folder / "train", resume=resume, progress=progress)
    trained = time.perf_counter() - started
    model = folder / "train" / "model.safetensors"
    validation = plan.validation[str(job.fold)]
    metadata = read_any_model_info(model).metadata
    check_unselected(metadata, validation, str(model))    # the last epoch's model, held out from these cases
    predictions = folder / "predictions"
    shutil.rmtree(predictions, ignore_errors=True)    # a killed job's partial predictions
    predict_folder(model, Path(plan.task) / "imagesTr", predictions, device=_device(settings["device"]),
                   progress=False, only=validation, amp=settings.get("amp", "auto"))
    labels = sorted(plan.labels.values())
    evaluation = evaluate_folders(predictions, Path(plan.task) / "labelsTr", [v for v in labels if v != 0],
                                  cases=validation)
    training = json.loads(metadata["training"])
    record = {"genotype": job.genotype, "fold": job.fold, "hash": hash_, "stem": stem,
              "model": str(model.relative_to(out)), "model_epoch": training["epoch"],
              "model_selection": training["selection"], "epochs_done": result.epochs_done,
              "train_seconds": round(trained, 1), "predict_seconds": round(time.perf_counter() - started - trained, 1),
              **evaluation.to_dict()}
    atomic_write_text(folder / DONE, json.dumps(record, indent=2) + "\n")
    return record


def _device(device: str) -> str:
    from scnas.engine.processes import resolve_device

    return resolve_device(device, CVError).type


def run_study(out: str | os.PathLike, request: dict[str, Any] | None, *, shard: str | None = None,
              progress: bool = False, say: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Plan (or continue) the study in ``out``, run this shard's jobs that are not done, and
    report when every job of the study is done (None otherwise).

    Args:
        out: the study folder.
        request: the study's settings (None: continue the stored study).
        shard: ``i/n`` (this process runs the i-th of n shares of the jobs), ``auto`` (a Slurm array's), or None (all).
        progress: show progress bars.
        say: called with each line to print.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CVError("runs one process per shard, not under torchrun: start one 'scnas cv --shard i/n' per GPU "
                      "(CUDA_VISIBLE_DEVICES=...) or machine, then 'scnas cv -o OUT --report'")
    out = Path(out)
    index, count = parse_shard(shard)
    plan = plan_study(out, request, say=say)
    jobs = [*search_jobs(plan), *study_jobs(plan)]
    mine = [job for position, job in enumerate(jobs) if position % count == index - 1]
    for number, job in enumerate(mine, start=1):
        prefix = f"[{number}/{len(mine)}]"
        started = time.perf_counter()
        if isinstance(job, SearchJob):
            if finished_search(out, job.fold) is not None:
                say(f"{prefix} {job.name}: done before, skipped")
            elif claim_and_search(out, plan, job.fold, wait=False, progress=progress, say=say) is None:
                say(f"{prefix} {job.name}: being run by another process, skipped")
            else:
                say(f"{prefix} {job.name}: {time.perf_counter() - started:.0f} s")
            continue
        if _finished(out, job, prefix, "done before, skipped", say):
            continue
        with job_claim(job.folder(out)) as claimed:
            if not claimed:
                say(f"{prefix} {job.name}: being run by another process, skipped")
                continue
            if _finished(out, job, prefix, "done by another process, skipped", say, quiet=True):
                continue                      # finished by another process since it was checked
            record = run_job(out, plan, job, progress=progress, say=say)
        say(f"{prefix} {job.name}: mean Dice {record['mean_over_classes']:.4f} over "
            f"{len(record['cases'])} validation case(s), last-epoch model (epoch {record['model_epoch']}), "
            f"{time.perf_counter() - started:.0f} s")
    missing = missing_jobs(out, plan)
    if missing:
        say(f"{len(study_jobs(plan)) - len(missing)} of {len(study_jobs(plan))} jobs done; waiting for: "
            f"{', '.join(job.name for job in missing[:6])}{' ...' if len(missing) > 6 else ''} "
            "(other shards or processes); then: scnas cv -o OUT --report")
        return None
    return write_report(out, plan=plan, say=say)
