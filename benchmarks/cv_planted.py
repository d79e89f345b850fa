"""The honest protocol on the planted task: ``scnas cv --search-per-fold`` against random genotypes.

A planted-architecture task (``scnas.search.planted``, labels made by a teacher network of
``planted_bench.PLANTED``); on each fold a search of the fold's training cases with the
countermeasures that recovered most of the planted cells in docs/search.md ("all three"),
the derived genotype retrained and scored on the fold, beside 5 random genotypes matched to
its FLOPs fold by fold. Prints and records the command, the settings and the verdict line,
whatever it says.

    OMP_NUM_THREADS=1 python benchmarks/cv_planted.py [--folds 0,1,2] [--quick]
    OMP_NUM_THREADS=1 python benchmarks/cv_planted.py --task context --cases 20 --shards 2
    OMP_NUM_THREADS=1 python benchmarks/cv_planted.py --task context --setting full --cases 20 --shards 2
    OMP_NUM_THREADS=1 python benchmarks/cv_planted.py --task context --setting full-penalty --cases 20 --shards 2

``--task context``: the context task instead (``scnas.search.planted.context_cases``, depth 1),
whose needed operation a search of 1,000 step pairs with a warm-up recovered at 3.5x chance
(docs/search.md); searched with that setting, retrained 300 steps at lr 3e-3 (where the
learnability probe shows the planted cells' lead), recovery counted in the decoder-normal cell.
``--setting full`` searches it with DARTS's relaxation instead (300 step pairs, no augmentation, cells
by perturbation) and retrains without augmentation (cv_planted-context-full.json).
``--setting full-penalty`` adds ``--free-penalty 0.05`` to that search and derives the cells by
alpha (cv_planted-context-full-penalty005.json).
``--shards N`` runs the study as N processes of one thread (``scnas cv --shard i/N``).

Writes benchmarks/results/cv_planted.json (``--task context``: cv_planted-context.json;
``--quick``: a tiny run that checks the script, results/cv_planted-quick.json). Given an ``--out`` that holds a finished run, it reports that
run again (``scnas cv -o OUT --report``) and keeps the time the run took.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from planted_bench import PLANTED  # noqa: E402

from scnas.genotype import genotype_from_data  # noqa: E402
from scnas.search.planted import (CONTEXT_CELLS, context_genotype, write_context_dataset,  # noqa: E402
                                  write_planted_dataset)
from scnas.search.report import search_report  # noqa: E402

SEARCH = ["--search-stem", "4", "--search-patch", "32", "32", "32", "--search-epochs", "6", "--search-steps", "20",
          "--search-batch-size", "1", "--alpha-lr", "0.03", "--nodes", "2", "--tau-max", "5", "--tau-min", "0.5",
          "--warmup-epochs", "2", "--free-penalty", "0.3", "--max-free", "1"]
TRAIN = ["--stem", "8", "--patch", "32", "32", "32", "--batch-size", "2", "--epochs", "5", "--steps-per-epoch", "10",
         "--lr", "1e-3", "--device", "cpu", "--spacing", "1", "1", "1"]
CONTEXT_SEARCH = ["--search-stem", "4", "--search-patch", "32", "32", "32", "--search-epochs", "10",
                  "--search-steps", "100", "--search-batch-size", "1", "--alpha-lr", "0.01", "--nodes", "2",
                  "--tau-max", "5", "--tau-min", "0.5", "--warmup-epochs", "2"]
CONTEXT_TRAIN = ["--depth", "1", "--stem", "8", "--patch", "32", "32", "32", "--batch-size", "2", "--epochs", "10",
                 "--steps-per-epoch", "30", "--lr", "3e-3", "--device", "cpu", "--spacing", "1", "1", "1"]
# DARTS's relaxation without augmentation, cells by perturbation (docs/search.md, "what goes further"),
# retrained without augmentation too: the context rule is exact
CONTEXT_RELAXED_SEARCH = ["--search-stem", "4", "--search-patch", "32", "32", "32", "--search-epochs", "3",
                          "--search-steps", "100", "--search-batch-size", "1", "--alpha-lr", "0.01", "--nodes", "2",
                          "--tau-max", "5", "--tau-min", "0.5", "--sampling", "full"]
CONTEXT_FULL_TRAIN = [*CONTEXT_TRAIN, "--no-augment"]
# --setting: (search options, training options, cells derived by, results file suffix); full-penalty is the
# same relaxation with a small penalty on parameter-free operations, cells by alpha: the setting that
# recovered the context at 4x chance with no collapse on phantoms (docs/search.md)
CONTEXT_SETTINGS = {
    "warm-up": (CONTEXT_SEARCH, CONTEXT_TRAIN, "alpha", ""),
    "full": ([*CONTEXT_RELAXED_SEARCH, "--derive-by", "perturbation"], CONTEXT_FULL_TRAIN, "perturbation", "-full"),
    "full-penalty": ([*CONTEXT_RELAXED_SEARCH, "--free-penalty", "0.05"], CONTEXT_FULL_TRAIN, "alpha",
                     "-full-penalty005"),
}
QUICK = {"--search-epochs": "2", "--search-steps": "2", "--warmup-epochs": "1", "--epochs": "1",
         "--steps-per-epoch": "2"}


def _quick(args: list[str]) -> list[str]:
    return [QUICK.get(args[i - 1], a) if i else a for i, a in enumerate(args)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", default="0,1,2")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--random", type=int, default=5)
    parser.add_argument("--task", choices=("planted", "context"), default="planted")
    parser.add_argument("--setting", choices=list(CONTEXT_SETTINGS), default="warm-up",
                        help="with --task context: the search of 1,000 step pairs with a warm-up (Algorithm 1); "
                             "full: 300 step pairs of DARTS's relaxation without augmentation, cells by perturbation; "
                             "full-penalty: the same with --free-penalty 0.05, cells by alpha")
    parser.add_argument("--shards", type=int, default=1, help="processes (one thread each) sharing the study")
    parser.add_argument("--quick", action="store_true", help="2 folds, 1 random genotype, searches of 2 x 2 steps")
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    if args.shards < 1:
        parser.error(f"--shards {args.shards}: give 1 or more")
    context = args.task == "context"
    if args.setting != "warm-up" and not context:
        parser.error(f"--setting {args.setting} is for --task context")
    search, train, derived_by, suffix = CONTEXT_SETTINGS[args.setting] if context else (SEARCH, TRAIN, "alpha", "")
    search, train = (_quick(search), _quick(train)) if args.quick else (search, train)
    folds, randoms = ("0,1", 1) if args.quick else (args.folds, args.random)
    root = Path(args.out or tempfile.mkdtemp(prefix="scnas-cv-planted-"))
    root.mkdir(parents=True, exist_ok=True)
    planted = context_genotype(4) if context else genotype_from_data(PLANTED, source="planted genotype")
    task = root / "task"
    command = ["scnas", "--threads", "1", "cv", "--search-per-fold", "--data", str(task), "--folds", folds,
               "--random", str(randoms), *search, *train, "-o", str(root / "study")]
    env = {**os.environ, "SCNAS_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    timing = root / "seconds.json"
    if timing.exists():   # a finished study in --out: report it again (with this scnas), keep the run's time
        seconds = json.loads(timing.read_text())["seconds"]
        subprocess.run([sys.executable, "-m", "scnas", "cv", "-o", str(root / "study"), "--report"], env=env,
                       check=True)
    else:
        if context:
            write_context_dataset(task, args.cases, force=True)
        else:
            write_planted_dataset(task, planted, cases=args.cases, shape=(32, 32, 32), stem=4, seed=0, force=True)
        print("$ " + shlex.join(command) + (f" --shard i/{args.shards}" if args.shards > 1 else ""), flush=True)
        started = time.perf_counter()
        if args.shards > 1:   # every shard of the study at once, then the report of all of them
            shards = [subprocess.Popen([sys.executable, "-m", "scnas", *command[1:], "--shard", f"{i}/{args.shards}"],
                                       env=env) for i in range(1, args.shards + 1)]
            if any(shard.wait() for shard in shards):
                sys.exit("a shard of the study failed")
            subprocess.run([sys.executable, "-m", "scnas", "cv", "-o", str(root / "study"), "--report"], env=env,
                           check=True)
        else:
            subprocess.run([sys.executable, "-m", "scnas", *command[1:]], env=env, check=True)
        seconds = time.perf_counter() - started
        timing.write_text(json.dumps({"seconds": seconds}) + "\n")
    report = json.loads((root / "study" / "results.json").read_text())
    # how often the fold's searches picked the planted operations (docs/search.md's measure), against chance
    recovery = search_report([root / "study" / "searches" / f"fold_{f}" for f in folds.split(",")],
                             permutations=2000, planted=planted, planted_cells=CONTEXT_CELLS if context else None,
                             by=derived_by)
    shown = shlex.join(["scnas", *command[1:-1], "runs/cv-planted"]).replace(str(task), f"{args.task}-task")
    made = ("scnas.search.planted.write_context_dataset(task, cases)" if context else
            "scnas.search.planted.write_planted_dataset(planted, cases, shape=(32, 32, 32), stem=4, seed=0)")
    result = {"command": shown, "setting": args.setting if context else None, "shards": args.shards, "seconds": round(seconds, 1), "cases": args.cases,
              "planted": planted.to_dict() if context else PLANTED,
              "counted_cells": list(CONTEXT_CELLS) if context else None, "task": made,
              "searches": report["searches"], "planted_recovery": recovery["planted"],
              "flop_matching": report["flop_matching"],
              "genotypes": [{k: g[k] for k in ("name", "kind", "stem_per_fold", "flops_per_fold")}
                            | {"mean_dice": g["dice"]["mean"]} for g in report["genotypes"]],
              "versus_random": report.get("versus_random"), "conclusion": report["conclusion"],
              "table": (root / "study" / "results.md").read_text()}
    print(f"\n{seconds:.0f} s ({seconds / 60:.1f} min)")
    for line in report["conclusion"]:
        print(line)
    name = "cv_planted-quick" if args.quick else ("cv_planted-context" + suffix if context else "cv_planted")
    out = Path(__file__).parent / "results" / f"{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
