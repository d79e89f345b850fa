"""Data benchmark: ``prepare`` throughput on phantoms of realistic size, and the patch
sampling rate from the cache (0 and 2 workers) against the training-step rate of a small
network, as a ratio (> 1: the loader keeps up).

Run: python benchmarks/data_bench.py [--quick] [--cases 20] [-o benchmarks/results/data.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from scnas.build import BuildConfig, build_network
from scnas.data import Cache, PrepareSettings, prepare_dataset, write_phantom_dataset
from scnas.data.augment import default_augmentation
from scnas.data.loader import PatchDataset, make_loader
from scnas.genotype import builtin_genotype

console = Console()


def loader_rate(cache: Cache, patch: int, workers: int, batches: int, augment: bool) -> float:
    """Patches per second delivered by the DataLoader (batch 2)."""
    dataset = PatchDataset(cache, cache.case_ids, (patch,) * 3, samples_per_epoch=2 * batches, seed=0,
                           augmentation=default_augmentation() if augment else None)
    start = time.perf_counter()
    count = sum(x.shape[0] for x, _ in make_loader(dataset, batch_size=2, workers=workers))
    return count / (time.perf_counter() - start)


def step_rate(patch: int, stem: int, steps: int) -> float:
    """Training samples per second of a uresnet at ``stem`` (batch 2, forward + backward + Adam)."""
    net = build_network(builtin_genotype("uresnet"), BuildConfig(stem_channels=stem))
    optimiser = torch.optim.Adam(net.parameters(), 3e-4)
    x, y = torch.randn(2, 4, patch, patch, patch), torch.randint(0, 3, (2, patch, patch, patch))
    net(x).sum().backward()
    start = time.perf_counter()
    for _ in range(steps):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimiser.step()
    return 2 * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("-o", "--output", default="benchmarks/results/data.json")
    args = parser.parse_args()
    shape, cases, patches, batches = ((48, 48, 40), 4, (32,), 4) if args.quick else ((160, 160, 120), args.cases, (64, 128), 10)
    result: dict = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                                "threads": torch.get_num_threads()}, "quick": args.quick}
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        task = write_phantom_dataset(Path(folder) / "task", cases=cases, channels=4, classes=3, shape=shape,
                                     spacing=(1.0, 1.0, 1.0))
        generate_s = time.perf_counter() - start
        rows = []
        for workers in (1, 2):
            report = prepare_dataset(task, Path(folder) / f"cache{workers}", PrepareSettings(target_spacing=(0.7, 0.7, 0.7)),
                                     workers=workers, progress=False)
            rows.append({"workers": workers, "cases": cases, "seconds": report.seconds,
                         "cases_per_s": cases / report.seconds, "input_mb_per_s": report.input_bytes / 2**20 / report.seconds})
        result["prepare"] = {"shape": list(shape), "spacing": [1.0, 1.0, 1.0], "target_spacing": [0.7, 0.7, 0.7],
                             "generate_s": generate_s, "rows": rows}
        table = Table("workers", "cases", "seconds", "cases/s", "input MB/s",
                      title=f"prepare: {cases} phantoms of 4x{'x'.join(map(str, shape))} at 1 mm -> 0.7 mm")
        for r in rows:
            table.add_row(str(r["workers"]), str(r["cases"]), f"{r['seconds']:.1f}", f"{r['cases_per_s']:.2f}",
                          f"{r['input_mb_per_s']:.1f}")
        console.print(table)
        cache = Cache(Path(folder) / "cache1")
        sampling = []
        for patch in patches:
            train = step_rate(patch, stem=8 if args.quick else 16, steps=2)
            for workers in (0, 2):
                for augment in (False, True):
                    rate = loader_rate(cache, patch, workers, batches, augment)
                    sampling.append({"patch": patch, "workers": workers, "augment": augment, "patches_per_s": rate,
                                     "train_samples_per_s": train, "ratio": rate / train})
        result["sampling"] = sampling
        table = Table("patch", "workers", "augmentation", "patches/s", "train samples/s", "loader / train",
                      title="patch sampling from the cache vs a uresnet training step (stem 16, batch 2, CPU)")
        for r in sampling:
            table.add_row(f"4x{r['patch']}^3", str(r["workers"]), "yes" if r["augment"] else "no",
                          f"{r['patches_per_s']:.1f}", f"{r['train_samples_per_s']:.2f}", f"{r['ratio']:.1f}x")
        console.print(table)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
