"""Sliding-window inference: overlapping patches (50% by default), Gaussian importance
weighting, batched windows, optional mirroring test-time augmentation, accumulation in
CPU memory (so a whole volume never has to fit the device)."""

from __future__ import annotations

import itertools
import math
from typing import Callable

import numpy as np

PredictFn = Callable[[np.ndarray], np.ndarray]
"""(B, C, *patch) float32 -> (B, K, *patch) logits."""


def gaussian_importance(patch: tuple[int, ...], sigma_scale: float = 1 / 8) -> np.ndarray:
    """nnU-Net's importance map: a Gaussian with sigma = patch/8 centred on the patch, scaled
    to max 1, with no zeros (so every voxel keeps some weight)."""
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (n * sigma_scale)) ** 2) for n in patch]
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights = weights / weights.max()
    weights[weights == 0] = weights[weights > 0].min()
    return weights.astype(np.float32)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Window corners along one axis so that consecutive windows overlap by ``overlap``
    (nnU-Net's rule: as many steps as needed, spread evenly from 0 to size - patch)."""
    if size <= patch:
        return [0]
    stride = patch * (1 - overlap)
    steps = int(math.ceil((size - patch) / stride)) + 1
    return [int(round(i * (size - patch) / (steps - 1))) for i in range(steps)]


def sliding_window(image: np.ndarray, predict: PredictFn, patch: tuple[int, int, int], num_classes: int,
                   overlap: float = 0.5, batch_size: int = 2, gaussian: bool = True, mirror: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Logits (K, X, Y, Z) for an image (C, X, Y, Z). Images smaller than the patch are padded
    with zeros (the normalised background) and the result cropped back."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), not {overlap}")
    spatial = image.shape[1:]
    padded_shape = [max(n, p) for n, p in zip(spatial, patch)]
    if list(spatial) != padded_shape:
        padded = np.zeros((image.shape[0], *padded_shape), np.float32)
        padded[(slice(None), *[slice(0, n) for n in spatial])] = image
        image = padded
    weights = gaussian_importance(patch) if gaussian else np.ones(patch, np.float32)
    logits = np.zeros((num_classes, *padded_shape), np.float32)
    total = np.zeros(padded_shape, np.float32)
    corners = list(itertools.product(*[window_starts(n, p, overlap) for n, p in zip(padded_shape, patch)]))
    flips = [axes for r in range(4) for axes in itertools.combinations((2, 3, 4), r)] if mirror else [()]
    for first in range(0, len(corners), batch_size):
        chunk = corners[first:first + batch_size]
        windows = np.stack([image[(slice(None), *[slice(c, c + p) for c, p in zip(corner, patch)])] for corner in chunk])
        out = np.zeros((len(chunk), num_classes, *patch), np.float32)
        for axes in flips:
            flipped = np.flip(windows, axes) if axes else windows
            result = predict(np.ascontiguousarray(flipped))
            out += np.flip(result, axes) if axes else result
        out /= len(flips)
        for corner, window_logits in zip(chunk, out):
            region = tuple(slice(c, c + p) for c, p in zip(corner, patch))
            logits[(slice(None), *region)] += window_logits * weights
            total[region] += weights
        if progress:
            progress(min(first + batch_size, len(corners)), len(corners))
    logits /= total
    return logits[(slice(None), *[slice(0, n) for n in spatial])]
