"""Checkpoints of searches and training runs: written atomically, read with
``weights_only=True``, and the settings a resumed run may change."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from scnas import records
from scnas.errors import ScnasError
from scnas.fileio import atomic_write_bytes


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (tensors and plain data only, so it loads with weights_only)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


CHECKPOINT_FIX = ("the run cannot continue from it: start again in another folder, or put back a good copy of "
                  "the file")


def read_checkpoint(path: Path, expected_format: str, error: type[ScnasError]) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (``scnas.records``: an unreadable one is a
    ``DamagedFileError``) and check its format tag (another kind of file is ``error``)."""
    state = records.read_checkpoint(path, CHECKPOINT_FIX)
    if state.get("format") != expected_format:
        raise error(f"is not a {expected_format} file", source=str(path))
    return state


RESUMABLE_CHANGES = ("epochs", "checkpoint", "micro_batch", "gpu_memory", "log_every_steps", "workers", "plots",
                     "compile", "device")
"""Settings a resumed run may change: how long it runs, how a step is fitted into memory
(which changes no result beyond rounding), loader processes, plots, compilation, and the
device (a change of precision that would follow, ``--amp auto``, is refused separately)."""


def check_resume_settings(saved, current, run: Path, *, error: type[ScnasError]) -> None:
    """Refuse to resume with settings other than the run's own, except :data:`RESUMABLE_CHANGES`.

    Args:
        saved: the run's own settings (from its checkpoint).
        current: the settings given now.
        run: the run folder, named in the error.
        error: the error to raise (the kind of run's).
    """
    old, new = saved.model_dump(), current.model_dump()
    differing = sorted(k for k, v in new.items() if k not in RESUMABLE_CHANGES and old[k] != v)
    if differing:
        raise error(f"--resume with settings that differ from the run's ({', '.join(differing)}); resume with the "
                    f"run's own settings (only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE_CHANGES)} "
                    "may change)", source=str(run))


def check_resume_precision(saved: str | None, now: str, run: Path, *, error: type[ScnasError]) -> None:
    """Refuse to continue a run at another precision than it started with (``--amp auto``
    means fp16 on CUDA and off on the CPU, so moving a run between them would change it).

    Args:
        saved: the precision the run started with (None: a checkpoint from before it was
            recorded).
        now: the precision resolved for this device.
        run: the run folder, named in the error.
        error: the error to raise.
    """
    if saved is not None and saved != now:
        raise error(f"this run computed with amp {saved}; here it would compute with amp {now} (--amp auto follows "
                    f"the device): resume it on the same kind of device", source=str(run))
