"""Data augmentation as a composable, seeded pipeline on numpy patches.

Every transform is called as ``transform(image, label, rng)`` with image (C, X, Y, Z), label
(X, Y, Z) and a ``numpy.random.Generator``; the same generator state gives the same result.
Defaults follow nnU-Net's kinds and probabilities (rotation/scaling 0.2, intensity 0.15,
noise 0.1, mirroring 0.5 per axis).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Array = np.ndarray


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: list):
        self.transforms = list(transforms)

    def __call__(self, image: Array, label: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        for transform in self.transforms:
            image, label = transform(image, label, rng)
        return image, label


@dataclass
class RandomFlip:
    """Mirror each spatial axis with probability ``p``."""

    p: float = 0.5
    axes: tuple[int, ...] = (0, 1, 2)

    def __call__(self, image, label, rng):
        for axis in self.axes:
            if rng.random() < self.p:
                image = np.flip(image, axis + 1)
                label = np.flip(label, axis)
        return np.ascontiguousarray(image), np.ascontiguousarray(label)


@dataclass
class RandomAffine:
    """Rotate (each axis, degrees) and scale about the patch centre with probability ``p``;
    cubic spline for the image, nearest neighbour for the label, zeros outside."""

    p: float = 0.2
    rotation: float = 15.0
    scale: tuple[float, float] = (0.85, 1.25)

    def __call__(self, image, label, rng):
        if rng.random() >= self.p:
            return image, label
        from scipy.ndimage import affine_transform
        from scipy.spatial.transform import Rotation

        angles = rng.uniform(-self.rotation, self.rotation, 3)
        zoom = rng.uniform(*self.scale)
        matrix = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() / zoom
        centre = (np.array(label.shape) - 1) / 2
        offset = centre - matrix @ centre
        image = np.stack([affine_transform(c, matrix, offset, order=3, mode="constant", cval=0.0) for c in image])
        label = affine_transform(label, matrix, offset, order=0, mode="constant", cval=0)
        return image.astype(np.float32), label.astype(label.dtype)


@dataclass
class IntensityScaleShift:
    """x * a + b per channel, with probability ``p``."""

    p: float = 0.15
    scale: tuple[float, float] = (0.75, 1.25)
    shift: tuple[float, float] = (-0.1, 0.1)

    def __call__(self, image, label, rng):
        if rng.random() >= self.p:
            return image, label
        a = rng.uniform(*self.scale, (image.shape[0], 1, 1, 1))
        b = rng.uniform(*self.shift, (image.shape[0], 1, 1, 1))
        return (image * a + b).astype(np.float32), label


@dataclass
class Gamma:
    """nnU-Net's gamma: rescale each channel to [0, 1], raise to gamma, rescale back."""

    p: float = 0.15
    gamma: tuple[float, float] = (0.7, 1.5)

    def __call__(self, image, label, rng):
        if rng.random() >= self.p:
            return image, label
        out = np.empty_like(image)
        for c, channel in enumerate(image):
            low, high = float(channel.min()), float(channel.max())
            span = max(high - low, 1e-8)
            out[c] = ((channel - low) / span) ** rng.uniform(*self.gamma) * span + low
        return out, label


@dataclass
class GaussianNoise:
    """Additive noise with a random standard deviation, with probability ``p``."""

    p: float = 0.1
    sigma: tuple[float, float] = (0.0, 0.1)

    def __call__(self, image, label, rng):
        if rng.random() >= self.p:
            return image, label
        return (image + rng.normal(0.0, rng.uniform(*self.sigma), image.shape)).astype(np.float32), label


def default_augmentation() -> Compose:
    """The pipeline used for training by default."""
    return Compose([RandomAffine(), RandomFlip(), IntensityScaleShift(), Gamma(), GaussianNoise()])
