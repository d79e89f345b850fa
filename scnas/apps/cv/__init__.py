"""Cross-validation of genotypes, the paper's Table-1 protocol (``scnas cv``).

Every genotype is retrained on every fold's training cases; the **last epoch's** model (never
one chosen on validation Dice) predicts the fold's validation cases on their original grid;
Dice per class is computed there. A fold's score is the mean over its validation cases; the
table gives, per genotype and class, the mean and standard deviation over folds, and the
per-fold values.

``random N`` adds N seeded random genotypes (two inputs per node, like a derived cell), each
widened to the FLOPs of the first genotype, and the report compares the first genotype with
them fold by fold: the question "did the search beat random?". With a search per fold
(``request["search"]``, :mod:`scnas.apps.cv.searches`) the first genotype is the one each
fold's own search derived from that fold's training cases, and the random ones are widened
to its FLOPs fold by fold.

A task folder given as data is prepared once into its shared cache (``$SCNAS_CACHE``, see
``scnas.data.cache.shared_cache_folder``), which every fold and genotype reads. The study folder::

    OUT/cv.json                 the request and the plan (genotypes, stems, FLOPs, folds)
    OUT/genotypes/NAME.yaml     every genotype of the study (random ones included)
    OUT/genotypes/searched/fold_K.yaml   the genotype fold K's search derived (search per fold)
    OUT/searches/fold_K/        that search's run folder and search.json (its record)
    OUT/jobs/NAME/fold_K/       train/ (the run folder), predictions/, evaluation.json
    OUT/results.{md,csv,json,png}

The package: :mod:`.records` (the typed records), :mod:`.study` (plan, jobs, shards, claims),
:mod:`.searches` (the search per fold), :mod:`.report` (the results).
"""

from scnas.apps.cv.claims import job_claim
from scnas.apps.cv.records import (DONE, PLAN_FORMAT, PLAN_VERSION, SEARCH_DONE, SEARCHED, CVError, Entry, Evaluation,
                                    FlopMatch, FoldSearch, Job, Plan, SearchJob, clean_folds, job_record, leak_lines,
                                    missing_jobs, read_plan, search_record, study_jobs)
from scnas.apps.cv.report import Comparison, compare, verdict, write_report
from scnas.apps.cv.searches import SEARCH_FIELDS
from scnas.apps.cv.study import parse_shard, plan_study, run_study, search_overlap, slurm_array_shard

__all__ = ["DONE", "PLAN_FORMAT", "PLAN_VERSION", "SEARCH_DONE", "SEARCHED", "CVError", "Comparison", "Entry",
           "Evaluation", "FlopMatch", "FoldSearch", "Job", "Plan", "SEARCH_FIELDS", "SearchJob", "clean_folds",
           "compare", "job_claim", "job_record", "leak_lines", "missing_jobs", "parse_shard", "plan_study", "read_plan",
           "run_study", "search_overlap", "search_record", "slurm_array_shard", "study_jobs", "verdict",
           "write_report"]
