"""This process's place in a run: torchrun's environment, the device, the process group, and
the memory a step may use on each process."""

from __future__ import annotations

import atexit
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scnas.defaults import DEVICE_CHOICES
from scnas.errors import ScnasError, check_choice


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


def resolve_device(device: str, error: type[ScnasError] = ScnasError) -> torch.device:
    """``auto``: CUDA when a device is available, else the CPU. ``cuda`` without one, or a name
    other than auto, cpu and cuda, is refused with a message that says what to use."""
    check_choice(device, DEVICE_CHOICES, "--device", error=error)
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
    threads still hold tensors of the last collective. Garbage is collected first, so that
    reference cycles around DistributedDataParallel and autograd are not destroyed after the
    group, which aborts the same way (docs/benchmarks.md, "Figures behind constants")."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def memory_budget(gpu_memory: str | None, processes: Processes) -> int | None:
    """Bytes a step may use on each process: ``gpu_memory`` when given, else the CUDA device's
    free memory (None on the CPU: nothing is planned). Under torchrun the smallest over all
    processes, so that every process makes the same plan (or refuses the same way)."""
    from scnas.byte_sizes import parse_bytes

    available = parse_bytes(gpu_memory) if gpu_memory else device_memory(processes.device)
    if processes.world > 1:
        value = torch.tensor([float("inf") if available is None else float(available)], dtype=torch.float64,
                             device=processes.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        available = None if value.item() == float("inf") else int(value.item())
    return available


def device_memory(device: torch.device) -> int | None:
    """Bytes free for a run on ``device``: CUDA's free memory plus what this process's allocator
    already holds; None on the CPU (no budget is enforced there unless one is given)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device))
