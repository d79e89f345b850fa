"""Runtime helpers shared by search and training: processes (torchrun/DDP), atomic
checkpoints, and a progress bar over the steps of an epoch."""

from __future__ import annotations

import atexit
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from scnas.errors import ScnasError
from scnas.fileio import atomic_write_bytes, ensure_folder


@dataclass
class Processes:
    """This process's place among the processes of a (torchrun) run."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(device: str, error: type[ScnasError] = ScnasError) -> torch.device:
    """``auto``: CUDA when a device is available, else the CPU. ``cuda`` without one, or a name
    other than auto, cpu and cuda, is refused with a message that says what to use."""
    if device not in DEVICE_CHOICES:
        raise error(f"--device {device!r}: expected auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise error("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


def setup_processes(device: str, error: type[ScnasError] = ScnasError) -> Processes:
    """Read torchrun's environment, pick the device (auto: CUDA when available), and join the
    process group (NCCL on CUDA, gloo on CPU) when there are several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolve_device(device, error).type == "cuda"
    target = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        atexit.register(close_processes)
    return Processes(rank, world, target)


def close_processes() -> None:
    """Leave the process group. Registered at exit by :func:`setup_processes`: a process that
    ends without it can abort (SIGABRT) while the interpreter shuts down, when gloo's worker
    threads still hold tensors of the last collective."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def memory_budget(gpu_memory: str | None, processes: Processes) -> int | None:
    """Bytes a step may use on each process: ``gpu_memory`` when given, else the CUDA device's
    free memory (None on the CPU: nothing is planned). Under torchrun the smallest over all
    processes, so that every process makes the same plan (or refuses the same way)."""
    from scnas.build.memory import device_memory, parse_bytes

    available = parse_bytes(gpu_memory) if gpu_memory else device_memory(processes.device)
    if processes.world > 1:
        value = torch.tensor([float("inf") if available is None else float(available)], dtype=torch.float64,
                             device=processes.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        available = None if value.item() == float("inf") else int(value.item())
    return available


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (tensors and plain data only, so it loads with weights_only)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_checkpoint(path: Path, expected_format: str, error: type[ScnasError]) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and check its format tag."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise error(f"cannot read the checkpoint ({type(exc).__name__}: {str(exc)[:120]})", source=str(path)) from None
    if not isinstance(state, dict) or state.get("format") != expected_format:
        raise error(f"is not a {expected_format} file", source=str(path))
    return state


def ensure_run_folder(folder: Path, error: type[ScnasError]) -> None:
    """Create a run folder (and parents), or fail with a message naming it (a file in the way,
    no permission, a read-only file system)."""
    ensure_folder(folder, error, "a run folder")


def open_or_prepare(data: str, spacing, processes: Processes, say=lambda line: None, poll_seconds: float = 5.0,
                    start_timeout: float = 600.0):
    """``data`` as a prepared cache: a cache folder itself, or a task folder that the main
    process prepares into its shared cache (``scnas.data.cache.shared_cache_folder``) with
    one worker per usable core, alone or under torchrun. The other processes wait by
    watching the file system rather than at a collective, which would time out (after 30
    minutes by default) on a task the size of BraTS."""
    import time as _time

    from scnas.data.cache import DEFAULT_SPACING, Cache, open_or_prepare as _open, shared_cache_folder
    from scnas.data.preprocess import PrepareSettings

    if processes.world == 1 or processes.main or (Path(data) / "cache.json").exists():
        cache = _open(data, spacing, prepare=processes.main, workers="auto", say=say if processes.main else
                      (lambda line: None))
    else:
        # prepare_dataset writes settings.json before the first case: if it never appears, rank 0
        # writes to a file system this process does not see (several machines, local disks).
        prepared = shared_cache_folder(data, PrepareSettings(target_spacing=spacing or DEFAULT_SPACING))
        started, marker, begun = _time.monotonic(), prepared / "cache.json", prepared / "settings.json"
        while not marker.exists():
            if not begun.exists() and _time.monotonic() - started > start_timeout:
                raise ScnasError(f"rank {processes.rank} waited {start_timeout:.0f} s for rank 0 to start preparing "
                                 f"{data} into {prepared} and saw nothing: on several machines without a shared file "
                                 "system, run 'scnas data prepare' first and pass the cache folder as --data (or "
                                 "set SCNAS_CACHE to a shared folder)", source=str(prepared))
            _time.sleep(poll_seconds)
        cache = None
    processes.barrier()   # every process past preparation (a failing main process ends the torchrun job)
    return cache if cache is not None else Cache(prepared)


PLOT_EVERY_SECONDS = 300.0
"""The figures of a search or training are drawn after its last epoch and after any epoch that
ends at least this long after they were last drawn (drawing takes seconds, which would dominate
short epochs); the data behind them are written every epoch."""

RESUMABLE_CHANGES = ("epochs", "checkpoint", "micro_batch", "gpu_memory", "log_every_steps", "workers", "plots",
                     "compile", "device")
"""Settings a resumed run may change: how long it runs, how a step is fitted into memory
(which changes no result beyond rounding), loader processes, plots, compilation, and the
device (a change of precision that would follow, ``--amp auto``, is refused separately)."""


def check_resume_settings(saved, current, run: Path, error: type[ScnasError]) -> None:
    """Refuse to resume with settings other than the run's own, except :data:`RESUMABLE_CHANGES`."""
    old, new = saved.model_dump(), current.model_dump()
    differing = sorted(k for k, v in new.items() if k not in RESUMABLE_CHANGES and old[k] != v)
    if differing:
        raise error(f"--resume with settings that differ from the run's ({', '.join(differing)}); resume with the "
                    f"run's own settings (only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE_CHANGES)} "
                    "may change)", source=str(run))


def check_resume_precision(saved: str | None, now: str, run: Path, error: type[ScnasError]) -> None:
    """Refuse to continue a run at another precision than it started with (``--amp auto``
    means fp16 on CUDA and off on the CPU, so moving a run between them would change it)."""
    if saved is not None and saved != now:
        raise error(f"this run computed with amp {saved}; here it would compute with amp {now} (--amp auto follows "
                    f"the device): resume it on the same kind of device", source=str(run))


def legend_below(figure, *axes, columns: int = 3) -> None:
    """One legend for the lines of all ``axes`` (e.g. a twinx pair), under the plot where it
    hides neither a line nor an axis, and whole epochs on the x axis."""
    from matplotlib.ticker import MaxNLocator

    handles, labels = [], []
    for axis in axes:
        h, l = axis.get_legend_handles_labels()
        handles += h
        labels += l
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=columns, frameon=False)


def save_figure(figure, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


class StepBar:
    """A rich progress bar (stderr, terminals only) over ``total`` steps with a free info text."""

    def __init__(self, show: bool, total: int):
        self.show, self.total, self.bar = show, total, None

    def start(self, label: str, done: int = 0) -> None:
        if not self.show:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        if not console.is_terminal:
            return
        self.bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeRemainingColumn(), console=console, transient=True)
        self.bar.start()
        self.task = self.bar.add_task("steps", total=self.total, completed=done, info="")

    def advance(self, info: str = "", steps: int | None = None) -> None:
        """One step more, or ``steps`` done in all."""
        if self.bar is not None:
            if steps is None:
                self.bar.update(self.task, advance=1, info=info)
            else:
                self.bar.update(self.task, completed=steps, info=info)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
