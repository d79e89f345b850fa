"""Reporting a finished cross-validation study: ``results.{md,csv,json,png}``.

Reads the plan and the jobs' records (:mod:`scnas.apps.cv.records`), never runs a job. Per
genotype and class: mean and sd over folds and the per-fold values; how far each random
genotype landed from the FLOPs it was matched to; with a search per fold, which genotype each
fold's search derived; and the closing lines: did the first genotype (the searched one) beat
the random genotypes, on how many folds, and how sure (a paired t-test over folds, and no
verdict from fewer than 3 folds)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import KW_ONLY, asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from scnas.errors import Problem
from scnas.fileio import atomic_write_text
from scnas.apps.cv.records import (DONE, CVError, Entry, FlopMatch, FoldSearch, Plan, clean_folds, job_record,
                                    leak_lines, missing_jobs, read_plan, search_record, study_jobs)
from scnas.apps.cv.searches import summary

MIN_FOLDS = 3
"""Fewer folds than this support no verdict: with 2, one unlucky fold decides it."""


@dataclass
class Summary:
    """One class's Dice of one genotype over the folds."""

    mean: float
    sd: float
    per_fold: list[float]


@dataclass
class Row:
    """A genotype of the report: its plan entry, its stem and FLOPs on each fold (they differ
    per fold with a search per fold), and its Dice per class."""

    entry: Entry
    stems: list[int]
    flops: list[float]
    _: KW_ONLY
    dice: dict[str, Summary]

    @property
    def name(self) -> str:
        return self.entry.name

    def to_dict(self) -> dict[str, Any]:
        return {**self.entry.model_dump(exclude_none=True), "stem_per_fold": self.stems, "flops_per_fold": self.flops,
                "dice": {c: asdict(s) for c, s in self.dice.items()}}


@dataclass
class Comparison:
    """The first genotype's per-fold mean Dice against the mean of others on each fold."""

    per_fold_difference: list[float]     # first minus the others' mean, per fold
    mean_difference: float
    folds_better: int
    _: KW_ONLY
    folds: int
    others_below: int                    # others whose mean over folds is below the first's
    others: int
    paired_t_test_p: float | None


def fold_scores(out: Path, plan: Plan) -> dict[str, dict[int, dict[str, float]]]:
    """genotype -> fold -> {class name: mean Dice over the fold's validation cases, "mean": over classes}."""
    names = {str(value): name for name, value in plan.labels.items() if int(value) != 0}
    scores: dict[str, dict[int, dict[str, float]]] = {}
    for job in study_jobs(plan):
        record = job_record(out, job)
        if record.model_selection != "last epoch":
            raise CVError(f"job {job.name} was scored with a model selected by {record.model_selection}",
                          source=str(job.folder(out) / DONE))
        per_class = {names.get(label, label): _nan(value) for label, value in record.mean.items()}
        finite = [v for v in per_class.values() if not math.isnan(v)]
        per_class["mean"] = float(np.mean(finite)) if finite else float("nan")
        scores.setdefault(job.genotype, {})[job.fold] = per_class
    return scores


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def compare(first: list[float], others: list[list[float]]) -> Comparison:
    """The first genotype's per-fold mean Dice against the mean of ``others`` (random
    genotypes) on each fold: differences, folds won, and a paired t-test over folds."""
    from scipy import stats

    baseline = [float(np.mean(values)) for values in zip(*others)]
    differences = [a - b for a, b in zip(first, baseline)]
    p = None
    if len(differences) >= 2 and np.std(differences) > 0:
        p = float(stats.ttest_rel(first, baseline).pvalue)
    return Comparison(per_fold_difference=differences, mean_difference=float(np.mean(differences)),
                      folds_better=sum(d > 0 for d in differences), folds=len(differences),
                      others_below=sum(float(np.mean(o)) < float(np.mean(first)) for o in others),
                      others=len(others), paired_t_test_p=p)


def verdict(first: str, comparison: Comparison, them: str) -> str:
    """The closing line: which way the answer went and how sure it is. ``them``: what the first
    genotype is compared with ("the 5 random genotypes' mean", "uresnet"). The difference is
    always stated as ``first`` minus ``them``; a winner is named only from a paired t-test
    below 0.05 over at least :data:`MIN_FOLDS` folds."""
    c = comparison
    d, p = c.mean_difference, c.paired_t_test_p
    difference = f"{first} minus {them}: {d:+.4f} mean Dice"
    ranked = f"above {c.others_below} of the {c.others} in mean Dice" if c.others > 1 else ""
    detail = "; ".join(x for x in (f"{first} better on {c.folds_better} of {c.folds} fold(s)", ranked) if x)
    tested = "" if p is None else f"; paired t-test over folds p = {p:.3g}"
    if c.folds < MIN_FOLDS:
        return (f"warning: {c.folds} fold(s) cannot support a verdict (at least {MIN_FOLDS} are needed, nnU-Net's 5 "
                f"advised): no winner declared; {difference} ({detail}{tested})")
    if p is None:
        return f"{difference} ({detail}); identical differences on every fold: no test, no conclusion"
    if p < 0.05:
        winner, loser = (first, them) if d > 0 else (them, first)
        return f"{winner} beat {loser} by {abs(d):.4f} mean Dice ({difference}; {detail}{tested} (< 0.05))"
    return (f"no evidence that {first} differs from {them}: {difference} ({detail}{tested}, not below 0.05). More "
            "folds, longer training or more random genotypes would tell")


def _rows(out: Path, plan: Plan, searches: dict[int, FoldSearch], classes: list[str]) -> list[Row]:
    scores = fold_scores(out, plan)
    rows = []
    for entry in plan.genotypes:
        per_fold = scores[entry.name]
        if entry.kind == "searched":
            stems = [searches[f].stem for f in plan.folds]
            flops = [searches[f].flops for f in plan.folds]
        elif entry.per_fold:
            matches = [next(m for m in searches[f].random if m.genotype == entry.name) for f in plan.folds]
            stems, flops = [m.stem for m in matches], [m.flops for m in matches]
        else:
            stems, flops = [int(entry.stem)] * len(plan.folds), [float(entry.flops)] * len(plan.folds)
        summary = {}
        for cls in classes:
            values = [per_fold[f][cls] for f in plan.folds]
            finite = [v for v in values if not math.isnan(v)]
            summary[cls] = Summary(mean=float(np.mean(finite)) if finite else float("nan"),
                                   sd=float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan"),
                                   per_fold=values)
        rows.append(Row(entry, stems, flops, dice=summary))
    return rows


def flop_matches(plan: Plan, searches: dict[int, FoldSearch]) -> list[FlopMatch]:
    """Where every random genotype landed against its FLOP target (per fold with a search per fold)."""
    if plan.search_per_fold:
        return [m for f in plan.folds for m in searches[f].random]
    randoms = [e for e in plan.genotypes if e.kind == "random"]
    if not randoms:
        return []
    first = next(e for e in plan.genotypes if e.kind != "random")
    return [FlopMatch(genotype=e.name, stem=int(e.stem), flops=float(e.flops), target=float(first.flops),
                      target_genotype=first.name) for e in randoms]


def _searches(out: Path, plan: Plan) -> dict[int, FoldSearch]:
    if not plan.search_per_fold:
        return {}
    found = {f: search_record(out, f) for f in plan.folds}
    absent = [f for f, record in found.items() if record is None]
    if absent:
        raise CVError(f"the search of fold(s) {', '.join(map(str, absent))} has no search.json; run the study "
                      "('scnas cv -o OUT') first", source=str(out))
    return found


PROTOCOL = ("each genotype retrained on each fold's training cases; the last epoch's model predicts the fold's "
            "validation cases on their original grid; Dice per class (nnU-Net's NaN convention), mean over the "
            "fold's cases; mean and sd over folds")
PER_FOLD_PROTOCOL = ("Search per fold: for each fold a search on that fold's training cases only (never its "
                     "validation cases), its last epoch's genotype derived, retrained on the fold and scored on "
                     "its validation cases; random genotypes widened to that fold's derived genotype's FLOPs; then ")


def write_report(out: str | os.PathLike, *, plan: Plan | None = None,
                 say: Callable[[str], None] = print) -> dict[str, Any]:
    """Gather every job's evaluation into results.{md,csv,json,png}; refuses an incomplete study.

    Args:
        out: the study folder.
        plan: the study's plan (None: read ``out/cv.json``).
        say: called with each line the report prints.
    """
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
    searches = _searches(out, plan)
    classes = [name for name, value in plan.labels.items() if int(value) != 0] + ["mean"]
    folds = plan.folds
    rows = _rows(out, plan, searches, classes)
    matches = flop_matches(plan, searches)
    protocol = PER_FOLD_PROTOCOL + PROTOCOL if searches else PROTOCOL[0].upper() + PROTOCOL[1:]
    report: dict[str, Any] = {"protocol": protocol,
                              "folds": folds, "classes": classes, "genotypes": [r.to_dict() for r in rows],
                              "flop_matching": [{**m.model_dump(), "relative": m.relative} for m in matches]}
    if searches:
        report["search"] = plan.request["search"]
        report["searches"] = [summary(searches[f]) for f in folds]
    given = [r for r in rows if r.entry.kind != "random"]
    randoms = [r for r in rows if r.entry.kind == "random"]
    lines = leak_lines([r.entry for r in given], folds)
    report["clean_folds"] = {r.name: clean_folds(r.entry, folds) for r in given}
    if searches:   # what each fold's search recorded it saw, checked again here
        report["clean_folds"][given[0].name] = [f for f in folds if not searches[f].validation_in_search]
    first = given[0]
    if randoms:
        them = f"the mean of the {len(randoms)} random genotype(s) of equal FLOPs"
        comparison = compare(first.dice["mean"].per_fold, [r.dice["mean"].per_fold for r in randoms])
        report["versus_random"] = {"genotype": first.name, **asdict(comparison)}
        lines.append(verdict(first.name, comparison, them))
        clean = report["clean_folds"][first.name]
        if not clean:
            lines.append(f"no clean fold: every fold's validation cases were in {first.name}'s search data, so "
                         "this study cannot tell whether the search helped (search per fold, or on other cases)")
        elif len(clean) < len(folds):   # the same comparison where the search saw none of the cases scored
            at = [folds.index(f) for f in clean]
            comparison = compare([first.dice["mean"].per_fold[i] for i in at],
                                 [[r.dice["mean"].per_fold[i] for i in at] for r in randoms])
            report["versus_random_clean_folds"] = {"genotype": first.name, "folds_used": clean, **asdict(comparison)}
            lines.append(f"on clean fold(s) only ({', '.join(map(str, clean))}): "
                         + verdict(first.name, comparison, them))
    for other in given[1:]:
        comparison = compare(first.dice["mean"].per_fold, [other.dice["mean"].per_fold])
        report.setdefault("versus_given", {})[other.name] = asdict(comparison)
        lines.append(verdict(first.name, comparison, other.name))
    report["conclusion"] = lines
    atomic_write_text(out / "results.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "results.csv", _csv(rows, classes, folds))
    atomic_write_text(out / "results.md", _markdown(report, rows, classes, folds, matches))
    _plot(out / "results.png", rows, folds)
    for line in _markdown_table(rows, classes).splitlines():
        say(line)
    for line in lines:
        say(line)
    say(f"wrote {out / 'results.md'}, results.csv, results.json, results.png")
    return report


def gflops(flops: float) -> str:
    """GFLOPs with 4 significant digits (trailing zeros kept): tiny networks differ in the
    third decimal."""
    value = flops / 1e9
    if value <= 0 or not math.isfinite(value):
        return f"{value:g}"
    return f"{value:.{max(0, 3 - math.floor(math.log10(value)))}f}"


def _span(values: list, show: Callable[[Any], str]) -> str:
    low, high = min(values), max(values)
    return show(low) if low == high else f"{show(low)}-{show(high)}"


def _fmt(summary: Summary) -> str:
    return "n/a" if math.isnan(summary.mean) else (
        f"{summary.mean:.4f}" + ("" if math.isnan(summary.sd) else f" ± {summary.sd:.4f}"))


def _markdown_table(rows: list[Row], classes: list[str]) -> str:
    head = "| genotype | stem | GFLOPs | " + " | ".join(classes) + " |"
    lines = [head, "|" + "---|" * (3 + len(classes))]
    for row in rows:
        label = row.name + (" (random)" if row.entry.kind == "random" else "")
        lines.append(f"| {label} | {_span(row.stems, str)} | {_span(row.flops, gflops)} | "
                     + " | ".join(_fmt(row.dice[c]) for c in classes) + " |")
    return "\n".join(lines)


def _markdown(report: dict[str, Any], rows: list[Row], classes: list[str], folds: list[int],
              matches: list[FlopMatch]) -> str:
    parts = ["# Cross-validation", "", report["protocol"] + ".", "",
             "Dice, mean ± sd over folds (stem and GFLOPs: their range over folds where they differ):", "",
             _markdown_table(rows, classes), "",
             "Mean Dice over classes per fold:", "",
             "| genotype | " + " | ".join(f"fold {f}" for f in folds) + " |", "|" + "---|" * (1 + len(folds))]
    for row in rows:
        parts.append(f"| {row.name} | " + " | ".join(
            "n/a" if math.isnan(v) else f"{v:.4f}" for v in row.dice["mean"].per_fold) + " |")
    if report.get("searches"):
        parts += ["", "Search per fold (alpha moved: the largest probability as a multiple of uniform, per cell type):",
                  "", "| fold | derived genotype | epoch | searched cases | validation cases in search | alpha moved "
                  "| stem | GFLOPs |", "|" + "---|" * 8]
        for s in report["searches"]:
            moved = ", ".join(f"{name} {m['largest_x_uniform']:.2f}x" for name, m in s["alpha_movement"].items())
            parts.append(f"| {s['fold']} | {s['hash']} | {s['epoch']}/{s['epochs']} | {s['searched_cases']} | "
                         f"{s['validation_cases_in_search']} | {moved} | {s['stem']} | {gflops(s['flops'])} |")
    if matches:
        parts += ["", "FLOP matching (where each random genotype landed against its target):", "",
                  "| random genotype | fold | stem | GFLOPs | target GFLOPs | difference |", "|" + "---|" * 6]
        for m in matches:
            parts.append(f"| {m.genotype} | {'all' if m.fold is None else m.fold} | {m.stem} | {gflops(m.flops)} | "
                         f"{gflops(m.target)} ({m.target_genotype}) | {m.relative:+.2%} |")
    if report["conclusion"]:
        parts += ["", *[f"- {line}" for line in report["conclusion"]]]
    return "\n".join(parts) + "\n"


def _csv(rows: list[Row], classes: list[str], folds: list[int]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["genotype", "kind", "stem", "flops", "hash", "fold", "class", "dice"])
    for row in rows:
        for cls in classes:
            for i, (fold, value) in enumerate(zip(folds, row.dice[cls].per_fold)):
                writer.writerow([row.name, row.entry.kind, row.stems[i], row.flops[i], row.entry.hash or "", fold,
                                 cls, "" if math.isnan(value) else f"{value:.6f}"])
    return buffer.getvalue()


def _plot(path: Path, rows: list[Row], folds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scnas.figures import save_figure

    figure, axis = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.5))
    for x, row in enumerate(rows):
        values = row.dice["mean"].per_fold
        axis.scatter([x] * len(values), values, s=18, color="tab:gray" if row.entry.kind == "random" else "tab:blue")
        finite = [v for v in values if not math.isnan(v)]
        if finite:
            axis.hlines(np.mean(finite), x - 0.3, x + 0.3, color="black")
    axis.set_xticks(range(len(rows)), [r.name for r in rows], rotation=30, ha="right")
    axis.set_ylabel("mean Dice over classes")
    axis.set_title(f"per fold ({len(folds)}); line: mean; grey: random genotypes of equal FLOPs", fontsize=9)
    save_figure(figure, path)
