"""Data at the real scale (issue 14): a BraTS-size synthetic task (default 8 cases of
4x240x240x155 at 1 mm, MSD Task01's size) prepared at 0.7 mm, then

1. preparation: cases/s with the default workers (one per usable core) and per worker;
2. bytes per case: the cache against float32 (what cache format v1 stored) and the input;
3. storage variants, to choose the format by measurement: one case stored as .npy float32,
   .npy float16 and Blosc2 (LZ4 and ZSTD, float32 and float16), size and the median time of a
   random 4x128^3 patch read into float32 from a warm page cache;
4. patches/s in one process (one thread, as a loader worker runs) at 4x128^3 without
   augmentation, with the full default augmentation, and with the spatial transform on every
   patch (the rotated, scaled read);
5. the loader with the default workers (``--workers auto`` as on CUDA), batch 2, against what
   the paper's search and retraining steps consume on a GPU: measured here when CUDA is
   available (retraining: uresnet stem 68, batch 2, fp16; search: supernet stem 48, pair
   sampling, fp16, one patch per set per step, as benchmarks/search_memory.py), else the step
   times given by --train-step-ms / --search-step-ms (defaults: the H200 measurement of issue 13
   for retraining, 232 ms; none for search). On CUDA also the training step fed by the loader
   against the same step on a fixed batch: equal times mean the GPU never waits for data.

Run: python benchmarks/data_bench.py [--quick] [--cases 8] [--device auto|cpu|cuda] [-o benchmarks/results/data.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from scnas.data import Cache, PrepareSettings, prepare_dataset, write_phantom_dataset  # noqa: E402
from scnas.data.augment import Augmentation, SpatialTransform, default_augmentation  # noqa: E402
from scnas.data.loader import PatchDataset, PatchLoader, resolve_loader_workers, to_device  # noqa: E402
from scnas.data.patches import extract_patch  # noqa: E402
from scnas.threads import usable_cores  # noqa: E402

console = Console()


def case_bytes(cache: Cache, case_id: str) -> int:
    return sum(p.stat().st_size for p in cache.folder.glob(f"{case_id}*") if p.suffix != ".json")


def warm(paths) -> None:
    """Read files once so that the page cache holds them (the measured reads are warm)."""
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass


def read_times(image, label, patch: int, reads: int, seed: int = 0) -> float:
    """Median seconds of a random (C, patch^3) read into float32 with its label."""
    rng = np.random.default_rng(seed)
    spatial = image.shape[1:]
    times = []
    for _ in range(reads):
        start = tuple(int(rng.integers(0, max(1, n - patch + 1))) for n in spatial)
        began = time.perf_counter()
        extract_patch(image, label, start, size=(patch,) * 3)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def storage_variants(task: Path, patch: int, reads: int, folder: Path) -> list[dict]:
    """One case prepared in float32, stored every way, measured."""
    import blosc2

    from scnas.data.arrays import BLOCK, CHUNK
    from scnas.data.dataset import load_case, read_dataset
    from scnas.data.preprocess import preprocess_case

    dataset = read_dataset(task)
    prepared = preprocess_case(load_case(dataset, dataset.cases[0]), PrepareSettings(target_spacing=(0.7, 0.7, 0.7)))
    image, label = prepared["image"], prepared["label"]
    raw = image.nbytes
    rows = []
    for dtype in ("float32", "float16"):
        path = folder / f"v-{dtype}.npy"
        np.save(path, image.astype(dtype))
        warm([path])
        array = np.load(path, mmap_mode="r")
        rows.append({"storage": f".npy {dtype}", "ratio": path.stat().st_size / raw,
                     "read_ms": 1e3 * read_times(array, label, patch, reads)})
    blosc2.set_nthreads(1)
    for dtype in ("float32", "float16"):
        for codec, level, shuffle in (("LZ4", 5, False), ("LZ4", 5, True), ("ZSTD", 1, True)):
            path = folder / f"v-{dtype}-{codec}-{shuffle}.b2nd"
            spatial = image.shape[1:]
            blosc2.asarray(image.astype(dtype), urlpath=str(path), mode="w",
                           chunks=(1, *(min(CHUNK, n) for n in spatial)), blocks=(1, *(min(BLOCK, n) for n in spatial)),
                           cparams={"codec": getattr(blosc2.Codec, codec), "clevel": level, "nthreads": 1,
                                    "filters": [blosc2.Filter.SHUFFLE if shuffle else blosc2.Filter.NOFILTER]})
            warm([path])
            array = blosc2.open(str(path), mode="r", mmap_mode="r")
            chosen = dtype == "float16" and codec == "LZ4" and not shuffle
            rows.append({"storage": f"Blosc2 {dtype} {codec}-{level}{' shuffle' if shuffle else ''}"
                                    f"{' (the cache)' if chosen else ''}",
                         "ratio": path.stat().st_size / raw, "read_ms": 1e3 * read_times(array, label, patch, reads)})
    return rows


def item_rate(cache: Cache, patch: int, augmentation, items: int, deferred: bool = False) -> tuple[float, float]:
    """(patches/s, mean s) drawing ``items`` patches in this process (one thread); ``deferred``:
    read and draw only, the augmentation left for the GPU (what a worker does for CUDA)."""
    dataset = PatchDataset(cache, cache.case_ids, (patch,) * 3, samples_per_epoch=items, seed=0,
                           augmentation=augmentation)
    dataset.deferred = deferred
    dataset[0]
    began = time.perf_counter()
    for index in range(1, items + 1):
        dataset[(0, index)]
    seconds = time.perf_counter() - began
    return items / seconds, seconds / items


def loader_rate(cache: Cache, patch: int, workers: int, batches: int, device: torch.device) -> float:
    """Patches/s delivered by the loader as it runs for CUDA (workers read, the augmentation is
    left for the GPU; batch 2) after its first batch; pinned where CUDA is."""
    dataset = PatchDataset(cache, cache.case_ids, (patch,) * 3, samples_per_epoch=2 * (batches + 2), seed=0,
                           augmentation=default_augmentation())
    loader = PatchLoader(dataset, batch_size=2, workers=workers, device=device, prefetch=4, augment_in_workers=False)
    iterator = iter(loader.epoch(0))
    next(iterator)
    began, count = time.perf_counter(), 0
    for batch in iterator:   # raw (not yet augmented) batches, as a CUDA run receives them
        count += len(batch)
    return count / (time.perf_counter() - began)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step_times(cache: Cache, patch: int, workers: int, steps: int, device: torch.device) -> dict:
    """One uresnet-68 training step (batch 2, fp16 on CUDA) on a fixed batch, and fed by the loader."""
    from scnas.build import BuildConfig, build_network
    from scnas.metrics import soft_jaccard_loss
    from scnas.genotype import builtin_genotype

    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    net = build_network(builtin_genotype("uresnet"), BuildConfig(stem_channels=68 if cuda else 8, in_channels=4,
                                                                 num_classes=len(cache.labels))).to(device)
    optimiser = torch.optim.Adam(net.parameters(), 3e-4, fused=cuda)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)

    def step(x, y):
        optimiser.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.float16, enabled=cuda):
            loss = soft_jaccard_loss(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()

    x = torch.randn(2, 4, patch, patch, patch, device=device)
    y = torch.randint(0, len(cache.labels), (2, patch, patch, patch), device=device)
    for _ in range(3):
        step(x, y)
    synchronize(device)
    began = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    synchronize(device)
    fixed = (time.perf_counter() - began) / steps
    dataset = PatchDataset(cache, cache.case_ids, (patch,) * 3, samples_per_epoch=2 * (steps + 3), seed=1,
                           augmentation=default_augmentation())
    loader = PatchLoader(dataset, batch_size=2, workers=workers, device=device)
    iterator = iter(loader.epoch(0))
    for _ in range(3):
        step(*to_device(next(iterator), device, (patch,) * 3))
    synchronize(device)
    began = time.perf_counter()
    for batch in iterator:
        step(*to_device(batch, device, (patch,) * 3))
    synchronize(device)
    fed = (time.perf_counter() - began) / steps
    return {"fixed_batch_ms": 1e3 * fixed, "loader_fed_ms": 1e3 * fed}


def search_step_ms(patch: int) -> float | None:
    """On CUDA: one search step at the paper's setting (benchmarks/search_memory.py's measure)."""
    from search_memory import measure

    for checkpoint in ("off", "cells"):
        try:
            return 1e3 * measure("pair", patch, 48, 3, "cuda", "fp16", checkpoint)["step_s"]
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    return None


def prepare_and_report(task: Path, cache_folder: Path, cases: int, shape, result: dict) -> Cache:
    """Prepare the task with every core; the figures go into ``result`` and a table."""
    workers = usable_cores()
    report = prepare_dataset(task, cache_folder, PrepareSettings(target_spacing=(0.7, 0.7, 0.7)),
                             workers="auto", progress=False)
    cache = Cache(cache_folder)
    per_case = [case_bytes(cache, c) for c in cache.case_ids]
    float32 = [4 * len(cache.channel_names) * int(np.prod(cache.records[c]["shape"])) for c in cache.case_ids]
    result["prepare"] = {"workers": workers, "seconds": report.seconds, "cases_per_s": cases / report.seconds,
                         "cases_per_s_per_worker": cases / report.seconds / min(workers, cases),
                         "input_bytes_per_case": report.input_bytes / cases,
                         "cache_bytes_per_case": float(np.mean(per_case)),
                         "float32_bytes_per_case": float(np.mean(float32)),
                         "ratio_to_float32": float(np.sum(per_case) / np.sum(float32))}
    p = result["prepare"]
    table = Table("workers", "cases/s", "per worker", "input MB/case", "float32 MB/case", "cache MB/case",
                  "cache / float32", title=f"prepare {cases} cases of 4x{'x'.join(map(str, shape))} at 1 mm -> 0.7 mm")
    table.add_row(str(workers), f"{p['cases_per_s']:.3f}", f"{p['cases_per_s_per_worker']:.3f}",
                  f"{p['input_bytes_per_case'] / 1e6:.0f}", f"{p['float32_bytes_per_case'] / 1e6:.0f}",
                  f"{p['cache_bytes_per_case'] / 1e6:.0f}", f"{p['ratio_to_float32']:.3f}")
    console.print(table)
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 small cases, patch 32 (checks the script)")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--train-step-ms", type=float, default=232.0,
                        help="retraining step (batch 2) to compare with, without CUDA (issue 13, H200 fp16)")
    parser.add_argument("--search-step-ms", type=float, default=None, help="search step to compare with, without CUDA")
    parser.add_argument("--no-variants", action="store_true", help="skip the storage variants")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the task and cache here; a rerun reuses them and skips the preparation figures")
    parser.add_argument("-o", "--output", default="benchmarks/results/data.json")
    args = parser.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    torch.set_num_threads(1)   # as in a loader worker; the preparation uses processes
    shape, cases, patch, reads, items = (((64, 64, 48), 4, 32, 10, 10) if args.quick else
                                         ((240, 240, 155), args.cases, 128, 30, 40))
    result: dict = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                                "usable_cores": usable_cores(), "cuda": torch.cuda.get_device_name() if cuda else None},
                    "quick": args.quick, "shape": list(shape), "cases": cases, "patch": patch}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:   # after every part: a run cut short keeps what it measured
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")

    with contextlib.ExitStack() as stack:
        folder = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        folder.mkdir(parents=True, exist_ok=True)
        reuse = args.work is not None and (folder / "cache" / "cache.json").exists()
        if reuse:
            cache = Cache(folder / "cache")
            console.print(f"reusing the task and cache in {folder}: no generation or preparation figures")
            task = folder / "task"
        else:
            began = time.perf_counter()
            task = write_phantom_dataset(folder / "task", cases=cases, channels=4, foreground_classes=3, shape=shape,
                                         spacing=(1.0, 1.0, 1.0))
            result["generate_s"] = time.perf_counter() - began
            cache = prepare_and_report(task, folder / "cache", cases, shape, result)
            save()

        warm(cache.folder.glob("*.b2nd"))
        case = cache.load(cache.case_ids[0])
        result["patch_read_ms"] = 1e3 * read_times(case.image, case.label, patch, reads)
        if not args.no_variants:
            result["storage"] = storage_variants(task, patch, reads, folder)
            table = Table("storage", "bytes / float32", f"4x{patch}^3 read (ms)",
                          title="one case stored every way (warm page cache, one thread)")
            for row in result["storage"]:
                table.add_row(row["storage"], f"{row['ratio']:.3f}", f"{row['read_ms']:.1f}")
            console.print(table)

        rows = []
        spatial_always = Augmentation(spatial=SpatialTransform(p=1.0))
        for name, augmentation, deferred in (
                ("none", None, False),
                ("default, drawn and read; applied on the GPU (CUDA)", default_augmentation(), True),
                ("spatial on every patch, read; applied on the GPU (CUDA)", spatial_always, True),
                ("default, applied in the worker (CPU training)", default_augmentation(), False),
                ("spatial on every patch, applied in the worker", spatial_always, False)):
            rate, seconds = item_rate(cache, patch, augmentation, items, deferred)
            rows.append({"augmentation": name, "patches_per_s": rate, "ms_per_patch": 1e3 * seconds})
        result["per_worker"] = rows
        save()
        table = Table("augmentation", "patches/s", "ms/patch",
                      title=f"one process, one thread, 4x{patch}^3 (patch read alone: {result['patch_read_ms']:.1f} ms)")
        for row in rows:
            table.add_row(row["augmentation"], f"{row['patches_per_s']:.1f}", f"{row['ms_per_patch']:.0f}")
        console.print(table)

        default_workers = resolve_loader_workers("auto", torch.device("cuda"))
        search_workers = resolve_loader_workers("auto", torch.device("cuda"), loaders=2)
        delivered = loader_rate(cache, patch, default_workers, max(8, 3 * default_workers),
                                torch.device("cuda" if cuda else "cpu"))
        train_ms = args.train_step_ms
        search_ms = args.search_step_ms
        if cuda or args.quick:   # quick: the same code on the CPU, small, to check the script
            device = torch.device("cuda" if cuda else "cpu")
            try:
                result["train_step"] = train_step_times(cache, patch, default_workers, 20 if not args.quick else 3,
                                                        device)
                train_ms = result["train_step"]["fixed_batch_ms"]
            except Exception as exc:   # keep the other figures
                console.print(f"training step failed: {type(exc).__name__}: {exc}")
            if cuda:
                try:
                    search_ms = search_step_ms(patch)
                except Exception as exc:
                    console.print(f"search step failed: {type(exc).__name__}: {exc}")
            measured = True
        else:
            measured = False
        source = "measured here" if measured and "train_step" in result else "given"
        consumers = [("retraining (batch 2)", 2, default_workers, train_ms, source)]
        if search_ms:
            consumers.append(("search (1 + 1 patches per step)", 2, 2 * search_workers, search_ms,
                              "measured here" if cuda else "given"))
        rows = []
        for name, per_step, workers_used, step_ms, source in consumers:
            need = per_step / (step_ms / 1e3)
            rows.append({"consumer": name, "step_ms": step_ms, "source": source, "consumes_per_s": need,
                         "loader_workers": workers_used, "delivers_per_s": delivered * workers_used / default_workers,
                         "ratio": delivered * workers_used / default_workers / need})
        result["loader"] = {"default_workers": default_workers, "delivered_per_s": delivered, "consumers": rows}
        table = Table("consumer", "step (ms)", "consumes/s", "loader workers", "delivers/s", "delivers / consumes",
                      title=f"default loader (auto = {default_workers} workers here, batch 2, full augmentation, "
                            f"4x{patch}^3)")
        for row in rows:
            table.add_row(row["consumer"], f"{row['step_ms']:.0f} ({row['source']})", f"{row['consumes_per_s']:.1f}",
                          str(row["loader_workers"]), f"{row['delivers_per_s']:.1f}", f"{row['ratio']:.2f}x")
        console.print(table)
        if "train_step" in result:
            t = result["train_step"]
            console.print(f"training step on a fixed batch {t['fixed_batch_ms']:.0f} ms, fed by the loader "
                          f"{t['loader_fed_ms']:.0f} ms ({t['loader_fed_ms'] / t['fixed_batch_ms']:.2f}x)")
    save()
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
