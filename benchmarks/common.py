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
