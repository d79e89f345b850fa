"""How long the Table-1 protocol takes at tiny settings, and what its report says.

A 10-case phantom task (2 channels, 2 classes), 2 genotypes (uresnet, minimal) and 2 random
genotypes of uresnet's FLOPs, 5 folds: 20 jobs of retraining, prediction of the fold's
validation cases with the last epoch's model, and Dice. Goal (issue 12): under 15 minutes on
2 CPU cores. Prints the report and writes benchmarks/results/cv_study.json.

    python benchmarks/cv_study.py [--out DIR] [--epochs 6] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from scnas.data import write_phantom_dataset
from scnas.train import TrainConfig
from scnas.apps.cv import run_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="study folder (default: a temporary one)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--stem", type=int, default=8)
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="scnas-cv-"))
    root.mkdir(parents=True, exist_ok=True)
    task = write_phantom_dataset(root / "task", cases=10, channels=2, foreground_classes=2, shape=(40, 40, 20),
                                 spacing=(1.0, 1.0, 2.0), seed=0, force=True)
    train = TrainConfig(data=str(task), patch=(32, 32, 32), batch_size=2, epochs=args.epochs,
                        steps_per_epoch=args.steps, lr=1e-3, val_patches=2, device="cpu")
    request = {"genotypes": ["uresnet", "minimal"], "data": str(task), "spacing": [1.0, 1.0, 1.0], "folds": None,
               "random": 2, "random_seed": 0, "stem": args.stem,
               "train": train.model_dump(mode="json", exclude={"data", "fold", "stem", "spacing"})}
    started = time.perf_counter()
    report = run_study(root / "study", request, say=print)
    seconds = time.perf_counter() - started
    assert report is not None
    result = {"seconds": round(seconds, 1), "jobs": len(report["folds"]) * len(report["genotypes"]),
              "settings": {"stem": args.stem, "patch": [32, 32, 32], "batch": 2, "epochs": args.epochs,
                           "steps_per_epoch": args.steps, "cases": 10},
              "table": (root / "study" / "results.md").read_text(), "conclusion": report["conclusion"],
              "genotypes": [{k: g[k] for k in ("name", "kind", "stem", "flops")} for g in report["genotypes"]]}
    print(f"\n{result['jobs']} jobs in {seconds:.0f} s ({seconds / 60:.1f} min; goal: under 15 min on 2 cores)")
    out = Path(__file__).parent / "results" / "cv_study.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
