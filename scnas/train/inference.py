"""Sliding-window inference: overlapping patches (50% by default), Gaussian importance
weighting, batched windows, optional mirroring test-time augmentation.

Everything happens where the network runs, as in nnU-Net: the image is copied to the device
once, windows are cut, mirrored, predicted and blended there, and only the finished logits (or
the label map, see :meth:`scnas.train.predict.Predictor.segment`) come back. When the volume
does not fit the device, ``accumulate="host"`` keeps image and sums in CPU memory and moves one
batch of windows at a time.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import numpy as np
import torch

PredictFn = Callable[[np.ndarray], np.ndarray]
"""(B, C, *patch) float32 -> (B, K, *patch) logits (numpy; e.g. an onnxruntime session)."""

TensorPredictFn = Callable[[torch.Tensor], torch.Tensor]
"""(B, C, *patch) tensor on the compute device -> (B, K, *patch) logits on that device (any
float dtype: half-precision outputs are summed in float32)."""

ACCUMULATE_CHOICES = ("device", "host")


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


def mirror_axes(mirror: bool) -> list[tuple[int, ...]]:
    """The flips of test-time mirroring as dims of a (B, C, X, Y, Z) batch: none, or all 8
    combinations of the three spatial axes."""
    return [axes for r in range(4) for axes in itertools.combinations((2, 3, 4), r)] if mirror else [()]


def sliding_window_logits(image: torch.Tensor, predict: TensorPredictFn, patch: tuple[int, int, int],
                          *, num_classes: int, overlap: float = 0.5, batch_size: int = 2, gaussian: bool = True,
                          mirror: bool = False, device: torch.device | str | None = None, accumulate: str = "device",
                          progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Logits (K, X, Y, Z), float32, for an image (C, X, Y, Z).

    ``device``: where ``predict`` runs (default: the image's device). ``accumulate``: ``device``
    keeps the image, the logit sums and the weights there (fastest; needs about
    (C + K + 1) x 4 bytes per voxel of device memory); ``host`` keeps them in CPU memory and
    moves one batch of windows at a time. The result lies where it was accumulated. Images
    smaller than the patch are padded with zeros (the normalised background) and the result
    cropped back. Mirrored predictions are flipped back and averaged before weighting.

    Args:
        image: (C, X, Y, Z), float32, at least ``patch`` in every axis.
        predict: maps a batch of windows (B, C, *patch) to logits (B, K, *patch).
        patch: the window size, as the network was trained.
        num_classes: K, the logit channels ``predict`` returns.
        overlap: the windows' overlap, 0 to 0.95.
        batch_size: windows per call of ``predict``.
        gaussian: weight each window by a Gaussian (nnU-Net's), else uniformly.
        mirror: also average over the 8 mirrorings.
        device: where ``predict`` runs (default: the image's device).
        accumulate: ``device`` or ``host``: where the sums are kept (see above).
        progress: called with (windows done, windows in all).
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), not {overlap}")
    if accumulate not in ACCUMULATE_CHOICES:
        raise ValueError(f"accumulate must be one of {ACCUMULATE_CHOICES}, not {accumulate!r}")
    compute = torch.device(device) if device is not None else image.device
    home = compute if accumulate == "device" else torch.device("cpu")
    with torch.inference_mode():
        image = image.to(home, torch.float32)
        spatial = tuple(image.shape[1:])
        padded_shape = tuple(max(n, p) for n, p in zip(spatial, patch))
        if padded_shape != spatial:
            image = torch.nn.functional.pad(image, [v for n, p in reversed(list(zip(spatial, padded_shape)))
                                                   for v in (0, p - n)])
        weights = torch.from_numpy(gaussian_importance(patch) if gaussian else np.ones(patch, np.float32)).to(home)
        logits = torch.zeros((num_classes, *padded_shape), dtype=torch.float32, device=home)
        total = torch.zeros(padded_shape, dtype=torch.float32, device=home)
        corners = list(itertools.product(*[window_starts(n, p, overlap) for n, p in zip(padded_shape, patch)]))
        flips = mirror_axes(mirror)
        for first in range(0, len(corners), batch_size):
            chunk = corners[first:first + batch_size]
            regions = [tuple(slice(c, c + p) for c, p in zip(corner, patch)) for corner in chunk]
            windows = torch.stack([image[(slice(None), *region)] for region in regions])
            windows = windows.to(compute, non_blocking=True)
            out = None
            for axes in flips:
                result = predict(torch.flip(windows, axes) if axes else windows).float()
                result = torch.flip(result, axes) if axes else result
                if out is None:  # a predictor may hand back its input; the next flips still read it
                    out = result.clone() if result.data_ptr() == windows.data_ptr() else result
                else:
                    out.add_(result)
            if len(flips) > 1:
                out /= len(flips)
            out = out.to(home)
            for region, window_logits in zip(regions, out):
                logits[(slice(None), *region)].addcmul_(window_logits, weights)
                total[region] += weights
            if progress:
                progress(min(first + batch_size, len(corners)), len(corners))
        logits /= total
        return logits[(slice(None), *[slice(0, n) for n in spatial])]


def sliding_window(image: np.ndarray, predict: PredictFn, patch: tuple[int, int, int], *, num_classes: int,
                   overlap: float = 0.5, batch_size: int = 2, gaussian: bool = True, mirror: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """:func:`sliding_window_logits` for numpy in and out (CPU): logits (K, X, Y, Z) for an
    image (C, X, Y, Z), with ``predict`` taking and returning numpy batches.

    Args:
        image: (C, X, Y, Z) numpy array.
        predict: maps a numpy batch (B, C, *patch) to logits (B, K, *patch).
        patch: the window size.
        num_classes: K.
        overlap: the windows' overlap, 0 to 0.95.
        batch_size: windows per call of ``predict``.
        gaussian: Gaussian weighting of each window.
        mirror: also average over the 8 mirrorings.
        progress: called with (windows done, windows in all).
    """

    def run(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(predict(np.ascontiguousarray(batch.numpy())), dtype=np.float32))

    return sliding_window_logits(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), run, patch,
                                 num_classes=num_classes, overlap=overlap, batch_size=batch_size, gaussian=gaussian,
                                 mirror=mirror, progress=progress).numpy()
