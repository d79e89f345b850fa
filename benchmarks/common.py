"""Helpers shared by the benchmark scripts (run them as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_time(function: Callable[[], object], repeat: int) -> float:
    """Median wall time in seconds of ``repeat`` calls, after one warm-up call."""
    function()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rss_bytes() -> int:
    """The process's resident memory now (the peak, ru_maxrss, only ever grows)."""
    import resource
    from pathlib import Path

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_steps(step: Callable[[], object], steps: int, device: str, rss_before: int) -> tuple[float, float]:
    """(peak MiB, median seconds) of ``steps`` calls of ``step`` after a warm-up call. Peak: on
    CUDA ``max_memory_allocated`` over the timed steps; on the CPU the growth of the peak RSS
    since ``rss_before``."""
    import resource

    import torch

    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before)
    return peak / 2**20, statistics.median(times)


def search_or_reuse(config, folder, reuse: bool) -> None:
    """Run the search ``config`` in ``folder``, or, with ``reuse``, keep a search the folder
    already holds: a finished one of the same settings is kept as it is, an interrupted one of
    the same settings resumed from its checkpoint, and one of other settings refused (a run of
    another budget must never be reported as this one)."""
    import json
    from pathlib import Path

    from scnas.search import run_search

    folder = Path(folder)
    saved = folder / "config.json"
    if reuse and saved.exists():
        held = json.loads(saved.read_text())["search"]
        wanted = config.model_dump(mode="json")
        resolved = {"data"} | ({"spacing"} if wanted.get("spacing") is None else set())   # filled in by the run
        differing = sorted(k for k in set(held) | set(wanted) if k not in resolved and held.get(k) != wanted.get(k))
        if differing:
            raise SystemExit(f"{folder} holds a search of other settings ({', '.join(differing)}): "
                             "give another --out")
        done = folder / "metrics.jsonl"
        if done.exists() and len(done.read_text().splitlines()) == config.epochs:
            return
        run_search(config, folder, resume=True, progress=False)
        return
    run_search(config, folder, progress=False)


def agreement_summary(report: dict) -> dict:
    """The parts of a ``scnas.search.report.search_report`` that the search-quality benchmarks
    record per setting: agreement and its three p-values per cell type, the parameter-free share
    against random genotypes', each run's final supernet loss on the architecture set, and the verdict."""
    cells = report["cells"]
    return {"agreement": {c: e.get("agreement") for c, e in cells.items()},
            "agreement_p": {c: e.get("agreement_p") for c, e in cells.items()},
            "agreement_p_relabelled": {c: e.get("agreement_p_relabelled") for c, e in cells.items()},
            "agreement_p_relabelled_within_kind": {c: e.get("agreement_p_relabelled_within_kind")
                                                   for c, e in cells.items()},
            "parameter_free_share": report["parameter_free_share_mean"],
            "random_parameter_free_share": report["random_parameter_free_share"],
            "supernet_alpha_loss": [r.get("alpha_loss") for r in report["runs"]],
            "verdict": report["verdict"]}
