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
from scnas.genotype import Genotype, genotype_from_data

CALIBRATION_CASES = 4


def _noise(rng: np.random.Generator, shape: tuple[int, int, int], smoothing: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    field = rng.standard_normal(shape)
    field = gaussian_filter(field, smoothing, mode="wrap") if smoothing > 0 else field
    return ((field - field.mean()) / field.std()).astype(np.float32)


def teacher(genotype: Genotype, stem: int, seed: int, *, depth: int = 3) -> torch.nn.Module:
    """The planted genotype's network (1 channel in, 2 classes out) with weights drawn from ``seed``.

    Args:
        genotype: the planted cells.
        stem: the teacher's stem width.
        seed: the seed of its random weights.
        depth: its down-samplings.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build_network(genotype, BuildConfig(stem_channels=stem, in_channels=1, num_classes=2, depth=depth))
    return net.eval()


def planted_cases(genotype: Genotype, cases: int = 10, *, shape: tuple[int, int, int] = (32, 32, 32), stem: int = 4,
                  seed: int = 0, foreground: float = 0.3, smoothing: float = 1.0, depth: int = 3
                  ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The cases of a planted task in memory: (case ID, image (1, *shape) float32, label (*shape)
    uint8); see :func:`write_planted_dataset`.

    Args:
        genotype: the cells of the teacher network that makes the labels.
        cases: how many cases.
        shape: each image's size in voxels (multiples of ``2 ** depth``).
        stem: the teacher's stem width.
        seed: the same seed gives the same cases.
        foreground: the share of voxels labelled foreground (in the first cases; between 0 and 1).
        smoothing: the Gaussian filter's sigma (voxels) that smooths the images' noise; 0: white noise.
        depth: the teacher's down-samplings.
    """
    if cases < 1 or any(n < 2 ** depth or n % 2 ** depth for n in shape) or not 0 < foreground < 1:
        raise ValueError(f"a planted task needs at least one case, a shape of multiples of {2 ** depth} voxels "
                         "(multiples of 8 at depth 3) and a foreground share strictly between 0 and 1")
    net = teacher(genotype, stem, seed, depth=depth)
    images = [_noise(np.random.default_rng([seed, 2, index]), shape, smoothing) for index in range(cases)]
    with torch.no_grad():
        scores = [(lambda logits: (logits[0, 1] - logits[0, 0]).numpy())(net(torch.from_numpy(image)[None, None]))
                  for image in images]
    threshold = float(np.quantile(np.stack(scores[:CALIBRATION_CASES]), 1.0 - foreground))
    return [(f"planted_{index:03d}", image[None], (score > threshold).astype(np.uint8))
            for index, (image, score) in enumerate(zip(images, scores))]


def write_planted_dataset(out: str | os.PathLike, genotype: Genotype, cases: int = 10,
                          *, shape: tuple[int, int, int] = (32, 32, 32), stem: int = 4, seed: int = 0,
                          foreground: float = 0.3, smoothing: float = 1.0, layout: str = D.LAYOUT,
                          force: bool = False, depth: int = 3) -> Path:
    """Write a task folder whose labels ``genotype``'s teacher network makes (see above);
    returns the folder. The same arguments give the same files.

    Args:
        out: the task folder to write (must not exist unless ``force``).
        genotype: the cells of the teacher network that makes the labels.
        cases: how many cases.
        shape: each image's size in voxels (multiples of ``2 ** depth``).
        stem: the teacher's stem width.
        seed: the same seed writes the same files.
        foreground: the share of voxels labelled foreground (in the first cases; between 0 and 1).
        smoothing: the Gaussian filter's sigma (voxels) that smooths the images' noise; 0: white noise.
        layout: ``msd`` or ``nnunetv2``.
        force: replace an existing ``out``.
        depth: the teacher's down-samplings (a search of the task should use the same).
    """
    made = planted_cases(genotype, cases, shape=shape, stem=stem, seed=seed, foreground=foreground,
                         smoothing=smoothing, depth=depth)
    check_task_folder(out, layout, force)
    return write_task(out, iter(made), 1, foreground_classes=1, spacing=(1.0, 1.0, 1.0), layout=layout,
                      description=f"scnas planted-architecture task (teacher seed {seed}, stem {stem}"
                                  f"{'' if depth == 3 else f', depth {depth}'})")


CONTEXT_CELLS = ("decoder_normal",)
"""Where a context task's needed operation sits: at depth 1 the decoder-normal cell is the only
cell that works on full-resolution features at stride 1 (docs/search.md, "A task that needs an
operation")."""


def context_cases(cases: int = 12, *, shape: tuple[int, int, int] = (32, 32, 32), offset: int = 4,
                  threshold: float = 0.5, seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The cases of a *context* task in memory: white noise in (one channel), and a voxel is
    foreground where it and the voxel ``offset`` further along any axis (cyclically) are both
    above ``threshold``. Only an exact view ``offset`` voxels away at full resolution fits it:
    in a depth-1 network the decoder-normal cell with ``sep_dil{offset}`` edges
    (:func:`context_genotype`, the simplest fit; two stacked edges of smaller dilations reach
    as far); down-sampled paths blur the partner's position. The rule wraps around the borders.

    Args:
        cases: how many cases.
        shape: each image's size in voxels (even, for a depth-1 network).
        offset: the partner's distance in voxels (2, 3 or 4: a dilation of the vocabulary).
        threshold: what counts as bright, in standard deviations of the noise.
        seed: the same seed gives the same cases.
    """
    if cases < 1 or offset not in (2, 3, 4) or any(n < 2 * offset or n % 2 for n in shape):
        raise ValueError("a context task needs at least one case, an offset of 2, 3 or 4 (a dilation of the "
                         f"vocabulary; got {offset}) and even sizes of at least twice the offset (got {shape})")
    made = []
    for index in range(cases):
        bright = np.random.default_rng([seed, 3, index]).standard_normal(shape).astype(np.float32)
        above = bright > threshold
        label = np.zeros(shape, dtype=bool)
        for axis in range(3):
            label |= above & np.roll(above, -offset, axis=axis)
        made.append((f"context_{index:03d}", bright[None], label.astype(np.uint8)))
    return made


def context_genotype(offset: int = 4) -> Genotype:
    """The genotype a context task of ``offset`` rewards: 2 nodes per cell, every decoder-normal
    edge ``sep_dil{offset}_conv_3x3x3``, every other edge ``conv_3x3x3``."""
    def cell(op: str) -> dict:
        return {"edges": [{"from": 0, "to": 2, "op": op}, {"from": 1, "to": 2, "op": op},
                          {"from": 1, "to": 3, "op": op}, {"from": 2, "to": 3, "op": op}], "concat": [2, 3]}

    needed = f"sep_dil{offset}_conv_3x3x3"
    return genotype_from_data({"format": "scnas-genotype", "version": 1, "nodes": 2, "cells": {
        name: cell(needed if name in CONTEXT_CELLS else "conv_3x3x3")
        for name in ("encoder_normal", "reduction", "decoder_normal", "expansion")}},
        source=f"context task genotype (offset {offset})")


def write_context_dataset(out: str | os.PathLike, cases: int = 12, *, shape: tuple[int, int, int] = (32, 32, 32),
                          offset: int = 4, threshold: float = 0.5, seed: int = 0, layout: str = D.LAYOUT,
                          force: bool = False) -> Path:
    """Write the task folder of :func:`context_cases`; returns it. Search it at depth 1.

    Args:
        out: the task folder to write (must not exist unless ``force``).
        cases: how many cases.
        shape: each image's size in voxels.
        offset: the partner's distance in voxels (2, 3 or 4).
        threshold: what counts as bright.
        seed: the same seed writes the same files.
        layout: ``msd`` or ``nnunetv2``.
        force: replace an existing ``out``.
    """
    made = context_cases(cases, shape=shape, offset=offset, threshold=threshold, seed=seed)
    check_task_folder(out, layout, force)
    return write_task(out, iter(made), 1, foreground_classes=1, spacing=(1.0, 1.0, 1.0), layout=layout,
                      description=f"scnas context task (offset {offset}, threshold {threshold:g}, seed {seed}); "
                                  "search it at depth 1")


def learnability(cases: list[tuple[str, np.ndarray, np.ndarray]], students: dict[str, Genotype], steps: int, *,
                 stem: int = 4, depth: int = 3, lr: float = 3e-3, held_out: int = 4, seed: int = 1
                 ) -> dict[str, float]:
    """Can the task reward the planted operations at all? Train a fresh network of each genotype
    in ``students`` for ``steps`` Adam steps of one whole case on all but the last ``held_out``
    cases, and return each one's soft-Jaccard loss on those (lower: fits the labels better). If
    the planted genotype's student is no better than random genotypes' at the search's budget,
    no search can be expected to find it there: the loss that moves alpha does not depend on it.

    Args:
        cases: the task's cases, as :func:`planted_cases` returns them.
        students: name -> genotype of each network to train.
        steps: Adam steps per student.
        stem: the students' stem width.
        depth: their down-samplings.
        lr: Adam's learning rate.
        held_out: the last cases, scored and never trained on.
        seed: the seed of every student's initial weights.
    """
    from scnas.metrics import soft_jaccard_loss

    if not 0 < held_out < len(cases):
        raise ValueError(f"learnability needs more cases ({len(cases)}) than it holds out ({held_out})")
    x = [torch.from_numpy(image)[None] for _, image, _ in cases]
    y = [torch.from_numpy(label.astype(np.int64))[None] for _, _, label in cases]
    train = len(cases) - held_out
    result = {}
    for name, genotype in students.items():
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = build_network(genotype, BuildConfig(stem_channels=stem, in_channels=1, num_classes=2, depth=depth))
        optimiser = torch.optim.Adam(net.parameters(), lr=lr)
        for step in range(steps):
            loss = soft_jaccard_loss(net(x[step % train]), y[step % train])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        net.eval()
        with torch.no_grad():
            result[name] = float(np.mean([float(soft_jaccard_loss(net(x[i]), y[i])) for i in range(train, len(cases))]))
    return result
