"""Options that several commands share, declared once."""

from __future__ import annotations

from typing import Optional

import typer

MICRO_BATCH: Optional[int] = typer.Option(
    None, "--micro-batch", min=1, help="Patches per forward pass; gradients accumulate exactly over a process's share "
                                       "(default: the largest that fits). With --resume: may change.")
CHECKPOINT: Optional[str] = typer.Option(
    None, "--checkpoint", help="Activation checkpointing: off, cells, edges (least memory, most recomputation), or "
                               "auto: the cheapest that fits the GPU [default: auto].")
GPU_MEMORY: Optional[str] = typer.Option(
    None, "--gpu-memory", help="Memory to plan for, e.g. 24GiB (default: the CUDA device's free memory). A setting "
                               "that cannot fit is refused before the first step.")
AMP: str = typer.Option("auto", "--amp", help="Mixed precision: fp16 (with gradient scaling), bf16 or off; auto: fp16 "
                                              "on CUDA, off on CPU.")
COMPILE: bool = typer.Option(False, "--compile", help="torch.compile the network: the first step pays the compilation "
                                                    "(printed, about a minute at stem 68), later ones run faster on a GPU. "
                                                    "Pays for long runs; on the CPU rarely. Falls back to eager, with a "
                                                    "notice, where compilation fails.")

LOSS: str = typer.Option("jaccard", "--loss", help="jaccard: soft Jaccard distance averaged over all classes, "
                                                    "background included (the paper's loss as scnas reads it); "
                                                    "jaccard-fg: over the foreground classes only (nnU-Net leaves "
                                                    "background out of its Dice loss).")


def fitting_overrides(checkpoint: Optional[str], micro_batch: Optional[int], gpu_memory: Optional[str]) -> dict:
    """The settings that fit a step into memory, as given on the command line (also on --resume)."""
    given = {"checkpoint": checkpoint, "micro_batch": micro_batch, "gpu_memory": gpu_memory}
    return {key: value for key, value in given.items() if value is not None}
