"""Does the search recover a planted architecture? Recovery against chance, per setting.

A task whose labels a network of a known genotype makes (``scnas.search.planted``: smooth
noise in, the teacher's thresholded class-1 score out), searched with several seeds in each
setting (the paper's, and each countermeasure); per setting: how often the runs' best non-zero
operation on a planted edge is the planted one, against chance (1/7), seed agreement and the
parameter-free share (``scnas.search.report``), and the seconds a search took.

    python benchmarks/planted_bench.py [--seeds 5] [--epochs 6] [--steps 20] [--quick]

Writes benchmarks/results/planted.json (``--quick``: a tiny run that checks the script,
results/planted-quick.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from scnas.data import PrepareSettings, prepare_dataset
from scnas.genotype import genotype_from_data
from scnas.search import SearchConfig, run_search
from scnas.search.planted import write_planted_dataset
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

SETTINGS = {
    "paper": {},
    "warm-up": {"warmup_epochs": 2},
    "penalty": {"free_penalty": 0.3},
    "cap": {"max_free": 1},
    "all three": {"warmup_epochs": 2, "free_penalty": 0.3, "max_free": 1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20, help="Theta/alpha step pairs per epoch")
    parser.add_argument("--alpha-lr", type=float, default=0.03)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of: " + ", ".join(SETTINGS))
    parser.add_argument("--quick", action="store_true", help="2 seeds, 2 settings, 2 epochs of 2 steps")
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.steps, args.settings = 2, 3, 2, "paper,all three"
    chosen = [name.strip() for name in args.settings.split(",")]
    root = Path(args.out or tempfile.mkdtemp(prefix="scnas-planted-"))
    root.mkdir(parents=True, exist_ok=True)
    planted = genotype_from_data(PLANTED, source="planted genotype")
    task = write_planted_dataset(root / "task", planted, cases=8 if args.quick else 12, shape=(32, 32, 32), stem=4,
                                 seed=0, force=True)
    cache = prepare_dataset(task, root / "cache", PrepareSettings(target_spacing=(1.0, 1.0, 1.0)),
                            progress=False).cache
    results = {}
    for name in chosen:
        folders, seconds = [], []
        for seed in range(args.seeds):
            folder = root / name.replace(" ", "-") / f"seed{seed}"
            config = SearchConfig(data=str(cache), stem=4, nodes=2, patch=(32, 32, 32), batch_size=1,
                                  epochs=args.epochs, steps_per_epoch=args.steps, tau_max=5.0, tau_min=0.5,
                                  alpha_lr=args.alpha_lr, val_batches=1, seed=seed, device="cpu", plots=False,
                                  **SETTINGS[name])
            started = time.perf_counter()
            run_search(config, folder, progress=False)
            seconds.append(time.perf_counter() - started)
            folders.append(folder)
            print(f"{name}, seed {seed}: {seconds[-1]:.0f} s", flush=True)
        report = search_report(folders, permutations=2000, planted=planted)
        results[name] = {"settings": SETTINGS[name], "seconds_per_search": round(sum(seconds) / len(seconds), 1),
                         "planted": report["planted"],
                         "agreement": {c: e.get("agreement") for c, e in report["cells"].items()},
                         "agreement_p": {c: e.get("agreement_p") for c, e in report["cells"].items()},
                         "parameter_free_share": report["parameter_free_share_mean"],
                         "random_parameter_free_share": report["random_parameter_free_share"],
                         "verdict": report["verdict"]}
    table = Table(title=f"planted architecture: {args.seeds} seeds, {args.epochs} epochs x {args.steps} steps, "
                        f"alpha lr {args.alpha_lr}; chance 1/7")
    for column in ("setting", "recovered", "x chance (1/7)", "p", "x chance among weighted (1/4)",
                   "cells agreeing (p<0.05)", "param-free share", "s / search"):
        table.add_column(column)
    for name, r in results.items():
        p = r["planted"]
        table.add_row(name, f"{p['recovered']:.3f}", f"{p['x_chance']:.2f}", f"{p['p']:.3g}",
                      f"{p['x_chance_among_weighted']:.2f}",
                      str(sum(v is not None and v < 0.05 for v in r["agreement_p"].values())),
                      f"{r['parameter_free_share']:.0%} (random {r['random_parameter_free_share']:.0%})",
                      f"{r['seconds_per_search']:.0f}")
    Console(width=150).print(table)
    out = Path(__file__).parent / "results" / ("planted-quick.json" if args.quick else "planted.json")
    out.write_text(json.dumps({"seeds": args.seeds, "epochs": args.epochs, "steps_per_epoch": args.steps,
                               "alpha_lr": args.alpha_lr, "planted": PLANTED, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
