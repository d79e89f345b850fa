"""Cross-validation of genotypes, the paper's Table-1 protocol (``scnas cv``).

Every genotype is retrained on every fold's training cases; the **last epoch's** model (never
one chosen on validation Dice) predicts the fold's validation cases on their original grid;
Dice per class is computed there. A fold's score is the mean over its validation cases; the
table gives, per genotype and class, the mean and standard deviation over folds, and the
per-fold values.

``random N`` adds N seeded random genotypes (two inputs per node, like a derived cell), each
widened to the FLOPs of the first genotype, and the report compares the first genotype with
them fold by fold: the question "did the search beat random?".

A task folder given as data is prepared once into its shared cache (``$SCNAS_CACHE``, see
``scnas.data.cache.shared_cache_folder``), which every fold and genotype reads. The study folder::

    OUT/cv.json                 the request and the plan (genotypes, stems, FLOPs, folds)
    OUT/genotypes/NAME.yaml     every genotype of the study (random ones included)
    OUT/jobs/NAME/fold_K/       train/ (the run folder), predictions/, evaluation.json
    OUT/results.{md,csv,json,png}

A job is done when its ``evaluation.json`` reads as a record of that job (a damaged one, e.g.
truncated, is named and the job done again); a job killed during training resumes from its
checkpoint. ``shard i/n`` runs jobs i, i+n, ... (1-based), so n processes or machines
sharing OUT run the study between them; ``report`` gathers what they wrote.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from pydantic import BaseModel, ConfigDict

from scnas.errors import DamagedFileError, Problem, ScnasError
from scnas.fileio import atomic_write_text
from scnas.records import damaged, read_json

PLAN_FORMAT = "scnas-cv"
PLAN_VERSION = 1
DONE = "evaluation.json"
PLAN_FIX = ("the study's plan cannot be rebuilt from its jobs: move cv.json away and run the same 'scnas cv' command "
            "again (the same genotypes, --data and settings give the same plan; finished jobs are kept), or put back "
            "a good copy")


class PlanShape(BaseModel):
    """The fields of ``cv.json`` that a study reads."""

    model_config = ConfigDict(extra="allow")
    format: str
    version: int
    request: dict[str, Any]
    cache: str
    task: str
    folds: list[int]
    genotypes: list[dict[str, Any]]
    labels: dict[str, int]
    validation: dict[str, list[str]]


class EvaluationShape(BaseModel):
    """The fields of a job's ``evaluation.json`` that the report reads (and whose job it is)."""

    model_config = ConfigDict(extra="allow")
    model_selection: str
    mean: dict[str, float | None]
    genotype: str | None = None
    fold: int | None = None


def read_plan(path: Path) -> dict[str, Any]:
    """A study's ``cv.json``; a damaged one is a ``DamagedFileError`` saying how to get one back."""
    return read_json(path, PLAN_FIX, PlanShape)


def job_record(out: Path, job: Job) -> dict[str, Any] | None:
    """The evaluation record of a finished ``job`` (None: not finished); a damaged one (truncated,
    empty, mistyped, another job's) is a ``DamagedFileError`` that says the job is done again."""
    path = out / "jobs" / job.genotype / f"fold_{job.fold}" / DONE
    if not path.exists():
        return None
    fix = f"job {job.name} is done again by 'scnas cv -o {out}'"
    record = read_json(path, fix, EvaluationShape)
    if record["genotype"] not in (None, job.genotype) or record["fold"] not in (None, job.fold):
        raise damaged(path, f"is damaged: it is the record of {record['genotype']}/fold_{record['fold']}", fix)
    return record


class CVError(ScnasError):
    """A cross-validation study that cannot start, continue or be reported."""


@dataclass
class Job:
    genotype: str    # name in the plan
    fold: int

    @property
    def name(self) -> str:
        return f"{self.genotype}/fold_{self.fold}"


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


@contextmanager
def _study_lock(out: Path):
    """One process at a time plans the study and prepares its cache (shards start together)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


@contextmanager
def _job_claim(folder: Path):
    """Whether this process may run the job in ``folder``: a non-blocking exclusive lock on
    ``folder/.running``, held while the job runs, so that two processes continuing the same
    study never train the same job twice. The kernel releases it when its process ends, even
    by SIGKILL, so a killed job is free to be resumed at once."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".running", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


def plan_study(out: Path, request: dict[str, Any], say: Callable[[str], None] = print) -> dict[str, Any]:
    """Create the study in ``out`` from ``request``, or check that ``request`` is the one it was
    created with (``request`` None: continue the stored study). Returns the plan."""
    from scnas.build import BuildConfig
    from scnas.build.stats import network_flops
    from scnas.genotype import load_genotype, random_genotype, short_hash, write_genotype

    plan_path = out / "cv.json"
    with _study_lock(out):
        if plan_path.exists():
            plan = read_plan(plan_path)
            if plan.get("format") != PLAN_FORMAT or plan.get("version") != PLAN_VERSION:
                raise CVError(f"is not a version-{PLAN_VERSION} scnas cv plan", source=str(plan_path))
            if request is not None and request != plan["request"]:
                differing = sorted(k for k in set(request) | set(plan["request"])
                                   if request.get(k) != plan["request"].get(k))
                raise CVError(f"holds a study with other settings ({', '.join(differing)}); continue it with "
                              "'scnas cv -o OUT' alone (or the same arguments), or use another folder",
                              source=str(out))
            return plan
        if request is None:
            raise CVError("holds no study (no cv.json): give genotypes and --data to start one", source=str(out))
        if not request["genotypes"]:
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
        entries, taken = [], set()
        for spec in request["genotypes"]:
            source, stem = parse_spec(spec, request["stem"])
            genotype = load_genotype(source)
            name = _display_name(source, taken)
            taken.add(name)
            flops = network_flops(genotype, base.model_copy(update={"stem_channels": stem}), patch)
            entry = {"name": name, "source": source, "kind": "given", "stem": stem, "flops": flops,
                     "hash": short_hash(genotype), "genotype": genotype}
            seen = search_overlap(genotype, cache, task, folds)
            if seen is not None:
                entry["search_data"] = seen
                for line in leak_lines([entry], folds):
                    say(f"warning: {line}")
            entries.append(entry)
        if request["random"]:
            from scnas.build.stats import match_flops

            first = entries[0]
            for i in range(request["random"]):
                seed = request["random_seed"] + i
                genotype = random_genotype(seed, first["genotype"].nodes, list(first["genotype"].ops))
                stem, flops = match_flops(genotype, first["flops"], base, patch=patch)
                name = _display_name(f"random-{seed}", taken)
                taken.add(name)
                say(f"random genotype {name}: stem {stem}, {flops / 1e9:.2f} GFLOPs "
                    f"({flops / first['flops'] - 1:+.1%} from {first['name']})")
                entries.append({"name": name, "source": f"random seed {seed}", "kind": "random", "stem": stem,
                                "flops": flops, "hash": short_hash(genotype), "genotype": genotype})
        (out / "genotypes").mkdir(exist_ok=True)
        for entry in entries:
            write_genotype(entry.pop("genotype"), out / "genotypes" / f"{entry['name']}.yaml")
        plan = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "request": request, "cache": str(cache.folder),
                "task": str(task.resolve()), "folds": folds, "genotypes": entries,
                "labels": {name: int(value) for name, value in cache.labels.items()},
                "validation": {str(f): list(cache.splits[f]["val"]) for f in folds}}
        atomic_write_text(plan_path, json.dumps(plan, indent=2) + "\n")
        return plan


def search_overlap(genotype, cache, task: Path, folds: list[int]) -> dict[str, Any] | None:
    """What ``genotype``'s search saw of each fold's validation cases, from its provenance:
    ``search.task`` and ``search.cases`` (scnas >= 0.1 writes both), or, for genotypes written
    before, the cases of ``search.fold``'s training split when ``search.data`` names this task
    (inferred: the same splits file is assumed). None when the provenance says nothing about
    this task (another task's search is a transfer, not a leak)."""
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


def leak_lines(entries: list[dict[str, Any]], folds: list[int]) -> list[str]:
    """One line per genotype whose search saw validation cases of the study: which folds, how
    many cases, which folds are clean."""
    lines = []
    for entry in entries:
        seen = entry.get("search_data")
        leaked = {int(f): ids for f, ids in (seen or {}).get("validation_in_search", {}).items() if ids}
        if not leaked:
            continue
        clean = [f for f in folds if f not in leaked]
        cases = sum(len(ids) for ids in leaked.values())
        lines.append(f"{entry['name']}'s search saw {cases} validation case(s) of fold(s) "
                     f"{', '.join(map(str, sorted(leaked)))} ({seen['cases']}): its Dice there is optimistic; "
                     f"clean fold(s): {', '.join(map(str, clean)) if clean else 'none'}")
    return lines


def clean_folds(entry: dict[str, Any], folds: list[int]) -> list[int]:
    """The folds none of whose validation cases were in ``entry``'s search data."""
    seen = (entry.get("search_data") or {}).get("validation_in_search", {})
    return [f for f in folds if not seen.get(str(f))]


def study_jobs(plan: dict[str, Any]) -> list[Job]:
    """Every (genotype, fold) of the study, folds outermost, so that a first shard's early
    jobs give every genotype's fold 0."""
    return [Job(entry["name"], fold) for fold in plan["folds"] for entry in plan["genotypes"]]


def run_job(out: Path, plan: dict[str, Any], job: Job, progress: bool = False,
            say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume), predict the fold's validation cases with the last-epoch model,
    evaluate; writes and returns the job's evaluation record."""
    from scnas.build.model_file import read_any_model_info
    from scnas.genotype import read_genotype
    from scnas.train.evaluate import evaluate_folders
    from scnas.train.predict import predict_folder
    from scnas.train.trainer import TrainConfig, check_unselected, run_training

    folder = out / "jobs" / job.genotype / f"fold_{job.fold}"
    entry = next(e for e in plan["genotypes"] if e["name"] == job.genotype)
    genotype = read_genotype(out / "genotypes" / f"{job.genotype}.yaml")
    settings = plan["request"]["train"]
    config = TrainConfig(**{**settings, "data": plan["cache"], "fold": job.fold, "stem": entry["stem"]})
    started = time.perf_counter()
    resume = (folder / "train" / "checkpoint.pt").exists()
    result = run_training(genotype, config, folder / "train", resume=resume, progress=progress)
    trained = time.perf_counter() - started
    model = folder / "train" / "model.safetensors"
    validation = plan["validation"][str(job.fold)]
    metadata = read_any_model_info(model).metadata
    check_unselected(metadata, validation, str(model))    # the last epoch's model, held out from these cases
    predictions = folder / "predictions"
    shutil.rmtree(predictions, ignore_errors=True)    # a killed job's partial predictions
    predict_folder(model, Path(plan["task"]) / "imagesTr", predictions, device=_device(settings["device"]),
                   progress=False, only=validation, amp=settings.get("amp", "auto"))
    labels = sorted(plan["labels"].values())
    evaluation = evaluate_folders(predictions, Path(plan["task"]) / "labelsTr", [v for v in labels if v != 0],
                                  cases=validation)
    training = json.loads(metadata["training"])
    record = {"genotype": job.genotype, "fold": job.fold, "hash": entry["hash"], "stem": entry["stem"],
              "model": str(model.relative_to(out)), "model_epoch": training["epoch"],
              "model_selection": training["selection"], "epochs_done": result.epochs_done,
              "train_seconds": round(trained, 1), "predict_seconds": round(time.perf_counter() - started - trained, 1),
              **evaluation.to_dict()}
    atomic_write_text(folder / DONE, json.dumps(record, indent=2) + "\n")
    return record


def _device(device: str) -> str:
    from scnas.engine.processes import resolve_device

    return resolve_device(device, CVError).type


def run_study(out: str | os.PathLike, request: dict[str, Any] | None, shard: str | None = None,
              progress: bool = False, say: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Plan (or continue) the study in ``out``, run this shard's jobs that are not done, and
    report when every job of the study is done (None otherwise)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CVError("runs one process per shard, not under torchrun: start one 'scnas cv --shard i/n' per GPU "
                      "(CUDA_VISIBLE_DEVICES=...) or machine, then 'scnas cv -o OUT --report'")
    out = Path(out)
    index, count = parse_shard(shard)
    plan = plan_study(out, request, say)
    jobs = study_jobs(plan)
    mine = [job for position, job in enumerate(jobs) if position % count == index - 1]
    for number, job in enumerate(mine, start=1):
        prefix = f"[{number}/{len(mine)}]"
        if _finished(out, job, prefix, "done before, skipped", say):
            continue
        with _job_claim(out / "jobs" / job.genotype / f"fold_{job.fold}") as claimed:
            if not claimed:
                say(f"{prefix} {job.name}: being run by another process, skipped")
                continue
            if _finished(out, job, prefix, "done by another process, skipped", say, quiet=True):
                continue                      # finished by another process since it was checked
            started = time.perf_counter()
            record = run_job(out, plan, job, progress, say)
        say(f"[{number}/{len(mine)}] {job.name}: mean Dice {record['mean_over_classes']:.4f} over "
            f"{len(record['cases'])} validation case(s), last-epoch model (epoch {record['model_epoch']}), "
            f"{time.perf_counter() - started:.0f} s")
    missing = missing_jobs(out, plan)
    if missing:
        say(f"{len(jobs) - len(missing)} of {len(jobs)} jobs done; waiting for: "
            f"{', '.join(job.name for job in missing[:6])}{' ...' if len(missing) > 6 else ''} "
            "(other shards or processes); then: scnas cv -o OUT --report")
        return None
    return write_report(out, plan, say)


def missing_jobs(out: Path, plan: dict[str, Any], damage: list[str] | None = None) -> list[Job]:
    """The jobs without a good evaluation record; the damaged records are described in ``damage``."""
    missing = []
    for job in study_jobs(plan):
        try:
            if job_record(out, job) is None:
                missing.append(job)
        except DamagedFileError as exc:
            missing.append(job)
            if damage is not None:
                damage.append(str(exc))
    return missing


# ----------------------------------------------------------------------------------------- report


def fold_scores(out: Path, plan: dict[str, Any]) -> dict[str, dict[int, dict[str, float]]]:
    """genotype -> fold -> {class name: mean Dice over the fold's validation cases, "mean": over classes}."""
    names = {str(value): name for name, value in plan["labels"].items() if int(value) != 0}
    scores: dict[str, dict[int, dict[str, float]]] = {}
    for job in study_jobs(plan):
        record = job_record(out, job)
        if record.get("model_selection") != "last epoch":
            raise CVError(f"job {job.name} was scored with a model selected by {record.get('model_selection')}",
                          source=str(out / "jobs" / job.genotype / f"fold_{job.fold}" / DONE))
        per_class = {names.get(label, label): _nan(value) for label, value in record["mean"].items()}
        finite = [v for v in per_class.values() if not math.isnan(v)]
        per_class["mean"] = float(np.mean(finite)) if finite else float("nan")
        scores.setdefault(job.genotype, {})[job.fold] = per_class
    return scores


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def compare(first: list[float], others: list[list[float]]) -> dict[str, Any]:
    """The first genotype's per-fold mean Dice against the mean of ``others`` (random
    genotypes) on each fold: differences, folds won, and a paired t-test over folds."""
    from scipy import stats

    baseline = [float(np.mean(values)) for values in zip(*others)]
    differences = [a - b for a, b in zip(first, baseline)]
    result: dict[str, Any] = {"per_fold_difference": differences, "mean_difference": float(np.mean(differences)),
                              "folds_better": sum(d > 0 for d in differences), "folds": len(differences),
                              "others_below": sum(float(np.mean(o)) < float(np.mean(first)) for o in others),
                              "others": len(others)}
    if len(differences) >= 2 and np.std(differences) > 0:
        test = stats.ttest_rel(first, baseline)
        result["paired_t_test_p"] = float(test.pvalue)
    else:
        result["paired_t_test_p"] = None
    return result


def verdict(first: str, comparison: dict[str, Any], them: str) -> str:
    """The closing line: which way the answer went and how sure it is. ``them``: what the first
    genotype is compared with ("the 5 random genotypes' mean", "uresnet")."""
    d, p = comparison["mean_difference"], comparison["paired_t_test_p"]
    won = f"better on {comparison['folds_better']} of {comparison['folds']} fold(s)"
    ranked = (f"above {comparison['others_below']} of the {comparison['others']} in mean Dice"
              if comparison["others"] > 1 else "")
    detail = "; ".join(x for x in (won, ranked) if x)
    if p is None:
        return (f"{first} vs {them}: mean Dice difference {d:+.4f} ({detail}); too few folds (or identical "
                "differences) for a test: no conclusion")
    if p < 0.05:
        side = f"{first} beat {them}" if d > 0 else f"{them} beat {first}"
        return f"{side}: mean Dice difference {d:+.4f} ({detail}); paired t-test over folds p = {p:.3g} (< 0.05)"
    return (f"no evidence that {first} differs from {them}: mean Dice difference {d:+.4f} ({detail}); paired "
            f"t-test over folds p = {p:.3g} (not below 0.05). More folds, longer training or more random genotypes "
            "would tell")


def write_report(out: str | os.PathLike, plan: dict[str, Any] | None = None,
                 say: Callable[[str], None] = print) -> dict[str, Any]:
    """Gather every job's evaluation into results.{md,csv,json,png}; refuses an incomplete study."""
    out = Path(out)
    if plan is None:
        if not (out / "cv.json").exists():
            raise CVError("holds no study (no cv.json)", source=str(out))
        plan = read_plan(out / "cv.json")
    damage: list[str] = []
    missing = missing_jobs(out, plan, damage)
    if missing:
        raise CVError(source=str(out), problems=[Problem("", line) for line in [
            f"{len(missing)} of {len(study_jobs(plan))} jobs are not done ("
            f"{', '.join(job.name for job in missing[:6])}{' ...' if len(missing) > 6 else ''}); run the missing "
            "shards (or 'scnas cv -o OUT') first: a table over fewer folds would mislead", *damage]])
    scores = fold_scores(out, plan)
    classes = [name for name, value in plan["labels"].items() if int(value) != 0] + ["mean"]
    folds = plan["folds"]
    rows = []
    for entry in plan["genotypes"]:
        per_fold = scores[entry["name"]]
        summary = {}
        for cls in classes:
            values = [per_fold[f][cls] for f in folds]
            finite = [v for v in values if not math.isnan(v)]
            summary[cls] = {"mean": float(np.mean(finite)) if finite else float("nan"),
                            "sd": float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan"),
                            "per_fold": values}
        rows.append({**entry, "dice": summary})
    report: dict[str, Any] = {"protocol": "each genotype retrained on each fold's training cases; the last epoch's "
                                          "model predicts the fold's validation cases on their original grid; Dice "
                                          "per class (nnU-Net's NaN convention), mean over the fold's cases; mean "
                                          "and sd over folds",
                              "folds": folds, "classes": classes, "genotypes": rows}
    given = [r for r in rows if r["kind"] == "given"]
    randoms = [r for r in rows if r["kind"] == "random"]
    lines = leak_lines(given, folds)
    report["clean_folds"] = {r["name"]: clean_folds(r, folds) for r in given}
    first = given[0]
    if randoms:
        them = f"the mean of the {len(randoms)} random genotype(s) of equal FLOPs"
        comparison = compare(first["dice"]["mean"]["per_fold"], [r["dice"]["mean"]["per_fold"] for r in randoms])
        report["versus_random"] = {"genotype": first["name"], **comparison}
        lines.append(verdict(first["name"], comparison, them))
        clean = report["clean_folds"][first["name"]]
        if not clean:
            lines.append(f"no clean fold: every fold's validation cases were in {first['name']}'s search data, so "
                         "this study cannot tell whether the search helped (search per fold, or on other cases)")
        elif len(clean) < len(folds):   # the same comparison where the search saw none of the cases scored
            at = [folds.index(f) for f in clean]
            comparison = compare([first["dice"]["mean"]["per_fold"][i] for i in at],
                                 [[r["dice"]["mean"]["per_fold"][i] for i in at] for r in randoms])
            report["versus_random_clean_folds"] = {"genotype": first["name"], "folds_used": clean, **comparison}
            lines.append(f"on clean fold(s) only ({', '.join(map(str, clean))}): "
                         + verdict(first["name"], comparison, them))
    for other in given[1:]:
        comparison = compare(first["dice"]["mean"]["per_fold"], [other["dice"]["mean"]["per_fold"]])
        report.setdefault("versus_given", {})[other["name"]] = comparison
        lines.append(verdict(first["name"], comparison, other["name"]))
    report["conclusion"] = lines
    atomic_write_text(out / "results.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "results.csv", _csv(rows, classes, folds))
    atomic_write_text(out / "results.md", _markdown(report, rows, classes, folds))
    _plot(out / "results.png", rows, folds)
    for line in _markdown_table(rows, classes).splitlines():
        say(line)
    for line in lines:
        say(line)
    say(f"wrote {out / 'results.md'}, results.csv, results.json, results.png")
    return report


def _fmt(summary: dict[str, Any]) -> str:
    return "n/a" if math.isnan(summary["mean"]) else (
        f"{summary['mean']:.4f}" + ("" if math.isnan(summary["sd"]) else f" ± {summary['sd']:.4f}"))


def _markdown_table(rows: list[dict[str, Any]], classes: list[str]) -> str:
    head = "| genotype | stem | GFLOPs | " + " | ".join(classes) + " |"
    lines = [head, "|" + "---|" * (3 + len(classes))]
    for row in rows:
        label = row["name"] + (" (random)" if row["kind"] == "random" else "")
        lines.append(f"| {label} | {row['stem']} | {row['flops'] / 1e9:.2f} | "
                     + " | ".join(_fmt(row["dice"][c]) for c in classes) + " |")
    return "\n".join(lines)


def _markdown(report: dict[str, Any], rows: list[dict[str, Any]], classes: list[str], folds: list[int]) -> str:
    parts = ["# Cross-validation", "", report["protocol"] + ".", "",
             "Dice, mean ± sd over folds:", "", _markdown_table(rows, classes), "",
             "Mean Dice over classes per fold:", "",
             "| genotype | " + " | ".join(f"fold {f}" for f in folds) + " |", "|" + "---|" * (1 + len(folds))]
    for row in rows:
        parts.append(f"| {row['name']} | " + " | ".join(
            "n/a" if math.isnan(v) else f"{v:.4f}" for v in row["dice"]["mean"]["per_fold"]) + " |")
    if report["conclusion"]:
        parts += ["", *[f"- {line}" for line in report["conclusion"]]]
    return "\n".join(parts) + "\n"


def _csv(rows: list[dict[str, Any]], classes: list[str], folds: list[int]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["genotype", "kind", "stem", "flops", "hash", "fold", "class", "dice"])
    for row in rows:
        for cls in classes:
            for fold, value in zip(folds, row["dice"][cls]["per_fold"]):
                writer.writerow([row["name"], row["kind"], row["stem"], row["flops"], row["hash"], fold, cls,
                                 "" if math.isnan(value) else f"{value:.6f}"])
    return buffer.getvalue()


def _plot(path: Path, rows: list[dict[str, Any]], folds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scnas.figures import save_figure

    figure, axis = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.5))
    for x, row in enumerate(rows):
        values = row["dice"]["mean"]["per_fold"]
        axis.scatter([x] * len(values), values, s=18, color="tab:gray" if row["kind"] == "random" else "tab:blue")
        finite = [v for v in values if not math.isnan(v)]
        if finite:
            axis.hlines(np.mean(finite), x - 0.3, x + 0.3, color="black")
    axis.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=30, ha="right")
    axis.set_ylabel("mean Dice over classes")
    axis.set_title(f"per fold ({len(folds)}); line: mean; grey: random genotypes of equal FLOPs", fontsize=9)
    save_figure(figure, path)
