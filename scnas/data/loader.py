"""A torch ``Dataset`` of random patches, deterministic for a seed whatever the workers.

Each item ``i`` of epoch ``e`` draws from ``numpy.random.default_rng([seed, e, i])``, so the
batches do not depend on how many worker processes load them or in which order.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from scnas.data.augment import Compose
from scnas.data.cache import Cache
from scnas.data.patches import PatchSampler


class PatchDataset(Dataset):
    """``samples_per_epoch`` random patches (image float32 (C, *patch), label int64 (*patch))."""

    def __init__(self, cache: Cache, case_ids: list[str], patch_size: tuple[int, int, int], samples_per_epoch: int,
                 seed: int = 0, foreground_share: float = 1 / 3, augmentation: Compose | None = None):
        self.sampler = PatchSampler(cache, case_ids, patch_size, foreground_share)
        self.samples_per_epoch, self.seed, self.augmentation = samples_per_epoch, seed, augmentation
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose patches to draw (call before creating the epoch's iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image, label, _ = self.sampler.sample(rng)
        if self.augmentation is not None:
            image, label = self.augmentation(image, label, rng)
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(label)).long()


def make_loader(dataset: PatchDataset, batch_size: int, workers: int = 0, shuffle: bool = False) -> DataLoader:
    """A DataLoader over ``dataset`` (items are already random: no shuffling needed)."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=shuffle, drop_last=True,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
