"""Data augmentation, drawn where the patch is read and applied where it is cheapest.

Kinds and probabilities follow nnU-Net (rotation/scaling 0.2, intensity 0.15, noise 0.1,
mirroring 0.5 per axis). An :class:`Augmentation` first **draws** a :class:`Recipe` from the
``numpy.random.Generator`` of the patch (every random number, so the same generator state gives
the same patch in any process), then **applies** it to torch tensors on any device: in the
loader worker when training runs on the CPU, on the GPU after the copy when it runs on CUDA
(``scnas.data.loader``), where the spatial transform is one ``grid_sample`` call on the device
instead of a fraction of a second of a CPU core per patch (docs/benchmarks.md, "Data").

**Spatial transform without artefacts.** Rotating or scaling an already cropped patch fills its
corners with zeros that are not in the image (up to 20 % of a patch at 15 degrees). nnU-Net
therefore crops a larger patch first (its ``initial_patch_size``, sized for the largest
rotation) and the final patch from the transformed one. Here the transform is drawn *before*
reading, :meth:`SpatialTransform.margin` gives the exact region the rotated, scaled patch
covers (plus one voxel for interpolation), only that region is read, and one
``torch.nn.functional.grid_sample`` maps it to the patch grid: trilinear for the image (as
nnU-Net v2's batchgeneratorsv2; a cubic spline costs far more and its overshoot brings
nothing to z-scored intensities), nearest neighbour for the
label, so labels keep their values. Only a patch at the border of the volume still gets zeros,
where the volume has no voxels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor


@dataclass
class SpatialTransform:
    """Rotate (each axis, degrees) and scale about the patch centre with probability ``p``."""

    p: float = 0.2
    rotation: float = 15.0
    scale: tuple[float, float] = (0.85, 1.25)

    def draw(self, rng: np.random.Generator) -> np.ndarray | None:
        """A 3x3 matrix from patch offsets (voxels from the patch centre) to offsets in the
        volume, or None (no spatial transform for this patch)."""
        if rng.random() >= self.p:
            return None
        from scipy.spatial.transform import Rotation

        angles = rng.uniform(-self.rotation, self.rotation, 3)
        zoom = rng.uniform(*self.scale)
        return Rotation.from_euler("xyz", angles, degrees=True).as_matrix() / zoom

    @staticmethod
    def margin(matrix: np.ndarray | None, size: tuple[int, ...]) -> tuple[int, ...]:
        """Voxels to read beyond the patch on each side, per axis, so that every point the
        transformed patch samples (and its interpolation neighbours) lies in the region."""
        if matrix is None:
            return (0,) * len(size)
        half = (np.asarray(size) - 1) / 2
        reach = np.abs(matrix) @ half                 # half extent of the transformed patch
        return tuple(int(max(0, math.ceil(r - h - 1e-9))) + 1 for r, h in zip(reach, half))

    @staticmethod
    def apply(image: Tensor, label: Tensor, matrix: np.ndarray, *, size: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Sample the (C, *size) patch and its label from the region (read with ``margin``
        around the patch, so both share its centre).

        Args:
            image: the region read around the patch (C, *region).
            label: its label (*region).
            matrix: the affine transform to apply about the patch's centre.
            size: the patch size.
        """
        region = np.asarray(image.shape[1:])
        out = np.asarray(size)
        # Normalised output -> normalised input coordinates (align_corners=True: -1 and 1 are
        # the centres of the first and last voxel), reversed into grid_sample's (W, H, D) order.
        theta = np.diag(2 / np.maximum(region - 1, 1)) @ matrix @ np.diag((out - 1) / 2)
        theta = torch.as_tensor(theta[::-1, ::-1].copy(), dtype=torch.float32, device=image.device)
        base = [torch.linspace(-1, 1, n, device=image.device) for n in size]
        grid = torch.empty(*size, 3, device=image.device)
        for k in range(3):   # broadcast sums: ~5x cheaper than affine_grid's matrix product on a CPU
            grid[..., k] = (theta[k, 0] * base[2][None, None, :] + theta[k, 1] * base[1][None, :, None]
                            + theta[k, 2] * base[0][:, None, None])
        grid = grid[None]
        patch = torch.nn.functional.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros",
                                                align_corners=True)[0]
        seg = torch.nn.functional.grid_sample(label[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                                              align_corners=True)[0, 0].to(label.dtype)
        return patch, seg


@dataclass
class RandomFlip:
    """Mirror each spatial axis with probability ``p`` (one copy for all axes drawn)."""

    p: float = 0.5
    axes: tuple[int, ...] = (0, 1, 2)

    def draw(self, rng: np.random.Generator, channels: int) -> list[int] | None:
        axes = [axis for axis in self.axes if rng.random() < self.p]
        return axes or None

    @staticmethod
    def apply(image: Tensor, label: Tensor, axes: list[int]) -> tuple[Tensor, Tensor]:
        return torch.flip(image, [a + 1 for a in axes]), torch.flip(label, axes)


@dataclass
class IntensityScaleShift:
    """x * a + b per channel, with probability ``p`` (in place)."""

    p: float = 0.15
    scale: tuple[float, float] = (0.75, 1.25)
    shift: tuple[float, float] = (-0.1, 0.1)

    def draw(self, rng: np.random.Generator, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
        if rng.random() >= self.p:
            return None
        return rng.uniform(*self.scale, channels), rng.uniform(*self.shift, channels)

    @staticmethod
    def apply(image: Tensor, label: Tensor, params) -> tuple[Tensor, Tensor]:
        a, b = (torch.as_tensor(v, dtype=image.dtype, device=image.device).view(-1, 1, 1, 1) for v in params)
        return image.mul_(a).add_(b), label


@dataclass
class Gamma:
    """nnU-Net's gamma: rescale each channel to [0, 1], raise to gamma, rescale back (in place)."""

    p: float = 0.15
    gamma: tuple[float, float] = (0.7, 1.5)

    def draw(self, rng: np.random.Generator, channels: int) -> np.ndarray | None:
        if rng.random() >= self.p:
            return None
        return rng.uniform(*self.gamma, channels)

    @staticmethod
    def apply(image: Tensor, label: Tensor, gammas) -> tuple[Tensor, Tensor]:
        flat = image.view(image.shape[0], -1)
        low, high = flat.amin(1).view(-1, 1, 1, 1), flat.amax(1).view(-1, 1, 1, 1)
        span = (high - low).clamp_(min=1e-8)
        power = torch.as_tensor(gammas, dtype=image.dtype, device=image.device).view(-1, 1, 1, 1)
        return image.sub_(low).div_(span).clamp_(min=0.0).pow_(power).mul_(span).add_(low), label


@dataclass
class GaussianNoise:
    """Additive noise with a random standard deviation, with probability ``p`` (in place; the
    noise comes from a generator of the tensor's device, seeded from the patch's draw)."""

    p: float = 0.1
    sigma: tuple[float, float] = (0.0, 0.1)

    def draw(self, rng: np.random.Generator, channels: int) -> tuple[float, int] | None:
        if rng.random() >= self.p:
            return None
        return float(rng.uniform(*self.sigma)), int(rng.integers(2**62))

    @staticmethod
    def apply(image: Tensor, label: Tensor, params) -> tuple[Tensor, Tensor]:
        sigma, seed = params
        generator = torch.Generator(device=image.device).manual_seed(seed)
        noise = torch.randn(image.shape, generator=generator, dtype=image.dtype, device=image.device)
        return image.add_(noise, alpha=sigma), label


@dataclass
class Recipe:
    """Everything random about one patch's augmentation: the spatial matrix (or None) and, in
    order, each later transform with its drawn parameters."""

    matrix: np.ndarray | None
    steps: list[tuple[Any, Any]]


@dataclass
class Augmentation:
    """The spatial transform (its region is read around the patch) and the transforms after it."""

    spatial: SpatialTransform | None = field(default_factory=SpatialTransform)
    transforms: list = field(default_factory=lambda: [RandomFlip(), IntensityScaleShift(), Gamma(), GaussianNoise()])

    def draw(self, rng: np.random.Generator, channels: int) -> Recipe:
        matrix = self.spatial.draw(rng) if self.spatial is not None else None
        steps = [(t, params) for t in self.transforms if (params := t.draw(rng, channels)) is not None]
        return Recipe(matrix, steps)

    def margin(self, recipe: Recipe, size: tuple[int, ...]) -> tuple[int, ...]:
        return SpatialTransform.margin(recipe.matrix, size)

    @staticmethod
    def apply(image: Tensor, label: Tensor, recipe: Recipe, *, size: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """The augmented (C, *size) float image and its label from the region read with
        ``margin`` (changes ``image`` in place).

        Args:
            image: the region read around the patch (C, *region); changed in place.
            label: its label (*region).
            recipe: the drawn augmentation (from :meth:`draw`).
            size: the patch size.
        """
        if recipe.matrix is not None:
            image, label = SpatialTransform.apply(image, label, recipe.matrix, size=size)
        for transform, params in recipe.steps:
            image, label = transform.apply(image, label, params)
        return image, label


def default_augmentation() -> Augmentation:
    """The pipeline used for training by default."""
    return Augmentation()
