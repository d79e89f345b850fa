"""Random training patches as a torch ``Dataset``, and the one loader that search, training and
the benchmarks use.

Item ``i`` of epoch ``e`` draws from ``numpy.random.default_rng([seed, e, i])``, so the batches
do not depend on how many worker processes load them, in which order, or whether the run was
resumed. The loader's sampler runs in the main process and hands the workers ``(epoch, i)``
pairs, which is what lets the workers persist across epochs (a ``set_epoch`` on the dataset
would not reach worker copies).

On CUDA the workers only read: each patch's region (enlarged where it is rotated) in the
cache's storage type (half floats: half the bytes to copy), its label and its drawn
augmentation :class:`~scnas.data.augment.Recipe` arrive in pinned memory, are copied without
blocking and augmented on the GPU (:func:`to_device`), where the rotation's ``grid_sample``
is cheap instead of costing a worker's core (docs/benchmarks.md). On the CPU the worker augments, and
the batch is ready as it comes. Each worker keeps ``prefetch`` batches ready.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from scnas.data.augment import Augmentation, Recipe
from scnas.data.cache import Cache
from scnas.data.patches import PatchSampler

MAX_AUTO_WORKERS = 16
"""``auto`` never starts more loader processes than this per training process."""


class PatchDataset(Dataset):
    """``samples_per_epoch`` random patches (image float32 (C, *patch), label int64 (*patch)).

    Indexed by ``i`` (of the epoch chosen with :meth:`set_epoch`) or by an ``(epoch, i)`` pair.
    With ``deferred`` set, an item is a :class:`RawPatch` whose augmentation is still to be applied
    (:func:`to_device` does it where the batch goes).

    Args:
        cache: the prepared cache.
        case_ids: the cases to draw patches from.
        patch_size: the patch size.
        samples_per_epoch: patches per epoch.
        seed: the same seed and epoch give the same patches.
        foreground_share: the share of patches centred near a foreground voxel.
        augmentation: applied to each patch (None: none).
    """

    def __init__(self, cache: Cache, case_ids: list[str], patch_size: tuple[int, int, int], *, samples_per_epoch: int,
                 seed: int = 0, foreground_share: float = 1 / 3, augmentation: Augmentation | None = None):
        self.sampler = PatchSampler(cache, case_ids, patch_size, foreground_share=foreground_share)
        self.samples_per_epoch, self.seed, self.augmentation = samples_per_epoch, seed, augmentation
        self.channels = len(cache.channel_names)
        self.epoch = 0
        self.deferred = False

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose patches plain integer indices draw."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int | tuple[int, int]):
        epoch, item = index if isinstance(index, tuple) else (self.epoch, index)
        rng = np.random.default_rng([self.seed, epoch, item])
        recipe = self.augmentation.draw(rng, self.channels) if self.augmentation is not None else None
        margin = self.augmentation.margin(recipe, self.sampler.patch_size) if recipe is not None else (0, 0, 0)
        image, label, _ = self.sampler.sample(rng, margin, dtype=None if self.deferred else np.float32)
        raw = RawPatch(torch.from_numpy(image), torch.from_numpy(label), recipe)
        return raw if self.deferred else raw.finish(self.sampler.patch_size)


class RawPatch:
    """A patch as read: the region (enlarged for a spatial transform), its label (int16) and
    the augmentation still to apply."""

    def __init__(self, image: torch.Tensor, label: torch.Tensor, recipe: Recipe | None):
        self.image, self.label, self.recipe = image, label, recipe

    def finish(self, size: tuple[int, ...], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(image float32 (C, *size), label int64 (*size)) on ``device`` (default: where it is)."""
        image = self.image.to(device, non_blocking=True) if device is not None else self.image
        label = self.label.to(device, non_blocking=True) if device is not None else self.label
        image = image.float()
        if self.recipe is not None:
            image, label = Augmentation.apply(image, label, self.recipe, size=size)
        return image.contiguous(), label.long()


class RawBatch:
    """The :class:`RawPatch` items of one batch (regions differ in size, so they are not stacked)."""

    def __init__(self, items: list[RawPatch]):
        self.items = items

    def pin_memory(self) -> "RawBatch":   # called by the DataLoader's pinning thread
        for item in self.items:
            item.image, item.label = item.image.pin_memory(), item.label.pin_memory()
        return self

    def __len__(self) -> int:
        return len(self.items)


def collate(items: list) -> tuple[torch.Tensor, torch.Tensor] | RawBatch:
    if isinstance(items[0], RawPatch):
        return RawBatch(items)
    return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])


def to_device(batch, device: torch.device, size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader's batch as (image, label) on ``device``: copied without blocking, and augmented
    there when the workers left it raw."""
    if isinstance(batch, RawBatch):
        pairs = [item.finish(size, device) for item in batch.items]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    x, y = batch
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


class StepSampler(Sampler):
    """The ``(epoch, item)`` indices of one process's share of steps ``start .. stop - 1``:
    item ``(step * world + rank) * batch + b``, so every rank sees different patches and a
    resumed epoch starts exactly where it stopped."""

    def __init__(self, batch_size: int, world: int = 1, rank: int = 0):
        self.batch_size, self.world, self.rank = batch_size, world, rank
        self.epoch, self.start, self.stop = 0, 0, 0

    def select(self, epoch: int, start: int, stop: int) -> None:
        self.epoch, self.start, self.stop = epoch, start, stop

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for step in range(self.start, self.stop):
            for b in range(self.batch_size):
                yield self.epoch, (step * self.world + self.rank) * self.batch_size + b

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.batch_size


def resolve_loader_workers(workers: int | str, device: torch.device, loaders: int = 1) -> int:
    """Loader processes for one of ``loaders`` loaders of one training process: a number as
    given, or ``auto``: on CUDA the cores this process may use, shared among the processes on the
    machine (torchrun's ``LOCAL_WORLD_SIZE``) and its loaders, one left for the main process (at
    most ``MAX_AUTO_WORKERS``); on
    the CPU 0, since the network's step takes every core and seconds, against a fraction of a
    second to read a patch."""
    if workers != "auto":
        return int(workers)
    if device.type != "cuda":
        return 0
    from scnas.threads import usable_cores

    share = usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) - 1
    return int(max(1, min(MAX_AUTO_WORKERS, share // max(1, loaders))))


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)   # one core per worker, as nnU-Net's loaders use


class PatchLoader:
    """A DataLoader over a :class:`PatchDataset` whose workers live as long as the loader
    (``persistent_workers``); :meth:`epoch` gives the batches of a range of steps, which
    :func:`to_device` turns into tensors on ``device``.

    Args:
        dataset: the patches.
        batch_size: patches per batch of this process.
        workers: loader processes (0: in this process).
        world: processes sharing each step (torchrun).
        rank: this process's rank.
        device: where the batches go.
        prefetch: batches each worker prepares ahead.
        augment_in_workers: augment in the workers (None: on the CPU yes, on CUDA on the
            device).
    """

    def __init__(self, dataset: PatchDataset, batch_size: int, workers: int = 0, *, world: int = 1, rank: int = 0,
                 device: torch.device | str = "cpu", prefetch: int = 2, augment_in_workers: bool | None = None):
        device = torch.device(device)
        # on CUDA augment on the GPU, after the copy; on the CPU in the workers
        dataset.deferred = device.type == "cuda" if augment_in_workers is None else not augment_in_workers
        self.sampler = StepSampler(batch_size, world, rank)
        extra = {"persistent_workers": True, "prefetch_factor": prefetch, "worker_init_fn": _init_worker} \
            if workers > 0 else {}
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 drop_last=False, pin_memory=device.type == "cuda", collate_fn=collate, **extra)

    def epoch(self, epoch: int, start: int = 0, stop: int | None = None) -> DataLoader:
        """The batches of steps ``start .. stop - 1`` of ``epoch`` (iterate it once)."""
        total = len(self.loader.dataset) // (self.sampler.batch_size * self.sampler.world)
        self.sampler.select(epoch, start, total if stop is None else stop)
        return self.loader
