"""A task with a planted architecture: labels made by a network of a known genotype, so that a
search that works must find that genotype's operations more often than chance.

Each case is smooth random noise (one channel, z-normalised, so ``scnas data prepare`` leaves
it as it is); its label is where a *teacher* network, built from the planted genotype with
seeded random weights, scores class 1 above a threshold that makes ``foreground`` of the voxels
of the first cases foreground. A student with the teacher's cells can fit the labels exactly;
cells of other operations can only approximate them. How far a search recovers the planted
operations is measured by :func:`recovery` (``scnas search-report --planted``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from scnas import defaults as D
from scnas.build import BuildConfig, build_network
from scnas.data.phantom import check_task_folder, write_task
from scnas.genotype import Genotype

CALIBRATION_CASES = 4


def _noise(rng: np.random.Generator, shape: tuple[int, int, int], smoothing: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal(shape), smoothing, mode="wrap")
    return ((field - field.mean()) / field.std()).astype(np.float32)


def teacher(genotype: Genotype, stem: int, seed: int) -> torch.nn.Module:
    """The planted genotype's network (1 channel in, 2 classes out) with weights drawn from ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build_network(genotype, BuildConfig(stem_channels=stem, in_channels=1, num_classes=2))
    return net.eval()


def write_planted_dataset(out: str | os.PathLike, genotype: Genotype, cases: int = 10,
                          *, shape: tuple[int, int, int] = (32, 32, 32), stem: int = 4, seed: int = 0,
                          foreground: float = 0.3, smoothing: float = 1.0, layout: str = D.LAYOUT,
                          force: bool = False) -> Path:
    """Write a task folder whose labels ``genotype``'s teacher network makes (see above);
    returns the folder. The same arguments give the same files.

    Args:
        out: the task folder to write (must not exist unless ``force``).
        genotype: the cells of the teacher network that makes the labels.
        cases: how many cases.
        shape: each image's size in voxels (multiples of 8).
        stem: the teacher's stem width.
        seed: the same seed writes the same files.
        foreground: the share of voxels labelled foreground (in the first cases; between 0 and 1).
        smoothing: the Gaussian filter's sigma (voxels) that smooths the images' noise.
        layout: ``msd`` or ``nnunetv2``.
        force: replace an existing ``out``.
    """
    if cases < 1 or any(n < 8 or n % 8 for n in shape) or not 0 < foreground < 1:
        raise ValueError("a planted task needs at least one case, a shape of multiples of 8 voxels and a "
                         "foreground share strictly between 0 and 1")
    check_task_folder(out, layout, force)
    net = teacher(genotype, stem, seed)
    images = [_noise(np.random.default_rng([seed, 2, index]), shape, smoothing) for index in range(cases)]
    with torch.no_grad():
        scores = [(lambda logits: (logits[0, 1] - logits[0, 0]).numpy())(net(torch.from_numpy(image)[None, None]))
                  for image in images]
    threshold = float(np.quantile(np.stack(scores[:CALIBRATION_CASES]), 1.0 - foreground))
    made = ((f"planted_{index:03d}", image[None], (score > threshold).astype(np.uint8))
            for index, (image, score) in enumerate(zip(images, scores)))
    return write_task(out, made, 1, foreground_classes=1, spacing=(1.0, 1.0, 1.0), layout=layout,
                      description=f"scnas planted-architecture task (teacher seed {seed}, stem {stem})")
