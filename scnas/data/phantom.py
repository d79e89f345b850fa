"""Synthetic MSD-layout datasets that a small network can learn to segment.

Each case: an ellipsoidal "body" (zero outside, as in skull-stripped MRI), nested blobs for
the classes (class 1 contains class 2 contains class 3, like the tumour regions of BraTS),
a different contrast per channel and class, a smooth intensity bias and Gaussian noise, on
an anisotropic grid. The same seed gives the same dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from scnas import defaults as D
from scnas.data.dataset import DatasetError
from scnas.errors import check_choice
from scnas.fileio import ensure_folder, file_in_the_way, give_default_mode

CHANNEL_NAMES = ("FLAIR", "T1w", "T1gd", "T2w", "ADC", "DWI", "PD", "SWI")


def _ellipsoid(shape, spacing, centre_mm, radii_mm) -> np.ndarray:
    axes = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]
    grid = np.meshgrid(*axes, indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre_mm, radii_mm)) <= 1.0


def make_case(rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, float, float],
              *, contrasts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: image (C, X, Y, Z) float32 and label (X, Y, Z) uint8. ``contrasts`` is a
    (channels, classes + 1) table of mean intensities (column 0: healthy tissue).

    Args:
        rng: the random generator.
        shape: the image's size in voxels.
        spacing: voxel size in mm (shapes are round in mm).
        contrasts: (channels, classes + 1) mean intensities.
    """
    channels, classes = contrasts.shape[0], contrasts.shape[1] - 1
    extent = np.array(shape) * np.array(spacing)
    body = _ellipsoid(shape, spacing, extent / 2 + rng.uniform(-0.03, 0.03, 3) * extent,
                      extent * rng.uniform(0.38, 0.46, 3))
    label = np.zeros(shape, np.uint8)
    centre = extent / 2 + rng.uniform(-0.12, 0.12, 3) * extent
    radii = extent * rng.uniform(0.2, 0.28, 3)
    for cls in range(1, classes + 1):
        blob = _ellipsoid(shape, spacing, centre, radii) & body
        label[blob] = cls
        centre = centre + rng.uniform(-0.3, 0.3, 3) * radii   # the next class sits inside this one
        radii = radii * rng.uniform(0.55, 0.75, 3)
    coords = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    bias = 1.0 + 0.1 * sum(c * g for c, g in zip(rng.uniform(-1, 1, 3), coords))
    image = np.zeros((channels, *shape), np.float32)
    for c in range(channels):
        mean = contrasts[c][label]
        noisy = mean * bias + rng.normal(0.0, 8.0, shape)
        image[c] = np.where(body, np.maximum(noisy, 1.0), 0.0)  # strictly positive inside the body
    return image, label


def write_phantom_dataset(out: str | os.PathLike, cases: int = 20, channels: int = 4, *, foreground_classes: int = 3,
                          shape: tuple[int, int, int] = (48, 48, 24), spacing: tuple[float, float, float] = (1.0, 1.0, 2.5),
                          seed: int = 0, layout: str = D.LAYOUT, force: bool = False) -> Path:
    """Write a phantom task folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``) at ``out``.

    ``foreground_classes`` counts the blobs (labels 1..K, with background 0): the command
    line's ``--classes`` counts background too, as ``BuildConfig.num_classes`` does, and passes
    one less.
    ``layout`` "msd" writes the MSD v1 flavour (4D images), "nnunetv2" one file per channel.
    The folder appears complete or not at all (written beside it, then renamed).

    Args:
        out: the task folder to write (must not exist unless ``force``).
        cases: how many cases.
        channels: image channels per case.
        foreground_classes: classes besides background (labels 1..K; 0 is background).
        shape: each image's size in voxels.
        spacing: voxel size in mm (anisotropic by default).
        seed: the same seed writes the same files.
        layout: ``msd`` (4D images) or ``nnunetv2`` (one file per channel).
        force: replace an existing ``out``.
    """
    if not 1 <= channels <= len(CHANNEL_NAMES) or not 1 <= foreground_classes <= 8 or cases < 1:
        raise DatasetError(f"phantoms have 1-{len(CHANNEL_NAMES)} channels, 1-8 foreground classes and at least one case")
    if any(n < 8 for n in shape) or any(s <= 0 for s in spacing):
        raise DatasetError("phantom shape must be at least 8 voxels per axis and spacing positive")
    check_task_folder(out, layout, force)
    dataset_rng = np.random.default_rng([seed, 0])
    contrasts = np.empty((channels, foreground_classes + 1))
    contrasts[:, 0] = dataset_rng.uniform(80, 120, channels)
    for c in range(channels):   # each class differs from its neighbours by >= 25 in some channel
        signs = dataset_rng.choice([-1, 1], foreground_classes)
        contrasts[c, 1:] = contrasts[c, 0] + signs * dataset_rng.uniform(25, 70, foreground_classes)
    made = ((f"phantom_{index:03d}", *make_case(np.random.default_rng([seed, 1, index]), shape, spacing,
                                                contrasts=contrasts))
            for index in range(cases))
    return write_task(out, made, channels, foreground_classes=foreground_classes, spacing=spacing, layout=layout,
                      description=f"scnas synthetic phantoms (seed {seed})")


def check_task_folder(out: str | os.PathLike, layout: str, force: bool) -> None:
    """Refuse, before any work, a synthetic task folder that cannot be written at ``out``."""
    out = Path(out)
    check_choice(layout, D.LAYOUT_CHOICES, "layout", error=DatasetError)
    occupied = (out.is_dir() and any(out.iterdir())) or (out.exists() and not out.is_dir())
    if occupied and not force:
        raise DatasetError("already exists; choose another folder or pass --force to replace it", source=str(out))
    if not out.parent.is_dir():
        blocker = file_in_the_way(out.parent)
        raise DatasetError(f"{str(blocker)!r} is a file, not a folder" if blocker else
                           f"folder {str(out.parent)!r} does not exist", source=str(out))
    ensure_folder(out.parent, DatasetError, "the folder of a phantom dataset")   # writable: fail before any work


def write_task(out: str | os.PathLike, cases, channels: int, *, foreground_classes: int, spacing: tuple[float, float, float],
               layout: str, description: str) -> Path:
    """Write a synthetic task folder from ``cases`` ((case ID, image (C, X, Y, Z), label) each)
    in the given layout; the folder appears complete or not at all (staged beside it, renamed).

    Args:
        out: the task folder.
        cases: (case ID, image (C, X, Y, Z), label) of each case.
        channels: image channels.
        foreground_classes: classes besides background (labels 1..K).
        spacing: voxel size in mm.
        layout: ``msd`` or ``nnunetv2``.
        description: dataset.json's description.
    """
    import nibabel as nib

    out = Path(out)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise DatasetError(f"cannot write in {str(out.parent)!r}: {exc.strerror or exc}", source=str(out)) from None
    try:
        (staging / "imagesTr").mkdir()
        (staging / "labelsTr").mkdir()
        affine = np.diag([*spacing, 1.0])
        training = []
        for case_id, image, label in cases:
            if layout == "msd":
                nib.save(nib.Nifti1Image(np.moveaxis(image, 0, -1), affine), staging / "imagesTr" / f"{case_id}.nii.gz")
            else:
                for c in range(channels):
                    nib.save(nib.Nifti1Image(image[c], affine), staging / "imagesTr" / f"{case_id}_{c:04d}.nii.gz")
            nib.save(nib.Nifti1Image(label, affine), staging / "labelsTr" / f"{case_id}.nii.gz")
            training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
        names = {"0": "background", **{str(k): f"class{k}" for k in range(1, foreground_classes + 1)}}
        if layout == "msd":
            meta = {"name": "Phantom", "description": description, "tensorImageSize": "4D",
                    "modality": {str(c): CHANNEL_NAMES[c] for c in range(channels)}, "labels": names,
                    "numTraining": len(training), "numTest": 0, "training": training, "test": []}
        else:
            meta = {"name": "Phantom", "channel_names": {str(c): CHANNEL_NAMES[c] for c in range(channels)},
                    "labels": {name: int(value) for value, name in names.items()}, "numTraining": len(training),
                    "file_ending": ".nii.gz"}
        (staging / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        give_default_mode(staging)   # mkdtemp made it 0700; the task folder is an ordinary folder
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):   # a full disk, a file system gone read-only
            raise DatasetError(f"cannot write the phantom dataset: {exc.strerror or exc}", source=str(out)) from None
        raise
    return out
