"""Random training patches from a cache: a share forced to contain foreground, padding where
a case is smaller than the patch."""

from __future__ import annotations

import numpy as np

from scnas.data.cache import Cache, CachedCase
from scnas.data.dataset import DatasetError


def extract_patch(image, label, start: tuple[int, ...], *, size: tuple[int, ...],
                  dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The (C, *size) image (``dtype``; None: as stored) and (*size) int16 label patch whose
    corner is ``start`` (may lie outside the volume: outside voxels are 0, i.e. the normalised
    background, and label 0). ``image``/``label`` are anything numpy-sliceable: cached arrays
    (float16 or float32) or arrays.

    Args:
        image: the case's image (C, X, Y, Z), numpy or Blosc2.
        label: its label map (X, Y, Z).
        start: the patch's corner (may lie outside the volume).
        size: the patch size.
        dtype: the image patch's dtype (None: as stored).
    """
    import torch

    spatial = image.shape[1:]
    src, dst = [], []
    for s, n, p in zip(start, spatial, size):
        lo, hi = max(s, 0), min(s + p, n)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - s, lo - s + max(0, hi - lo)))
    inside = all(d.start == 0 and d.stop == p for d, p in zip(dst, size))
    read = np.asarray(image[(slice(None), *src)])
    dtype = np.dtype(image.dtype if dtype is None else dtype)
    if inside and read.dtype == dtype:
        patch = np.ascontiguousarray(read)
    else:
        patch = (np.empty if inside else np.zeros)((image.shape[0], *size), dtype)
        if read.size:   # torch converts half floats several times faster than numpy
            torch.from_numpy(patch[(slice(None), *dst)]).copy_(torch.from_numpy(np.ascontiguousarray(read)))
    seg = np.zeros(size, np.int16)
    if label is not None:
        seg[tuple(dst)] = label[tuple(src)]
    return patch, seg


def patch_start(rng: np.random.Generator, spatial: tuple[int, ...], size: tuple[int, ...],
                *, centre: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """A corner for a patch: around ``centre`` (kept inside the volume where the volume is
    large enough), or uniformly at random; a volume smaller than the patch is centred.

    Args:
        rng: the random generator.
        spatial: the volume's size.
        size: the patch size.
        centre: a voxel the patch should contain (None: anywhere).
    """
    start = []
    for axis, (n, p) in enumerate(zip(spatial, size)):
        if n <= p:
            start.append(-((p - n) // 2))
        elif centre is not None:
            start.append(int(np.clip(centre[axis] - p // 2 + rng.integers(-(p // 4), p // 4 + 1), 0, n - p)))
        else:
            start.append(int(rng.integers(0, n - p + 1)))
    return tuple(start)


class PatchSampler:
    """Draws (image, label) patches from the given cases of a cache.

    With probability ``foreground_share`` a patch is centred near a voxel of a random
    foreground label present in the case (nnU-Net forces a third of each batch likewise).

    Args:
        cache: the prepared cache.
        case_ids: the cases to draw from.
        patch_size: the patch size.
        foreground_share: the share of patches centred near a foreground voxel.
    """

    def __init__(self, cache: Cache, case_ids: list[str], patch_size: tuple[int, int, int],
                 *, foreground_share: float = 1 / 3):
        if not case_ids:
            raise DatasetError("no cases to sample patches from")
        if not 0.0 <= foreground_share <= 1.0:
            raise DatasetError(f"foreground share must be in [0, 1], not {foreground_share}")
        self.cache, self.case_ids = cache, list(case_ids)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.foreground_share = foreground_share
        self._cases: dict[str, CachedCase] = {}

    def _case(self, case_id: str) -> CachedCase:
        if case_id not in self._cases:
            self._cases[case_id] = self.cache.load(case_id)
        return self._cases[case_id]

    def choose(self, rng: np.random.Generator) -> tuple[CachedCase, tuple[int, ...], bool]:
        """(case, patch corner, whether foreground was forced) for one patch."""
        case = self._case(self.case_ids[int(rng.integers(len(self.case_ids)))])
        spatial = case.image.shape[1:]
        forced = bool(rng.random() < self.foreground_share) and len(case.foreground) > 0
        centre = None
        if forced:
            values = np.unique(case.foreground[:, 0])
            value = values[int(rng.integers(len(values)))]
            rows = case.foreground[case.foreground[:, 0] == value]
            centre = tuple(int(v) for v in rows[int(rng.integers(len(rows)))][1:])
        return case, patch_start(rng, spatial, self.patch_size, centre=centre), forced

    def sample(self, rng: np.random.Generator, margin: tuple[int, ...] = (0, 0, 0),
               dtype=np.float32) -> tuple[np.ndarray, np.ndarray, bool]:
        """(image (C, *region) of ``dtype`` (None: as stored), label (*region), whether
        foreground was forced): the patch, with ``margin`` more voxels on each side of each
        axis (for a spatial transform)."""
        case, start, forced = self.choose(rng)
        region = tuple(p + 2 * m for p, m in zip(self.patch_size, margin))
        image, label = extract_patch(case.image, case.label, tuple(s - m for s, m in zip(start, margin)), size=region,
                                     dtype=dtype)
        return image, label, forced
