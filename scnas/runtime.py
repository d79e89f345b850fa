"""Runtime helpers shared by search and training: processes (torchrun/DDP), atomic
checkpoints, and a progress bar over the steps of an epoch."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from scnas.errors import ScnasError
from scnas.fileio import atomic_write_bytes


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


def setup_processes(device: str, error: type[ScnasError] = ScnasError) -> Processes:
    """Read torchrun's environment, pick the device (auto: CUDA when available), and join the
    process group (NCCL on CUDA, gloo on CPU) when there are several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise error("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    target = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Processes(rank, world, target)


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


def rank_loader(dataset, start_step: int, steps: int, processes: Processes, batch_size: int, workers: int):
    """This process's batches of steps ``start_step`` .. ``steps - 1``: item index
    ``(step * world + rank) * batch + b``, so every rank sees different patches and a resumed
    epoch starts exactly at ``start_step``. ``batch_size`` is this process's share. On CUDA the
    batches come in pinned memory, so that copies to the device need not wait."""
    from torch.utils.data import DataLoader, Subset

    indices = [(step * processes.world + processes.rank) * batch_size + b
               for step in range(start_step, steps) for b in range(batch_size)]
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=workers, shuffle=False,
                      pin_memory=processes.device.type == "cuda")


def ensure_run_folder(folder: Path, error: type[ScnasError]) -> None:
    """Create a run folder (and parents), or fail with a message naming it (a file in the way,
    no permission, a read-only file system)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".scnas-write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise error(f"cannot be used as a run folder: {exc.strerror or exc}", source=str(folder)) from None


def open_or_prepare(data: str, prepared: Path, spacing, processes: Processes, poll_seconds: float = 5.0):
    """``data`` as a prepared cache: a cache folder itself, or a task folder that the main
    process prepares into ``prepared`` (under torchrun with one worker per core, since the
    other processes are idle meanwhile). The other processes wait by watching the file
    system rather than at a collective, which would time out (after 30 minutes by default)
    on a task the size of BraTS."""
    import time as _time

    from scnas.data.cache import Cache, open_or_prepare as _open

    if processes.world == 1 or processes.main or (Path(data) / "cache.json").exists():
        workers = (os.cpu_count() or 1) if processes.world > 1 else 1
        cache = _open(data, prepared, spacing, prepare=processes.main, workers=workers)
    else:
        marker = Path(prepared) / "cache.json"
        while not marker.exists():
            _time.sleep(poll_seconds)
        cache = None
    processes.barrier()   # every process past preparation (a failing main process ends the torchrun job)
    return cache if cache is not None else Cache(prepared)


def check_resume_settings(saved, current, run: Path, error: type[ScnasError]) -> None:
    """Refuse to resume with settings other than the run's own (only ``epochs`` may change)."""
    old, new = saved.model_dump(), current.model_dump()
    differing = sorted(k for k, v in new.items() if k != "epochs" and old[k] != v)
    if differing:
        raise error(f"--resume with settings that differ from the run's ({', '.join(differing)}); resume with the "
                    "run's own settings (only --epochs may change)", source=str(run))


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
