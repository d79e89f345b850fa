"""How many CPU threads torch uses in the scnas process.

torch starts one thread per physical core and its OpenMP threads wait for each other at every
operation, so a core taken by another job stalls them all (docs/benchmarks.md, "Threads").
scnas therefore chooses:

1. ``--threads N`` (or ``SCNAS_THREADS``), when given;
2. else ``OMP_NUM_THREADS``, when set (the usual way to limit OpenMP);
3. else the usable cores (CPU affinity) less the load of other processes (the 1-minute load
   average, rounded), at least one.

Loader and preparation workers use one thread each, as nnU-Net's do (``scnas.data.loader``).
The number of threads changes the order of floating-point sums, so results (a found genotype's
hash, a Dice) can differ in the last digits between thread counts; runs record it.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; a container's limit where it sets one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:   # not on Linux
        return max(1, os.cpu_count() or 1)


def other_load() -> float:
    """Runnable processes besides this one, averaged over the last minute (0 where unknown)."""
    try:
        return max(0.0, os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """The thread count and why it was chosen (see the module's rules)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be at least 1, got {requested}")
        return requested, "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env), "OMP_NUM_THREADS"
    cores = usable_cores()
    load = other_load()
    free = max(1, min(cores, cores - round(load)))
    if free < cores:
        return free, f"{cores} cores, load {load:.1f} from other processes"
    return cores, f"{cores} cores"


EXPLICIT = ("--threads", "OMP_NUM_THREADS")
_chosen: tuple[int, str] | None = None


def apply_threads(requested: int | None = None) -> tuple[int, str]:
    """Set torch's intra-op threads as :func:`choose_threads` says; returns (threads, why)."""
    global _chosen
    import torch

    threads, why = choose_threads(requested)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    _chosen = (threads, why)
    return threads, why


def reproducible_threads() -> int:
    """One thread unless the user chose a number (``--threads``, ``SCNAS_THREADS``,
    ``OMP_NUM_THREADS``): the demos print results that the README shows, and one thread makes
    them the same on every machine with the same kind of CPU, busy or not."""
    import torch

    if _chosen is not None and _chosen[1] in EXPLICIT:
        return _chosen[0]
    torch.set_num_threads(1)
    return 1
