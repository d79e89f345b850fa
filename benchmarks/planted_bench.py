"""Does the search recover a planted architecture? Recovery against chance, per setting.

A task whose labels a network of a known genotype makes (``scnas.search.planted``: smooth
noise in, the teacher's thresholded class-1 score out), searched with several seeds in each
setting (the paper's, and each countermeasure); per setting: how often the runs' best non-zero
operation on a planted edge is the planted one, against chance (1/7), the same per cell as op
multisets (edge order ignored; beside the strict figure), seed agreement and the
parameter-free share (``scnas.search.report``), how far alpha moved, and the seconds a search
took. ``--probe STEPS`` first checks that the task can reward the planted operations at all:
fresh students of the planted genotype, of the other task's genotype and of random genotypes,
trained STEPS steps each, and their held-out loss (``scnas.search.planted.learnability``).

Two planted genotypes: ``mixed`` (the default; half of every cell parameter-free, so that a
search that merely avoids those operations loses) and ``weighted`` (every edge a convolution).
A third task, ``context``, is made by a rule instead of a teacher (``context_cases``: a voxel is
foreground where it and the voxel 4 further along an axis are both bright) and searched at depth
1: it needs ``sep_dil4_conv_3x3x3`` in the decoder-normal cell, and recovery counts that cell only.

    python benchmarks/planted_bench.py [--task mixed] [--seeds 5] [--epochs 6] [--steps 20]
        [--settings "paper,all three:5,aux-skip:3"] [--probe 150] [--quick]
    python benchmarks/planted_bench.py --task context --probe 300 --settings paper:5 --epochs 6 \
        --steps 20 --alpha-lr 0.05 --name planted-context
    python benchmarks/planted_bench.py --task context --settings paper:5 --epochs 10 --steps 100 \
        --alpha-lr 0.01 --name planted-context-1000      # and warm-up:5, --name planted-context-1000-warmup
    python benchmarks/planted_bench.py --task context --settings "full no-augment:5" --epochs 3 --steps 100 \
        --alpha-lr 0.01 --perturbation 8 --name planted-context-full   # DARTS's relaxation, cells by perturbation

Writes benchmarks/results/planted.json (``--quick``: a tiny run that checks the script,
results/planted-quick.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import agreement_summary, search_or_reuse
from rich.console import Console
from rich.table import Table

from scnas.data import PrepareSettings, prepare_dataset
from scnas.fileio import atomic_write_text
from scnas.genotype import CELL_TYPES, genotype_from_data
from scnas.search import SearchConfig
from scnas.genotype import random_genotype
from scnas.search.planted import (CONTEXT_CELLS, context_cases, context_genotype, learnability, planted_cases,
                                  write_context_dataset, write_planted_dataset)
from scnas.search.perturb import run_scores
from scnas.search.report import search_report

# Two nodes per cell; every planted op has weights and a receptive field of its own, so cells of
# identity and pooling cannot make the teacher's function.
PLANTED = {"format": "scnas-genotype", "version": 1, "nodes": 2, "cells": {
    "encoder_normal": {"edges": [{"from": 0, "to": 2, "op": "sep_dil2_conv_3x3x3"},
                                 {"from": 1, "to": 2, "op": "conv_3x3x3"},
                                 {"from": 1, "to": 3, "op": "sep_dil3_conv_3x3x3"},
                                 {"from": 2, "to": 3, "op": "conv_3x3x3"}], "concat": [2, 3]},
    "reduction": {"edges": [{"from": 0, "to": 2, "op": "conv_3x3x3"}, {"from": 1, "to": 2, "op": "conv_3x3x3"},
                            {"from": 1, "to": 3, "op": "sep_dil2_conv_3x3x3"},
                            {"from": 2, "to": 3, "op": "conv_3x3x3"}], "concat": [2, 3]},
    "decoder_normal": {"edges": [{"from": 0, "to": 2, "op": "sep_dil4_conv_3x3x3"},
                                 {"from": 1, "to": 2, "op": "conv_3x3x3"},
                                 {"from": 0, "to": 3, "op": "sep_dil2_conv_3x3x3"},
                                 {"from": 2, "to": 3, "op": "sep_dil3_conv_3x3x3"}], "concat": [2, 3]},
    "expansion": {"edges": [{"from": 0, "to": 2, "op": "conv_3x3x3"}, {"from": 1, "to": 2, "op": "conv_3x3x3"},
                            {"from": 1, "to": 3, "op": "sep_dil2_conv_3x3x3"},
                            {"from": 2, "to": 3, "op": "conv_3x3x3"}], "concat": [2, 3]}}}

# Half of every cell parameter-free (max/avg pooling, identity), half with weights: a search that
# merely avoids parameter-free operations recovers at most half of it. Its teacher's labels reward
# the planted cells more than PLANTED's do (docs/search.md, "Can the task tell?").
PLANTED_MIXED = {"format": "scnas-genotype", "version": 1, "nodes": 2, "cells": {
    "encoder_normal": {"edges": [{"from": 0, "to": 2, "op": "max_pool_3x3x3"},
                                 {"from": 1, "to": 2, "op": "sep_dil4_conv_3x3x3"},
                                 {"from": 1, "to": 3, "op": "identity"},
                                 {"from": 2, "to": 3, "op": "conv_3x3x3"}], "concat": [2, 3]},
    "reduction": {"edges": [{"from": 0, "to": 2, "op": "max_pool_3x3x3"}, {"from": 1, "to": 2, "op": "conv_3x3x3"},
                            {"from": 1, "to": 3, "op": "avg_pool_3x3x3"},
                            {"from": 2, "to": 3, "op": "sep_dil2_conv_3x3x3"}], "concat": [2, 3]},
    "decoder_normal": {"edges": [{"from": 0, "to": 2, "op": "sep_dil4_conv_3x3x3"},
                                 {"from": 1, "to": 2, "op": "max_pool_3x3x3"},
                                 {"from": 0, "to": 3, "op": "identity"},
                                 {"from": 2, "to": 3, "op": "sep_dil3_conv_3x3x3"}], "concat": [2, 3]},
    "expansion": {"edges": [{"from": 0, "to": 2, "op": "avg_pool_3x3x3"}, {"from": 1, "to": 2, "op": "conv_3x3x3"},
                            {"from": 1, "to": 3, "op": "sep_dil2_conv_3x3x3"},
                            {"from": 2, "to": 3, "op": "max_pool_3x3x3"}], "concat": [2, 3]}}}

TASKS = {"mixed": PLANTED_MIXED, "weighted": PLANTED, "context": None}   # context: context_genotype()

SETTINGS = {
    "paper": {},
    "warm-up": {"warmup_epochs": 2},
    "penalty": {"free_penalty": 0.3},
    "cap": {"max_free": 1},
    "all three": {"warmup_epochs": 2, "free_penalty": 0.3, "max_free": 1},
    "aux-skip": {"aux_skip": 1.0},
    "warm-up + aux-skip": {"warmup_epochs": 2, "aux_skip": 1.0},
    # DARTS's continuous relaxation (every op on every edge, weighted by softmax(alpha)) and no
    # augmentation: intensity and spatial augmentation change the rule a context task's labels follow.
    "no augmentation": {"augment": False},
    "full no-augment": {"sampling": "full", "augment": False},
    # the full relaxation collapses to identity on phantoms; countermeasures that change its training
    "full no-augment + aux-skip": {"sampling": "full", "augment": False, "aux_skip": 1.0},
    "full no-augment + penalty": {"sampling": "full", "augment": False, "free_penalty": 0.3},
    # a sixth of that penalty: enough to stop the collapse, small enough to let one weighted op win
    "full no-augment + penalty 0.05": {"sampling": "full", "augment": False, "free_penalty": 0.05},
    # ... with Adam's usual betas for Theta instead of the paper's (0.1, 0.001): do fewer supernets get stuck?
    "full no-augment + penalty 0.05 + Adam betas": {"sampling": "full", "augment": False, "free_penalty": 0.05,
                                                    "theta_betas": (0.9, 0.999)},
}


def _with_cell(planted, op: str, cell: str = "decoder_normal"):
    """``planted`` with every edge of ``cell`` ``op`` (the context task's other students)."""
    data = planted.to_dict()
    for edge in data["cells"][cell]["edges"]:
        edge["op"] = op
    return genotype_from_data(data, source=f"{cell} {op}")


def _best_ops(folders: list[Path], by: str = "alpha") -> dict:
    """Per cell type: the candidate edges, and per run the best non-zero operation on each (what
    agreement and recovery are computed from), by alpha or by perturbation."""
    from scnas.search.report import read_run

    runs = [read_run(folder, by) for folder in folders]
    result = {}
    for cell in CELL_TYPES:
        edges, _ = runs[0].best(cell)
        result[cell] = {"edges": [list(e) for e in edges],
                        "runs": [[run.genotype.ops[i] for i in run.best(cell)[1]] for run in runs]}
    return result


def _moved(folder: Path) -> float:
    """The last epoch's largest softmax(alpha) as a multiple of uniform, mean over the cell types."""
    last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    return sum(last["alpha_largest_x_uniform"].values()) / len(last["alpha_largest_x_uniform"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20, help="Theta/alpha step pairs per epoch")
    parser.add_argument("--alpha-lr", type=float, default=0.03)
    parser.add_argument("--settings", default="paper,all three", help="comma-separated, of: " + ", ".join(SETTINGS)
                        + "; NAME:N runs N seeds for that setting instead of --seeds")
    parser.add_argument("--task", choices=list(TASKS), default="mixed")
    parser.add_argument("--task-seed", type=int, default=0, help="the seed that draws the task's cases")
    parser.add_argument("--first-seed", type=int, default=0, help="search seeds start here (to split the seeds of a "
                        "setting over processes; scnas search-report RUN... gathers them)")
    parser.add_argument("--cases", type=int, default=12, help="cases of the task (the probe holds out a fifth, "
                        "at least 4)")
    parser.add_argument("--probe", type=int, default=0, metavar="STEPS",
                        help="first train students of the planted and of 4 random genotypes this many steps each")
    parser.add_argument("--probe-lr", type=float, default=3e-3, help="the students' Adam learning rate")
    parser.add_argument("--name", default="planted", help="results/NAME.json (another name keeps planted.json)")
    parser.add_argument("--perturbation", type=int, default=0, metavar="PATCHES",
                        help="also derive every run by perturbation (scnas.search.perturb) on this many "
                             "architecture-set patches, and report recovery and agreement that way too")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 2 settings, 3 epochs of 2 steps")
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one); searches it already "
                        "holds of the same settings are reported again (finished) or resumed (interrupted), and "
                        "the probe reported again; a search of other settings there is refused")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.steps, args.settings = 2, 3, 2, "paper,all three"
        args.probe = min(args.probe, 2)
    chosen = {}
    for item in args.settings.split(","):
        name, _, seeds = item.strip().partition(":")
        if name not in SETTINGS:
            parser.error(f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
        chosen[name] = int(seeds) if seeds else args.seeds
    root = Path(args.out or tempfile.mkdtemp(prefix="scnas-planted-"))
    root.mkdir(parents=True, exist_ok=True)
    context = args.task == "context"
    planted = context_genotype(4) if context else genotype_from_data(TASKS[args.task], source="planted genotype")
    depth = 1 if context else 3
    cases = 8 if args.quick else args.cases
    out = Path(__file__).parent / "results" / ("planted-quick.json" if args.quick else f"{args.name}.json")
    record = {"task": args.task, "cases": cases, "task_seed": args.task_seed, "first_seed": args.first_seed,
              "seeds": args.seeds, "epochs": args.epochs, "steps_per_epoch": args.steps,
              "alpha_lr": args.alpha_lr, "planted": planted.to_dict(), "depth": depth,
              "counted_cells": list(CONTEXT_CELLS) if context else None, "results": {}}
    if args.probe:
        if context:
            students = {"planted": planted, **{f"decoder dil{d}": _with_cell(planted, f"sep_dil{d}_conv_3x3x3")
                                               for d in (2, 3)}, "every edge conv": _with_cell(planted, "conv_3x3x3"),
                        # the searches often put sep_dil4 in the reduction cell too: does that route fit the rule?
                        "reduction dil4, decoder conv": _with_cell(_with_cell(planted, "conv_3x3x3"),
                                                                 "sep_dil4_conv_3x3x3", "reduction")}
        else:
            students = {"planted": planted, **{f"{other} task's genotype": genotype_from_data(TASKS[other], source=other)
                                               for other in TASKS if other not in (args.task, "context")}}
        students.update({f"random {k}": random_genotype(k, planted.nodes) for k in range(4)})
        kept = root / f"learnability-{args.task}-{args.probe}-{cases}-{args.probe_lr:g}.json"
        losses = json.loads(kept.read_text()) if args.out and kept.exists() else \
            learnability(context_cases(cases, seed=args.task_seed) if context else
                         planted_cases(planted, cases, shape=(32, 32, 32), stem=4, seed=args.task_seed),
                         students, args.probe, held_out=max(4, cases // 5), lr=args.probe_lr, depth=depth)
        atomic_write_text(kept, json.dumps(losses) + "\n")
        record["learnability"] = {"steps": args.probe, "lr": args.probe_lr, "held_out_soft_jaccard_loss": losses}
        print("learnability (held-out soft-Jaccard loss after", args.probe, "steps):",
              ", ".join(f"{k} {v:.3f}" for k, v in losses.items()), flush=True)
    task = (write_context_dataset(root / "task", cases, seed=args.task_seed, force=True) if context else
            write_planted_dataset(root / "task", planted, cases=cases, shape=(32, 32, 32), stem=4,
                                  seed=args.task_seed, force=True))
    cache = prepare_dataset(task, root / "cache", PrepareSettings(target_spacing=(1.0, 1.0, 1.0)),
                            progress=False).cache
    results = record["results"]
    for name, seeds in chosen.items():
        folders, seconds = [], []
        for seed in range(args.first_seed, args.first_seed + seeds):
            folder = root / name.replace(" ", "-") / f"seed{seed}"
            config = SearchConfig(data=str(cache), stem=4, nodes=2, patch=(32, 32, 32), batch_size=1,
                                  epochs=args.epochs, steps_per_epoch=args.steps, tau_max=5.0, tau_min=0.5,
                                  alpha_lr=args.alpha_lr, val_batches=1, seed=seed, device="cpu", plots=False, depth=depth,
                                  **SETTINGS[name])
            search_or_reuse(config, folder, reuse=bool(args.out))   # a finished run in --out is reported, not redone
            done = folder / "metrics.jsonl"
            seconds.append(sum(json.loads(line)["seconds"] for line in done.read_text().splitlines()))
            folders.append(folder)
            print(f"{name}, seed {seed}: {seconds[-1]:.0f} s", flush=True)
        results[name] = {"settings": SETTINGS[name], "seeds": seeds,
                         "seconds_per_search": round(sum(seconds) / len(seconds), 1),   # the epochs' own seconds
                         "alpha_largest_x_uniform": round(sum(map(_moved, folders)) / len(folders), 2)}
        for by in ("alpha", "perturbation") if args.perturbation else ("alpha",):
            scored = [run_scores(folder, patches=args.perturbation) for folder in folders] if by == "perturbation" \
                else []
            report = search_report(folders, permutations=2000, planted=planted,
                                   planted_cells=CONTEXT_CELLS if context else None, by=by)
            summary = {"planted": report["planted"], **agreement_summary(report), "best_ops": _best_ops(folders, by)}
            if by == "alpha":
                results[name].update(summary)
            else:
                timed = [r["seconds"] for r in scored if r.get("seconds") is not None]   # as each was scored
                summary["seconds_per_run"] = round(sum(timed) / len(timed), 1) if timed else None
                summary["patches"] = args.perturbation
                results[name]["by_perturbation"] = summary
        atomic_write_text(out, json.dumps(record, indent=2) + "\n")   # each setting as soon as it is done
    table = Table(title=f"planted architecture ({args.task}): {args.epochs} epochs x {args.steps} steps, "
                        f"alpha lr {args.alpha_lr}; chance 1/7")
    for column in ("setting", "by", "seeds", "recovered", "x chance (1/7)", "p", "as multisets (x chance)",
                   "cells agreeing: edges shuffled / ops renamed (p<0.05)", "param-free share",
                   "alpha moved (x uniform)", "s / search"):
        table.add_column(column)
    for name, r in results.items():
        for by, q in (("alpha", r), ("perturbation", r.get("by_perturbation"))):
            if q is None:
                continue
            p = q["planted"]
            table.add_row(name, by, str(r["seeds"]), f"{p['recovered']:.3f}", f"{p['x_chance']:.2f}", f"{p['p']:.3g}",
                          f"{p['multiset']['recovered']:.3f} ({p['multiset']['x_chance']:.2f})",
                          f"{sum(v is not None and v < 0.05 for v in q['agreement_p'].values())} / "
                          f"{sum(v is not None and v < 0.05 for v in q['agreement_p_relabelled'].values())}",
                          f"{q['parameter_free_share']:.0%} (random {q['random_parameter_free_share']:.0%})",
                          f"{r['alpha_largest_x_uniform']:.2f}", f"{r['seconds_per_search']:.0f}")
    Console(width=150).print(table)
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
