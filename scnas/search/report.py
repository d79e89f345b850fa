"""Does a search find something? Measurements over several searches of the same data.

A search that found something gives the same answer from different seeds, and an answer that
is not the collapse DARTS-style searches are known for (parameter-free operations everywhere,
Zela et al. 2020). For a set of search run folders this module measures, per cell type:

- **agreement**: for every candidate edge of the supernet, the best non-zero operation of the
  final softmax(alpha) (the operation derivation puts on that edge when it keeps it), compared
  between every pair of runs: the share of (pair, edge) on which the two agree. Chance is
  ``1 / (non-zero operations)``; the p-value is a permutation test that shuffles each run's
  operations over the edges of the cell type (so each run keeps how often it chose each
  operation): a collapse that puts max-pool everywhere agrees perfectly and is not significant.
  A second p-value renames each run's operations by a random permutation instead (each run
  keeps which of its edges share an operation, not which one it is): it asks whether the seeds
  chose the same *operations*, which a task that wants one operation on many edges needs (the
  edge shuffle cannot see agreement there), and which a shared collapse passes too. A third
  renames within each kind (operations with weights among themselves, parameter-free ones
  among themselves): runs that all avoid one kind, as ``--free-penalty`` makes them, agree
  beyond the second test's chance by that alone, and not beyond this one's.
- **by perturbation** (``by="perturbation"``): each edge's operation is the one whose removal
  raised the supernet's loss most (``RUN/perturbation.json``, :mod:`scnas.search.perturb`), and
  the cells are those the scores derive.
- **parameter-free share**: the share of the derived cells' edges whose operation has no
  weights (identity, pooling), against random genotypes of the same vocabulary and size (what
  ``scnas genotype random`` draws), with p-values for "more" and "fewer" from resampling their
  shares in groups as large as the number of runs.
- **parameter-free probability per epoch**: the mean over edges of softmax(alpha)'s mass on the
  parameter-free operations (and on ``zero``), from the genotypes the search wrote each epoch.
- **supernet loss per run**: the last epoch's ``theta_loss`` and ``alpha_loss`` (metrics.jsonl);
  a run whose loss ended far above the best run's (more than twice it, and more than
  ``STUCK_MARGIN`` higher) is named: its supernet learned less than the others', so its alpha
  may point at nothing (the paper's Theta optimiser leaves a stuck run now and then).
- **Hessian eigenvalue per epoch**, when the search computed it (``--hessian-iterations``): the
  dominant eigenvalue of the alpha loss's Hessian, R-DARTS's indicator of a coming collapse.

Torch-free when read by alpha: it reads the run folders' YAML and JSON only.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scnas.errors import ScnasError
from scnas.genotype import CELL_TYPES, Genotype, random_genotype, read_genotype
from scnas.genotype.ops import OPS, ZERO

PERMUTATIONS = 10_000
RANDOM_GENOTYPES = 200
STUCK_MARGIN = 0.05   # a run's final supernet loss this much above, and twice, the best run's: named


class SearchReportError(ScnasError):
    """Search runs that cannot be compared or read."""


def parameter_free(ops: list[str]) -> list[str]:
    """The operations of ``ops`` without weights, ``zero`` aside (it is no operation)."""
    return [op for op in ops if op != ZERO and not OPS[op].parametric]


@dataclass
class SearchRun:
    """What a search run folder says about its result: the final genotype (with softmax(alpha)
    in its provenance), the genotype of every epoch, and ``metrics.jsonl``; read ``by``
    perturbation, also the scores of ``RUN/perturbation.json`` (:mod:`scnas.search.perturb`)
    and the cells they derive (``derived``; by alpha, ``derived`` is the final genotype)."""

    folder: Path
    genotype: Genotype
    epochs: list[tuple[int, Genotype]]
    _: KW_ONLY
    metrics: list[dict[str, Any]]
    scores: dict[str, np.ndarray] | None = None
    derived: Genotype | None = None

    def __post_init__(self) -> None:
        if self.derived is None:
            self.derived = self.genotype

    @property
    def seed(self) -> Any:
        return ((self.genotype.provenance.search or {}) if self.genotype.provenance else {}).get("seed")

    def best(self, cell: str) -> tuple[list[tuple[int, int]], np.ndarray]:
        """Per candidate edge of ``cell``, the index of its best non-zero operation: by alpha
        (:func:`best_nonzero`), or by the largest rise in loss when read by perturbation."""
        edges, best = best_nonzero(self.genotype, cell)
        if self.scores is None:
            return edges, best
        rows = np.array(self.scores[cell], dtype=float)
        if ZERO in self.genotype.ops:
            rows[:, list(self.genotype.ops).index(ZERO)] = -np.inf
        from scnas.search.supernet import cell_edges   # torch: only for runs read by perturbation

        order = {pair: i for i, pair in enumerate(cell_edges(self.genotype.nodes))}
        return edges, np.array([int(rows[order[pair]].argmax()) for pair in edges])


def read_run(folder: str | Path, by: str = "alpha") -> SearchRun:
    """Read a search run folder (``genotype.yaml``, ``genotypes/epoch_NNNN.yaml``, ``metrics.jsonl``;
    with ``by="perturbation"`` also ``perturbation.json``, written by ``scnas derive --by perturbation``)."""
    folder = Path(folder)
    final = folder / "genotype.yaml"
    if not final.exists():
        raise SearchReportError("is not a search run folder with a finished epoch (no genotype.yaml)",
                                source=str(folder))
    genotype = read_genotype(final)
    if not (genotype.provenance and genotype.provenance.probabilities):
        raise SearchReportError("has no provenance.probabilities: not written by 'scnas search'", source=str(final))
    epochs = []
    for path in sorted((folder / "genotypes").glob("epoch_*.yaml")):
        match = re.fullmatch(r"epoch_(\d+)\.yaml", path.name)
        if match:
            epochs.append((int(match.group(1)), read_genotype(path)))
    metrics = []
    log = folder / "metrics.jsonl"
    if log.exists():
        for number, line in enumerate(log.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    metrics.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SearchReportError(f"line {number}: not JSON ({exc.msg})", source=str(log)) from None
    if by == "alpha":
        return SearchRun(folder, genotype, epochs, metrics=metrics)
    if by != "perturbation":
        raise SearchReportError(f"reads a run by alpha or by perturbation, not by {by!r}")
    from scnas.search.derive import rederive   # torch: only for runs read by perturbation

    scores = _perturbation_scores(folder, genotype)
    settings = _search_settings(folder)
    derived = rederive(genotype, settings.get("derive", "top-k"), settings.get("top_k", 2), source=str(final),
                       max_free=settings.get("max_free"), perturbation=scores)
    return SearchRun(folder, genotype, epochs, metrics=metrics,
                     scores={cell: np.array(rows) for cell, rows in scores["scores"].items()}, derived=derived)


def _perturbation_scores(folder: Path, genotype: Genotype) -> dict[str, Any]:
    """``RUN/perturbation.json``, checked against the run's ops and final epoch."""
    from scnas.search.perturb import SCORES_FILE, scores_problem

    path = folder / SCORES_FILE
    if not path.exists():
        raise SearchReportError(f"has no {SCORES_FILE}: score it first with: scnas derive {folder} --by perturbation "
                                "-o <genotype file>", source=str(folder))
    try:
        scores = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SearchReportError(f"not JSON ({exc.msg}); delete it and score again", source=str(path)) from None
    problem = scores_problem(scores, list(genotype.ops), genotype.nodes)
    if problem:
        raise SearchReportError(f"{problem}; delete it and score again (scnas derive --by perturbation)",
                                source=str(path))
    epoch = genotype.provenance.epoch if genotype.provenance else None
    if scores.get("epoch") != epoch:
        raise SearchReportError(f"scores the checkpoint of epoch {scores.get('epoch')}, but genotype.yaml is from "
                                f"epoch {epoch}: score it again with scnas derive --by perturbation", source=str(path))
    return scores


def _search_settings(folder: Path) -> dict[str, Any]:
    """The derivation settings of the run's ``config.json`` (empty where it has none)."""
    try:
        return dict(json.loads((folder / "config.json").read_text()).get("search") or {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}


def probabilities(genotype: Genotype, cell: str) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The candidate edges of ``cell`` and softmax(alpha) over them, (edges, ops) in the genotype's op order."""
    entries = sorted(genotype.provenance.probabilities.get(cell, []), key=lambda e: (e.target, e.source))
    edges = [(e.source, e.target) for e in entries]
    return edges, np.array([[float(e.p.get(op, 0.0)) for op in genotype.ops] for e in entries])


def best_nonzero(genotype: Genotype, cell: str) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Per candidate edge, the index (in ``genotype.ops``) of its most probable non-zero operation."""
    edges, p = probabilities(genotype, cell)
    if ZERO in genotype.ops:
        p = p.copy()
        p[:, genotype.ops.index(ZERO)] = -1.0
    return edges, p.argmax(axis=1)


def pairwise_agreement(choices: np.ndarray) -> float:
    """Mean over pairs of runs of the share of edges with the same choice; ``choices`` (runs, edges)."""
    pairs = list(itertools.combinations(range(len(choices)), 2))
    return float(np.mean([np.mean(choices[a] == choices[b]) for a, b in pairs]))


def permutation_p(choices: np.ndarray, rng: np.random.Generator, permutations: int = PERMUTATIONS) -> float:
    """P(agreement >= observed) when each run's choices are shuffled over the edges independently
    (each run keeps its operation counts), with the observed arrangement counted once."""
    observed = pairwise_agreement(choices)
    at_least = 1
    for _ in range(permutations):
        shuffled = np.stack([rng.permutation(row) for row in choices])
        at_least += pairwise_agreement(shuffled) >= observed - 1e-12
    return at_least / (permutations + 1)


def relabel_p(choices: np.ndarray, labels: list[int] | list[list[int]], rng: np.random.Generator, *,
              permutations: int = PERMUTATIONS) -> float:
    """P(agreement >= observed) when each run's operations are renamed by its own random
    permutation of ``labels`` (the indices the choices are drawn from: the non-zero ops): each
    run keeps which of its edges share an operation, not which operation that is; the observed
    arrangement counted once. The test for "the seeds chose the same operations" on a task that
    wants one operation on many edges, where :func:`permutation_p` cannot tell (shuffling the
    edges of such a run changes nothing).

    ``labels`` given as groups (lists of indices) renames each group within itself: with the
    operations with weights as one group and the parameter-free ones as the other, runs that
    all avoid one kind (as ``--free-penalty`` makes them) no longer agree by that alone.

    Args:
        choices: (runs, edges) operation indices.
        labels: the indices the choices are drawn from (the non-zero operations), or groups of them.
        rng: the random generator.
        permutations: the test's draws.
    """
    groups = [np.asarray(g) for g in labels] if len(labels) and np.ndim(labels[0]) == 1 else [np.asarray(labels)]
    groups = [g for g in groups if g.size]
    if not groups:
        raise ValueError("no labels to rename the choices with")
    every = np.concatenate(groups)
    if len(set(every.tolist())) != every.size:
        raise ValueError(f"the label groups {[g.tolist() for g in groups]} overlap: a renaming must be a permutation")
    outside = sorted(set(np.unique(choices).tolist()) - set(every.tolist()))
    if outside:
        raise ValueError(f"choices {outside} are not among the labels {every.tolist()}")
    observed = pairwise_agreement(choices)
    rename = np.arange(max(int(every.max()), int(choices.max())) + 1)
    at_least = 1
    for _ in range(permutations):
        renamed = []
        for row in choices:
            for group in groups:
                rename[group] = rng.permutation(group)
            renamed.append(rename[row])
        at_least += pairwise_agreement(np.stack(renamed)) >= observed - 1e-12
    return at_least / (permutations + 1)


def free_share(genotype: Genotype, cell: str | None = None) -> float:
    """Share of the derived edges (of ``cell``, or of all four cells) whose operation has no weights."""
    free = set(parameter_free(list(genotype.ops)))
    edges = [e for name in ([cell] if cell else CELL_TYPES) for e in genotype.cell(name).edges]
    return float(np.mean([e.op in free for e in edges])) if edges else float("nan")


def random_free_shares(nodes: int, ops: list[str], genotypes: int = RANDOM_GENOTYPES) -> np.ndarray:
    """The parameter-free share of random genotypes (seeds 0 .. genotypes-1)."""
    return np.array([free_share(random_genotype(seed, nodes, ops)) for seed in range(genotypes)])


def share_p_values(observed: float, runs: int, shares: np.ndarray, *, rng: np.random.Generator,
                   draws: int = PERMUTATIONS) -> tuple[float, float]:
    """P(mean of ``runs`` random genotypes' shares >= ``observed``) and P(<= ``observed``), by
    resampling ``shares``: is the searches' mean share unusual for as many random genotypes?

    Args:
        observed: the searches' mean share.
        runs: the number of searches.
        shares: the shares of random genotypes.
        rng: the random generator.
        draws: resamplings.
    """
    means = rng.choice(shares, size=(draws, runs)).mean(axis=1)
    return (float((1 + np.sum(means >= observed - 1e-12)) / (draws + 1)),
            float((1 + np.sum(means <= observed + 1e-12)) / (draws + 1)))


def supernet_loss(run: SearchRun) -> dict[str, float]:
    """The last epoch's ``theta_loss`` (weight set) and ``alpha_loss`` (architecture set) of
    ``run``'s metrics.jsonl, where it has them."""
    last = run.metrics[-1] if run.metrics else {}
    return {key: round(float(last[key]), 4) for key in ("theta_loss", "alpha_loss")
            if isinstance(last.get(key), (int, float))}


def stuck_runs(runs: list[dict[str, Any]], margin: float = STUCK_MARGIN) -> list[dict[str, Any]]:
    """The entries of ``runs`` (the report's) whose final ``alpha_loss`` is more than twice the
    lowest finite one and more than ``margin`` above it, or is not finite: supernets that learned
    less than the best one."""
    best = best_loss(runs)
    if best is None or sum("alpha_loss" in r for r in runs) < 2:
        return []
    return [r for r in runs if "alpha_loss" in r and (not math.isfinite(r["alpha_loss"]) or
                                                       (r["alpha_loss"] > 2 * best and r["alpha_loss"] > best + margin))]


def best_loss(runs: list[dict[str, Any]]) -> float | None:
    """The lowest finite final ``alpha_loss`` of the report's ``runs`` (None: none has one)."""
    finite = [r["alpha_loss"] for r in runs if "alpha_loss" in r and math.isfinite(r["alpha_loss"])]
    return min(finite) if finite else None


def mass_per_epoch(run: SearchRun) -> list[dict[str, Any]]:
    """Per epoch and cell type, the mean over edges of softmax(alpha) on the parameter-free
    operations and on ``zero``; with the Hessian eigenvalue where metrics.jsonl has it."""
    eigen = {m.get("epoch"): m.get("alpha_hessian_eigenvalue") for m in run.metrics}
    rows = []
    for epoch, genotype in run.epochs:
        ops = list(genotype.ops)
        free = [ops.index(op) for op in parameter_free(ops)]
        row: dict[str, Any] = {"epoch": epoch, "parameter_free": {}, "zero": {}}
        for cell in CELL_TYPES:
            _, p = probabilities(genotype, cell)
            row["parameter_free"][cell] = round(float(p[:, free].sum(axis=1).mean()), 4)
            row["zero"][cell] = round(float(p[:, ops.index(ZERO)].mean()), 4) if ZERO in ops else None
        if eigen.get(epoch) is not None:
            row["hessian_eigenvalue"] = eigen[epoch]
        rows.append(row)
    return rows


def recovery(runs: list[SearchRun], planted: Genotype, cells: tuple[str, ...] | None = None) -> dict[str, Any]:
    """How often the runs' best non-zero operation on an edge of the planted genotype is the
    planted one, per cell type and over all, against chance (1 / non-zero operations), with a
    one-sided binomial p-value (edges and runs counted as independent trials: an indication).
    ``cells``: count only these cell types (a task that needs an operation in some cells only,
    e.g. :func:`scnas.search.planted.context_cases`); None: all four."""
    from scipy.stats import binomtest

    counted = tuple(CELL_TYPES) if cells is None else tuple(dict.fromkeys(cells))   # each cell type once
    unknown = [c for c in counted if c not in CELL_TYPES]
    if unknown or not counted:
        raise SearchReportError(f"planted cells {list(counted)}: each must be one of {', '.join(CELL_TYPES)}")

    ops = list(runs[0].genotype.ops)
    chance = 1 / len([op for op in ops if op != ZERO])
    # What a search gets by merely avoiding parameter-free operations: 1/(ops with weights) on a
    # planted edge with weights, nothing on a parameter-free one (1/4 when every planted op has weights).
    planted_ops = [e.op for cell in counted for e in planted.cell(cell).edges if e.op in ops]
    weighted = float(np.mean([OPS[op].parametric for op in planted_ops])) / \
        len([op for op in ops if op != ZERO and OPS[op].parametric]) if planted_ops else 0.0
    result: dict[str, Any] = {"chance": round(chance, 4), "chance_among_weighted": round(weighted, 4),
                              "counted_cells": list(counted), "cells": {}}
    hits = trials = 0
    overlaps: list[float] = []     # per (cell, run): the multiset overlap on the planted edges
    wanted_per_cell: list[list[int]] = []
    for cell in counted:
        edges, _ = runs[0].best(cell)
        wanted = [(edges.index((e.source, e.target)), e.op) for e in planted.cell(cell).edges
                  if (e.source, e.target) in edges and e.op in ops]
        found = [[int(run.best(cell)[1][i]) for i, _ in wanted] for run in runs]
        matches = [int(got == ops.index(op)) for row in found for got, (_, op) in zip(row, wanted)]
        hits, trials = hits + sum(matches), trials + len(matches)
        planted_ops = [ops.index(op) for _, op in wanted]
        cell_overlaps = [multiset_overlap(row, planted_ops) for row in found] if wanted else []
        overlaps += cell_overlaps
        if wanted:
            wanted_per_cell.append(planted_ops)
        result["cells"][cell] = {"planted_edges": len(wanted),
                                 "recovered": round(float(np.mean(matches)), 4) if matches else None,
                                 "recovered_as_multiset": round(float(np.mean(cell_overlaps)), 4)
                                 if cell_overlaps else None}
    result.update(recovered=round(hits / trials, 4) if trials else None, trials=trials,
                  x_chance=round(hits / trials / chance, 2) if trials else None,
                  x_chance_among_weighted=round(hits / trials / weighted, 2) if trials and weighted else None,
                  p=float(binomtest(hits, trials, chance, alternative="greater").pvalue) if trials else None)
    if overlaps:
        nonzero = [i for i, op in enumerate(ops) if op != ZERO]
        observed = float(np.mean(overlaps))
        expected, p_value = _multiset_chance(wanted_per_cell, len(runs), nonzero, observed)
        result["multiset"] = {"recovered": round(observed, 4), "chance": round(expected, 4),
                              "x_chance": round(observed / expected, 2), "p": p_value}
    return result


def multiset_overlap(found: list[int], planted: list[int]) -> float:
    """The share of a cell's planted edges whose operations the found ones cover when the order
    of edges is ignored: |found ∩ planted| as multisets, over the planted edges. Edges of a cell
    are partly interchangeable (two inputs of a node commute), so this is reported beside the
    strict per-edge recovery, never instead of it."""
    from collections import Counter

    return sum((Counter(found) & Counter(planted)).values()) / len(planted)


def _multiset_chance(planted_cells: list[list[int]], runs: int, nonzero: list[int], observed: float,
                     draws: int = 4000, seed: int = 0) -> tuple[float, float]:
    """The multiset overlap a search that picks operations uniformly at random gets (its mean),
    and P(a mean over as many runs and cells >= ``observed``), by simulation (seeded)."""
    rng = np.random.default_rng(seed)
    means = np.zeros(draws)
    for planted in planted_cells:
        picks = rng.choice(nonzero, size=(draws, runs, len(planted)))
        means += np.array([[multiset_overlap(list(row), planted) for row in draw] for draw in picks]).mean(axis=1)
    means /= len(planted_cells)
    return float(means.mean()), float((1 + np.sum(means >= observed - 1e-12)) / (draws + 1))


def search_report(folders: list[str | Path], seed: int = 0, permutations: int = PERMUTATIONS,
                  *, planted: Genotype | None = None, planted_cells: tuple[str, ...] | None = None,
                  by: str = "alpha") -> dict[str, Any]:
    """The measurements above for the search runs in ``folders`` (the same nodes and operations);
    with ``planted``, how often they recover its operations (:func:`recovery`).

    Args:
        folders: search run folders.
        seed: seeds the random genotypes and the permutation test.
        permutations: the permutation test's draws.
        planted: the genotype that planted the labels (None: none).
        planted_cells: the cell types whose recovery counts (None: all four).
        by: ``alpha`` (each edge's best op by softmax(alpha), the cells of genotype.yaml) or
            ``perturbation`` (by the scores of ``RUN/perturbation.json``, and the cells they derive).
    """
    if planted_cells is not None and planted is None:
        raise SearchReportError("planted_cells counts the recovery of a planted genotype: give it as planted")
    runs = [read_run(folder, by) for folder in folders]
    first = runs[0].genotype
    for run in runs[1:]:
        if run.genotype.nodes != first.nodes or list(run.genotype.ops) != list(first.ops):
            raise SearchReportError(f"searched {run.genotype.nodes} nodes over {list(run.genotype.ops)}, but "
                                    f"{runs[0].folder} searched {first.nodes} over {list(first.ops)}: only runs of "
                                    "one search space can be compared", source=str(run.folder))
    ops = list(first.ops)
    nonzero_indices = [i for i, op in enumerate(ops) if op != ZERO]
    nonzero = len(nonzero_indices)
    free = set(parameter_free(ops))
    kinds = [[i for i in nonzero_indices if ops[i] not in free], [i for i in nonzero_indices if ops[i] in free]]
    rng = np.random.default_rng(seed)
    kind_rng = np.random.default_rng([seed, 1])   # its own stream: the other p-values stay as they were
    shares = random_free_shares(first.nodes, ops)
    expected = float(shares.mean())
    report: dict[str, Any] = {
        "runs": [{"folder": str(r.folder), "seed": r.seed, "epochs": len(r.epochs),
                  "parameter_free_share": round(free_share(r.derived), 4), **supernet_loss(r)} for r in runs],
        "operations": ops, "parameter_free_operations": parameter_free(ops), "nodes": first.nodes,
        "agreement_chance": round(1 / nonzero, 4), "permutations": permutations,
        "random_parameter_free_share": round(expected, 4), "cells": {}}
    for cell in CELL_TYPES:
        edges, _ = runs[0].best(cell)
        choices = []
        for run in runs:
            run_edges, best = run.best(cell)
            if run_edges != edges:
                raise SearchReportError(f"provenance.probabilities.{cell} covers other edges than {runs[0].folder}'s",
                                        source=str(run.folder))
            choices.append(best)
        entry: dict[str, Any] = {"parameter_free_share": [round(free_share(r.derived, cell), 4) for r in runs]}
        if len(runs) >= 2:
            matrix = np.stack(choices)
            entry["agreement"] = round(pairwise_agreement(matrix), 4)
            entry["agreement_p"] = round(permutation_p(matrix, rng, permutations), 4)
            entry["agreement_p_relabelled"] = round(relabel_p(matrix, nonzero_indices, rng, permutations=permutations), 4)
            entry["agreement_p_relabelled_within_kind"] = round(relabel_p(matrix, kinds, kind_rng,
                                                                          permutations=permutations), 4)
        report["cells"][cell] = entry
    observed = float(np.mean([free_share(r.derived) for r in runs]))
    more, less = share_p_values(observed, len(runs), shares, rng=rng, draws=permutations)
    report.update(parameter_free_share_mean=round(observed, 4), parameter_free_p_more=round(more, 4),
                  parameter_free_p_less=round(less, 4))
    report["per_epoch"] = {str(r.folder): mass_per_epoch(r) for r in runs}
    if planted is not None:
        report["planted"] = recovery(runs, planted, planted_cells)
    report["verdict"] = verdict_lines(report)
    return report


def verdict_lines(report: dict[str, Any]) -> list[str]:
    """What the numbers say, in words: agreement beyond chance, and collapse or not."""
    lines = []
    if len(report["runs"]) >= 2:
        agreeing = [c for c, e in report["cells"].items() if e["agreement_p"] < 0.05]
        renamed = [c for c, e in report["cells"].items() if e.get("agreement_p_relabelled", 1.0) < 0.05]
        within = [c for c, e in report["cells"].items() if e.get("agreement_p_relabelled_within_kind", 1.0) < 0.05]
        lines.append(
            f"seeds agree beyond chance (permutation p < 0.05) in {len(agreeing)} of {len(report['cells'])} cell "
            f"types{': ' + ', '.join(agreeing) if agreeing else ''}; chance agreement is "
            f"{report['agreement_chance']:.3f}; on which operations they choose (each run's operations renamed at "
            f"random, p < 0.05): {len(renamed)} of {len(report['cells'])}{': ' + ', '.join(renamed) if renamed else ''}"
            " (one operation shared everywhere counts there, a collapse too); renamed within their kind (with "
            f"weights, parameter-free), which avoiding one kind alike does not pass: {len(within)} of "
            f"{len(report['cells'])}{': ' + ', '.join(within) if within else ''}")
    else:
        lines.append("one run: agreement between seeds needs at least two searches of the same data")
    planted = report.get("planted")
    if planted and planted["trials"]:
        where = "" if len(planted.get("counted_cells", CELL_TYPES)) == len(CELL_TYPES) else \
            f" (counted in {', '.join(planted['counted_cells'])} only)"
        lines.append(f"planted operations{where} recovered on {planted['recovered']:.0%} of {planted['trials']} "
                     f"(edge, run) "
                     f"trials: {planted['x_chance']:.2f}x chance ({planted['chance']:.3f}; one-sided binomial "
                     f"p = {planted['p']:.3g}), {planted['x_chance_among_weighted'] or 0:.2f}x what a search that "
                     f"only avoids parameter-free operations gets ({planted['chance_among_weighted']:.3f})")
        multiset = planted.get("multiset")
        if multiset:
            lines.append(f"as op multisets per cell (edge order ignored): {multiset['recovered']:.0%} of the planted "
                         f"operations found, {multiset['x_chance']:.2f}x chance ({multiset['chance']:.3f}; "
                         f"p = {multiset['p']:.3g})")
    share, expected = report["parameter_free_share_mean"], report["random_parameter_free_share"]
    more, less = report["parameter_free_p_more"], report["parameter_free_p_less"]
    if more < 0.05:
        judged = f"more than random genotypes have (p = {more:.3g}): a sign of collapse"
    elif less < 0.05:
        judged = f"fewer than random genotypes have (p = {less:.3g})"
    else:
        judged = f"as many as random genotypes have (p = {min(more, less):.3g}, either way)"
    lines.append(f"parameter-free operations: {share:.0%} of the derived edges against {expected:.0%} in random "
                 f"genotypes: {judged}")
    stuck = stuck_runs(report["runs"])
    if stuck:
        best = best_loss(report["runs"])
        named = ", ".join(f"{Path(r['folder']).name} ({r['alpha_loss']:.3f})" for r in stuck)
        lines.append(f"supernet loss on the architecture set at the end: {named} against the best run's "
                     f"{'(none finite)' if best is None else format(best, '.3f')}: "
                     f"{'this supernet' if len(stuck) == 1 else 'these supernets'} learned less, so "
                     f"{'its' if len(stuck) == 1 else 'their'} alpha may point at nothing; compare the report "
                     "without it, or search again with another seed")
    return lines
