"""The records a cross-validation study writes and reads back, typed: the plan (``cv.json``),
a job's evaluation (``evaluation.json``) and a fold's search (``search.json``). Running
(:mod:`scnas.apps.cv.study`, :mod:`scnas.apps.cv.searches`) writes them; reporting
(:mod:`scnas.apps.cv.report`) reads them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from scnas.errors import DamagedFileError, ScnasError
from scnas.records import damaged, read_json

PLAN_FORMAT = "scnas-cv"
PLAN_VERSION = 1
DONE = "evaluation.json"
SEARCH_DONE = "search.json"
SEARCHED = "searched"      # the plan's name of the genotype a search per fold derives
PLAN_FIX = ("the study's plan cannot be rebuilt from its jobs: move cv.json away and run the same 'scnas cv' command "
            "again (the same genotypes, --data and settings give the same plan; finished jobs are kept), or put back "
            "a good copy")


class CVError(ScnasError):
    """A cross-validation study that cannot start, continue or be reported."""


class Entry(BaseModel):
    """A genotype of the study. ``stem``/``flops``/``hash`` are None where they differ per fold:
    the genotype a search per fold derives, and random genotypes matched to it fold by fold."""

    model_config = ConfigDict(extra="allow")
    name: str
    source: str = ""
    kind: Literal["given", "random", "searched"] = "given"
    stem: int | None = None
    flops: float | None = None
    hash: str | None = None
    search_data: dict[str, Any] | None = None   # what a given genotype's search saw (see study.search_overlap)

    @property
    def per_fold(self) -> bool:
        return self.kind == "searched" or (self.kind == "random" and self.stem is None)


class Plan(BaseModel):
    """``cv.json``: the request a study was started with and what it resolved to."""

    model_config = ConfigDict(extra="allow")
    format: str
    version: int
    request: dict[str, Any]
    cache: str
    task: str
    folds: list[int]
    genotypes: list[Entry]
    labels: dict[str, int]
    validation: dict[str, list[str]]

    def entry(self, name: str) -> Entry:
        return next(e for e in self.genotypes if e.name == name)

    @property
    def search_per_fold(self) -> bool:
        return bool(self.request.get("search"))


class Evaluation(BaseModel):
    """The fields of a job's ``evaluation.json`` that the report reads (and whose job it is)."""

    model_config = ConfigDict(extra="allow")
    model_selection: str
    mean: dict[str, float | None]
    genotype: str | None = None
    fold: int | None = None


class FlopMatch(BaseModel):
    """Where a random genotype landed against the FLOPs it was matched to."""

    genotype: str
    fold: int | None = None     # None: one match for every fold
    stem: int
    flops: float
    target: float
    target_genotype: str

    @property
    def relative(self) -> float:
        return self.flops / self.target - 1.0


class FoldSearch(BaseModel):
    """``searches/fold_K/search.json``: the search of fold K, done; what it saw and derived."""

    model_config = ConfigDict(extra="allow")
    fold: int
    genotype: str               # the derived genotype's file, relative to the study folder
    hash: str
    epoch: int                  # the epoch the genotype was derived at (of ``epochs``)
    epochs: int
    task: str                   # provenance.search.task
    cases: list[str]            # provenance.search.cases: every case the search saw
    validation_in_search: list[str]   # the fold's validation cases among them: always none
    alpha_movement: dict[str, dict[str, float]]
    stem: int                   # the retraining stem, and the derived genotype's FLOPs there
    flops: float
    random: list[FlopMatch]
    seconds: float
    derived_by: str = "alpha"   # what the cells were chosen by: softmax(alpha), or perturbation (DARTS-PT)


@dataclass(frozen=True)
class Job:
    """Retraining ``genotype`` (its name in the plan) on ``fold``, then scoring it."""

    genotype: str
    fold: int

    @property
    def name(self) -> str:
        return f"{self.genotype}/fold_{self.fold}"

    def folder(self, out: Path) -> Path:
        return out / "jobs" / self.genotype / f"fold_{self.fold}"


@dataclass(frozen=True)
class SearchJob:
    """The search of ``fold``'s training cases (search per fold)."""

    fold: int

    @property
    def name(self) -> str:
        return f"search/fold_{self.fold}"

    def folder(self, out: Path) -> Path:
        return out / "searches" / f"fold_{self.fold}"


def read_plan(path: Path) -> Plan:
    """A study's ``cv.json``; a damaged one is a ``DamagedFileError`` saying how to get one back."""
    return Plan.model_validate(read_json(path, PLAN_FIX, Plan))


def job_record(out: Path, job: Job) -> Evaluation | None:
    """The evaluation record of a finished ``job`` (None: not finished); a damaged one (truncated,
    empty, mistyped, another job's) is a ``DamagedFileError`` that says the job is done again."""
    path = job.folder(out) / DONE
    if not path.exists():
        return None
    fix = f"job {job.name} is done again by 'scnas cv -o {out}'"
    record = Evaluation.model_validate(read_json(path, fix, Evaluation))
    if record.genotype not in (None, job.genotype) or record.fold not in (None, job.fold):
        raise damaged(path, f"is damaged: it is the record of {record.genotype}/fold_{record.fold}", fix)
    return record


def search_record(out: Path, fold: int) -> FoldSearch | None:
    """The record of fold ``fold``'s finished search (None: not finished); a damaged one is a
    ``DamagedFileError`` that says the search is finished again (from its checkpoint)."""
    job = SearchJob(fold)
    path = job.folder(out) / SEARCH_DONE
    if not path.exists():
        return None
    record = FoldSearch.model_validate(read_json(path, f"{job.name} is finished again by 'scnas cv -o {out}'",
                                                 FoldSearch))
    if record.fold != fold:
        raise damaged(path, f"is damaged: it is the record of fold {record.fold}",
                      f"{job.name} is finished again by 'scnas cv -o {out}'")
    return record


def leak_lines(entries: list[Entry], folds: list[int]) -> list[str]:
    """One line per genotype whose search saw validation cases of the study: which folds, how
    many cases, which folds are clean."""
    lines = []
    for entry in entries:
        seen = entry.search_data
        leaked = {int(f): ids for f, ids in (seen or {}).get("validation_in_search", {}).items() if ids}
        if not leaked:
            continue
        clean = [f for f in folds if f not in leaked]
        cases = sum(len(ids) for ids in leaked.values())
        lines.append(f"{entry.name}'s search saw {cases} validation case(s) of fold(s) "
                     f"{', '.join(map(str, sorted(leaked)))} ({seen['cases']}): its Dice there is optimistic; "
                     f"clean fold(s): {', '.join(map(str, clean)) if clean else 'none'}")
    return lines


def clean_folds(entry: Entry, folds: list[int]) -> list[int]:
    """The folds none of whose validation cases were in ``entry``'s search data."""
    seen = (entry.search_data or {}).get("validation_in_search", {})
    return [f for f in folds if not seen.get(str(f))]


def study_jobs(plan: Plan) -> list[Job]:
    """Every (genotype, fold) retraining of the study, folds outermost, so that a first shard's
    early jobs give every genotype's fold 0."""
    return [Job(entry.name, fold) for fold in plan.folds for entry in plan.genotypes]


def search_jobs(plan: Plan) -> list[SearchJob]:
    """The searches of a search per fold (none otherwise)."""
    return [SearchJob(fold) for fold in plan.folds] if plan.search_per_fold else []


def missing_jobs(out: Path, plan: Plan, damage: list[str] | None = None) -> list[Job]:
    """The retrainings without a good evaluation record; the damaged records are described in ``damage``."""
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
