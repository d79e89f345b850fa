"""Preprocessing into a cache that search and training read without touching NIfTI again.

Per case: crop to the nonzero region of all channels; resample to the target spacing
(images: cubic spline, ``scipy.ndimage.zoom(order=3)``; labels: nnU-Net's per-label linear
interpolation of each label's mask, threshold 0.5; the nonzero mask: linear, threshold 0.5);
z-normalise each channel with the mean and standard deviation of its nonzero-mask voxels,
zero outside the mask. Stored as ``CASE.npy`` (C, X, Y, Z float32, memory-mappable),
``CASE_seg.npy`` (X, Y, Z int16), ``CASE_fg.npy`` (sampled foreground voxels, rows of
label, x, y, z) and ``CASE.json`` (original shape, spacing, affine, crop box, ...), written
last, so that an existing ``CASE.json`` marks a finished case. ``cache.json`` records the
settings and is written when every case is done; a cache made with other settings is refused.
"""

from __future__ import annotations

import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from scnas import __version__
from scnas.data.dataset import Case, Dataset, DatasetError, LoadedCase, load_case, read_dataset
from scnas.data.splits import kfold_splits, read_splits, write_splits
from scnas.errors import Problem
from scnas.fileio import atomic_write_bytes, atomic_write_text

CACHE_FORMAT = "scnas-cache"
CACHE_VERSION = 1
FOREGROUND_SAMPLES = 10_000
"""Foreground voxels remembered per label and case for the patch sampler (as nnU-Net does)."""


class PrepareSettings(BaseModel):
    """What defines a cache; two caches with different settings never mix."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_spacing: tuple[float, float, float] = Field((0.7, 0.7, 0.7), description="mm, file axis order")
    image_interpolation: str = "cubic"
    label_interpolation: str = "per-label-linear"
    normalization: str = "zscore-nonzero"
    crop: str = "nonzero"


def resampled_shape(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple[int, ...]:
    """round(shape * spacing / target), at least 1 per axis."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def _zoom(volume: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    from scipy.ndimage import zoom

    if tuple(volume.shape) == tuple(shape):
        return volume.copy()
    factors = [n / m for n, m in zip(shape, volume.shape)]
    out = zoom(volume, factors, order=order, mode="nearest", grid_mode=True)
    if out.shape != tuple(shape):  # zoom rounds the output shape itself; it agrees, but be exact
        raise AssertionError(f"zoom gave {out.shape}, expected {shape}")
    return out


def resample_image(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(C, X, Y, Z) -> (C, *shape), cubic spline per channel."""
    return np.stack([_zoom(channel, shape, 3) for channel in image]).astype(np.float32)


def resample_label(label: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """nnU-Net's label resampling: each label's mask interpolated linearly, threshold 0.5
    (higher labels drawn last). Smoother than nearest neighbour on anisotropic data."""
    if tuple(label.shape) == tuple(shape):
        return label.astype(np.int16)
    out = np.zeros(shape, np.int16)
    for value in sorted(int(v) for v in np.unique(label) if v != 0):
        out[_zoom((label == value).astype(np.float32), shape, 1) >= 0.5] = value
    return out


def nonzero_box(image: np.ndarray) -> list[tuple[int, int]]:
    """[(start, stop), ...] per spatial axis of the voxels nonzero in any channel."""
    mask = np.any(image != 0, axis=0)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return box


def image_problems(image: np.ndarray) -> list[str]:
    """Faults that make an image unusable (shared with ``scnas data check``)."""
    problems = []
    bad = ~np.isfinite(image)
    if bad.any():
        problems.append(f"{int(bad.sum())} NaN/Inf voxel(s) in channel(s) "
                        f"{sorted(set(np.nonzero(bad)[0].tolist()))}")
    elif not np.any(image != 0):
        problems.append("image is all zero (nothing to crop to)")
    return problems


def preprocess_case(case: LoadedCase, settings: PrepareSettings, seed: int = 0) -> dict[str, Any]:
    """Crop, resample and normalise one loaded case; returns arrays and the case record."""
    problems = image_problems(case.image)
    if problems:
        raise DatasetError(f"case {case.case_id}: {problems[0]}")
    box = nonzero_box(case.image)
    crop = tuple(slice(a, b) for a, b in box)
    image = case.image[(slice(None), *crop)]
    label = case.label[crop] if case.label is not None else None
    mask = np.any(image != 0, axis=0)
    shape = resampled_shape(image.shape[1:], case.spacing, settings.target_spacing)
    means, stds = [], []
    for channel in image:
        values = channel[mask]
        means.append(float(values.mean()))
        stds.append(float(max(values.std(), 1e-8)))
    resampled = resample_image(image, shape)
    mask_r = _zoom(mask.astype(np.float32), shape, 1) >= 0.5
    for c in range(resampled.shape[0]):
        resampled[c] = np.where(mask_r, (resampled[c] - means[c]) / stds[c], 0.0)
    label_r = resample_label(label, shape) if label is not None else None
    rng = np.random.default_rng(seed)
    locations = []
    if label_r is not None:
        for value in sorted(int(v) for v in np.unique(label_r) if v != 0):
            where = np.argwhere(label_r == value)
            if len(where) > FOREGROUND_SAMPLES:
                where = where[np.sort(rng.choice(len(where), FOREGROUND_SAMPLES, replace=False))]
            locations.append(np.concatenate([np.full((len(where), 1), value), where], axis=1))
    foreground = np.concatenate(locations).astype(np.int32) if locations else np.zeros((0, 4), np.int32)
    record = {
        "case_id": case.case_id, "original_shape": list(case.image.shape[1:]), "original_spacing": list(case.spacing),
        "original_affine": case.affine.tolist(), "crop_box": [list(b) for b in box], "cropped_shape": list(image.shape[1:]),
        "shape": list(shape), "spacing": list(settings.target_spacing), "channel_mean": means, "channel_std": stds,
        "label_voxels": ({str(int(v)): int(n) for v, n in zip(*np.unique(label_r, return_counts=True))}
                         if label_r is not None else None),
    }
    return {"image": resampled.astype(np.float32), "label": label_r, "foreground": foreground, "record": record}


def label_to_original(label: np.ndarray, record: dict[str, Any]) -> np.ndarray:
    """A label map in cache space (``record["shape"]``) back on the case's original grid:
    resampled to the cropped shape (per-label linear), placed into the crop box, 0 outside."""
    if tuple(label.shape) != tuple(record["shape"]):
        raise DatasetError(f"label of shape {tuple(label.shape)} is not in this case's cache space {tuple(record['shape'])}")
    out = np.zeros(record["original_shape"], np.int16)
    out[tuple(slice(a, b) for a, b in record["crop_box"])] = resample_label(label, tuple(record["cropped_shape"]))
    return out


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _prepare_one(args: tuple[Dataset, Case, Path, PrepareSettings, int]) -> tuple[str, dict | None, str | None]:
    dataset, case, cache, settings, seed = args
    try:
        result = preprocess_case(load_case(dataset, case), settings, seed)
    except DatasetError as exc:
        return case.case_id, None, str(exc)
    atomic_write_bytes(cache / f"{case.case_id}.npy", _npy_bytes(result["image"]))
    if result["label"] is not None:
        atomic_write_bytes(cache / f"{case.case_id}_seg.npy", _npy_bytes(result["label"]))
    atomic_write_bytes(cache / f"{case.case_id}_fg.npy", _npy_bytes(result["foreground"]))
    atomic_write_text(cache / f"{case.case_id}.json", json.dumps(result["record"], indent=1) + "\n")
    return case.case_id, result["record"], None


@dataclass
class PrepareReport:
    cache: Path
    prepared: list[str]
    skipped: list[str]
    seconds: float
    input_bytes: int


def _cache_header(dataset: Dataset, settings: PrepareSettings) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "scnas_version": __version__,
            "settings": settings.model_dump(mode="json"),
            "dataset": {"name": dataset.name, "flavour": dataset.flavour, "source": str(dataset.root.resolve()),
                        "channel_names": dataset.channel_names, "labels": dataset.labels}}


def _check_existing_cache(cache: Path, header: dict[str, Any]) -> None:
    marker = cache / "cache.json"
    settings_file = cache / "settings.json"
    for path in (marker, settings_file):
        if path.exists():
            existing = json.loads(path.read_text())
            if existing.get("settings") != header["settings"] or existing.get("dataset", {}).get("labels") != \
                    header["dataset"]["labels"] or existing.get("dataset", {}).get("channel_names") != \
                    header["dataset"]["channel_names"]:
                raise DatasetError(f"this cache was prepared with other settings or another dataset "
                                   f"({existing.get('settings')}); use another folder, or --force to rebuild it",
                                   source=str(cache))


def prepare_dataset(dataset_dir: str | os.PathLike, cache_dir: str | os.PathLike,
                    settings: PrepareSettings | None = None, workers: int = 1, force: bool = False,
                    splits_file: str | os.PathLike | None = None, progress: bool = True) -> PrepareReport:
    """Preprocess every case of a task folder into ``cache_dir`` (see the module docstring).
    Finished cases are skipped unless ``force``; ``splits_final.json`` is written beside them
    (nnU-Net's folds, or ``splits_file`` checked and copied)."""
    import time

    settings = settings or PrepareSettings()
    dataset = read_dataset(dataset_dir)
    if not dataset.cases:
        raise DatasetError("dataset.json lists no training cases", source=str(dataset.root))
    case_ids = [c.case_id for c in dataset.cases]
    if splits_file:
        splits = read_splits(splits_file, case_ids)
    else:  # fewer than 5 cases: no cross-validation split to write (training will ask for one)
        splits = kfold_splits(case_ids) if len(case_ids) >= 5 else None
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    header = _cache_header(dataset, settings)
    if force:
        for path in cache.glob("*"):
            if path.is_file() and (path.suffix in (".npy", ".json")):
                path.unlink()
    else:
        _check_existing_cache(cache, header)
    # Recorded before any case so that a half-finished cache still refuses other settings.
    atomic_write_text(cache / "settings.json", json.dumps(header, indent=2) + "\n")
    todo = [c for c in dataset.cases if force or not (cache / f"{c.case_id}.json").exists()]
    skipped = sorted(set(case_ids) - {c.case_id for c in todo})
    input_bytes = sum(p.stat().st_size for c in todo for p in c.images if p.exists())
    start = time.perf_counter()
    jobs = [(dataset, case, cache, settings, index) for index, case in enumerate(todo)]
    errors, done = [], []
    with _progress(progress, len(jobs)) as advance:
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = pool.map(_prepare_one, jobs)
                for result in results:
                    _collect(result, done, errors)
                    advance()
        else:
            for job in jobs:
                _collect(_prepare_one(job), done, errors)
                advance()
    if errors:  # finished cases stay in the cache; a rerun after the fix skips them
        raise DatasetError(problems=[Problem("", error) for error in errors], source=str(dataset.root))
    records = [json.loads((cache / f"{cid}.json").read_text()) for cid in sorted(case_ids)]
    if splits is not None and (splits_file or force or not (cache / "splits_final.json").exists()):
        write_splits(cache / "splits_final.json", splits)
    atomic_write_text(cache / "cache.json", json.dumps({**header, "cases": sorted(case_ids),
                                                        "records": records}, indent=1) + "\n")
    return PrepareReport(cache, sorted(done), skipped, time.perf_counter() - start, input_bytes)


def _collect(result, done: list[str], errors: list[str]) -> None:
    case_id, record, error = result
    if error:
        errors.append(error)
    else:
        done.append(case_id)


class _progress:
    """A rich progress bar over cases (or nothing)."""

    def __init__(self, show: bool, total: int):
        self.show, self.total = show, total

    def __enter__(self):
        if not self.show or not self.total:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from rich.console import Console

        console = Console(stderr=True)
        if not console.is_terminal:
            return lambda: None
        self.bar = Progress(TextColumn("preparing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            transient=True, console=console)
        self.bar.start()
        task = self.bar.add_task("cases", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if hasattr(self, "bar"):
            self.bar.stop()
        return False
