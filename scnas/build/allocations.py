"""Counting the bytes a step allocates, as it runs on the CPU.

A dispatch mode records the bytes of every tensor storage from the moment an operation
creates it until its last reference dies: what a caching allocator's ``max_memory_allocated``
counts. Activation checkpointing, in-place operations, what autograd saves for backward and
when it frees it are therefore accounted for by PyTorch itself rather than modelled here.
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTracker(TorchDispatchMode):
    """Live bytes of the tensor storages created while the mode is active, recorded after
    every allocation (``timeline``), and their peak."""

    active: "PeakTracker | None" = None

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.paused = 0
        self.timeline: list[int] = []
        self._seen: set[int] = set()

    def __enter__(self):
        self._previous, PeakTracker.active = PeakTracker.active, self
        return super().__enter__()

    def __exit__(self, *exc):
        PeakTracker.active = self._previous
        return super().__exit__(*exc)

    def add(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s storage from now until it dies (once per storage)."""
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.timeline.append(self.live)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        if key in self._seen:
            self._seen.discard(key)
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            for value in tree_flatten(out)[0]:
                if isinstance(value, torch.Tensor):
                    self.add(value)
        return out


class Untracked:
    """Work the tracker must not see (the float32 arithmetic behind an emulated half-precision
    convolution); tensors it produces can be counted afterwards with ``PeakTracker.add``."""

    def __enter__(self):
        if PeakTracker.active is not None:
            PeakTracker.active.paused += 1

    def __exit__(self, *exc):
        if PeakTracker.active is not None:
            PeakTracker.active.paused -= 1


def counted(*tensors: torch.Tensor | None) -> None:
    """Count the storages of ``tensors`` (made under :class:`Untracked`) with the active tracker."""
    if PeakTracker.active is not None:
        for tensor in tensors:
            if tensor is not None:
                PeakTracker.active.add(tensor)


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if id(storage) not in seen:
            seen.add(id(storage))
            total += storage.nbytes()
    return total
