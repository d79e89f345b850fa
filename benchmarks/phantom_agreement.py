"""Do searches of a phantom task agree between seeds? Seed agreement and parameter-free share
per setting, at the demo's budget or another (``scnas.search.report``).

A 10-case phantom task (``scnas data phantom``: 2 channels, 2 classes, 40x40x20 at 1x1x2 mm,
resampled to 1 mm), searched with 5 seeds per setting: stem 4, 4 nodes, patch 32³, 3 epochs x
8 steps of batch 1, ``--alpha-lr 0.1``, tau 5 -> 0.5; one thread. ``--epochs``, ``--steps``,
``--alpha-lr`` and ``--nodes`` set another budget (the planted benchmark's best setting was
measured at 3 x 100 step pairs, alpha lr 0.01).

    python benchmarks/phantom_agreement.py [--seeds 5] [--settings paper,aux-skip] [--out DIR] [--name NAME]
    python benchmarks/phantom_agreement.py --settings "full no-augment" --epochs 3 --steps 100 --alpha-lr 0.01 \
        --perturbation 8 --out /tmp/phantom-300 --name phantom_agreement-300-full

Writes benchmarks/results/phantom_agreement.json (``--name``: NAME.json); both agreement
p-values of the report (edges shuffled; operations renamed); with ``--perturbation``, also with
the cells derived by perturbation.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import agreement_summary, search_or_reuse
from planted_bench import SETTINGS

from scnas.data import PrepareSettings, prepare_dataset, write_phantom_dataset
from scnas.fileio import atomic_write_text
from scnas.search import SearchConfig
from scnas.search.perturb import run_scores
from scnas.search.report import search_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="search seeds start here (to split the seeds of a "
                        "setting over processes sharing one --out; a last run over all of them reports)")
    parser.add_argument("--settings", default="paper,aux-skip", help="comma-separated, of: " + ", ".join(SETTINGS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="Theta/alpha step pairs per epoch")
    parser.add_argument("--alpha-lr", type=float, default=0.1)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--perturbation", type=int, default=0, metavar="PATCHES",
                        help="also derive every run by perturbation (scnas.search.perturb) on this many "
                             "architecture-set patches, and report agreement and parameter-free share that way too")
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one); searches it already "
                        "holds of the same settings are reported again (finished) or resumed (interrupted); a "
                        "search of other settings there is refused")
    parser.add_argument("--name", default="phantom_agreement", help="results/NAME.json")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="scnas-phantom-agreement-"))
    root.mkdir(parents=True, exist_ok=True)
    task = root / "task"
    if not (args.out and (task / "dataset.json").exists()):   # another process may be searching its cache
        write_phantom_dataset(task, cases=10, channels=2, foreground_classes=2, shape=(40, 40, 20),
                              spacing=(1.0, 1.0, 2.0), seed=0, force=True)
    cache = prepare_dataset(task, root / "cache", PrepareSettings(target_spacing=(1.0, 1.0, 1.0)),
                            progress=False).cache
    record = {"budget": {"stem": 4, "nodes": args.nodes, "patch": [32, 32, 32], "epochs": args.epochs,
                         "steps_per_epoch": args.steps, "alpha_lr": args.alpha_lr, "tau": [5.0, 0.5]}, "results": {}}
    for name in (s.strip() for s in args.settings.split(",")):
        settings = dict(SETTINGS[name])
        if settings.get("warmup_epochs", 0) >= args.epochs:
            settings["warmup_epochs"] = max(args.epochs - 1, 0)
        folders, seconds = [], []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            folder = root / name.replace(" ", "-") / f"seed{seed}"
            search_or_reuse(SearchConfig(data=str(cache), stem=4, nodes=args.nodes, patch=(32, 32, 32),
                                         epochs=args.epochs, steps_per_epoch=args.steps, tau_max=5.0, tau_min=0.5,
                                         alpha_lr=args.alpha_lr, seed=seed, device="cpu", plots=False, **settings),
                            folder, reuse=bool(args.out))
            done = folder / "metrics.jsonl"
            seconds.append(sum(json.loads(line)["seconds"] for line in done.read_text().splitlines()))
            print(f"{name}, seed {seed}: {seconds[-1]:.0f} s", flush=True)
            folders.append(folder)
        record["results"][name] = {"settings": settings, "seeds": args.seeds, "first_seed": args.first_seed,
                                   "seconds_per_search": round(sum(seconds) / len(seconds), 1)}
        for by in ("alpha", "perturbation") if args.perturbation else ("alpha",):
            scored = [run_scores(folder, patches=args.perturbation) for folder in folders] \
                if by == "perturbation" else []           # scores 'scnas derive --by perturbation' kept are reused
            report = search_report(folders, permutations=2000, by=by)
            summary = agreement_summary(report)
            if by == "alpha":
                record["results"][name].update(summary)
            else:
                timed = [r["seconds"] for r in scored if r.get("seconds") is not None]
                summary.update(patches=args.perturbation,
                               seconds_per_run=round(sum(timed) / len(timed), 1) if timed else None)
                record["results"][name]["by_perturbation"] = summary
            print(f"{name} (cells by {by})", *report["verdict"], sep="\n  ", flush=True)
    out = Path(__file__).parent / "results" / f"{args.name}.json"
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
