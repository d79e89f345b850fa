"""Preprocessing into a cache that search and training read without touching NIfTI again.

Per case: crop to the nonzero region of all channels; resample to the target spacing
(images: cubic spline, ``scipy.ndimage.zoom(order=3)``; labels: nnU-Net's per-label linear
interpolation of each label's mask, threshold 0.5; the nonzero mask: linear, threshold 0.5);
z-normalise each channel with the mean and standard deviation of its nonzero-mask voxels,
zero outside the mask. Stored (cache format v3) as ``CASE.b2nd`` (C, X, Y, Z, float16 by
default, compressed in chunks: see ``scnas.data.arrays``), ``CASE_seg.b2nd`` (X, Y, Z int16),
``CASE_fg.npy`` (sampled foreground voxels, rows of label, x, y, z; the sample is seeded by
the case ID, so a cache depends on the data and settings alone, whatever interrupted its
preparation) and ``CASE.json`` (original shape, spacing, affine, crop box, ..., and each
file's size and CRC-32), written last: a case is finished when its ``CASE.json`` reads and
its files have the recorded sizes (``scnas data prepare`` also checks their checksums; a
damaged case is prepared again). ``cache.json`` records the settings and is written when
every case is done; a cache made with other settings is refused. Format v1 (``.npy``
float32) and v2 caches (no checksums, foreground seeded by position) are still read as they
are, unchecked.
"""

from __future__ import annotations

import io
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from scnas import __version__
from scnas import defaults as D
from scnas.data.dataset import Case, Dataset, DatasetError, LoadedCase, load_case, read_dataset
from scnas.data.splits import kfold_splits, read_splits, write_splits
from scnas.errors import DamagedFileError, OutputError, Problem
from scnas.fileio import atomic_write_bytes, atomic_write_text, ensure_folder
from scnas.threads import usable_cores

CACHE_FORMAT = "scnas-cache"
CACHE_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
FOREGROUND_SAMPLES = 10_000
"""Foreground voxels remembered per label and case for the patch sampler (as nnU-Net does)."""


class PrepareSettings(BaseModel):
    """What defines a cache; two caches with different settings never mix."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_spacing: tuple[float, float, float] = Field(D.SPACING, description="mm, file axis order")
    image_interpolation: str = "cubic"
    label_interpolation: str = "per-label-linear"
    normalization: str = "zscore-nonzero"
    crop: str = "nonzero"
    image_dtype: Literal[D.IMAGE_DTYPE_CHOICES] = Field(
        D.IMAGE_DTYPE, description="how images are stored: float16 (half the bytes; z-scores keep ~3 significant "
                               "digits) or float32 (lossless)")


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


def case_seed(case_id: str) -> int:
    """The seed of a case's foreground sample: a stable hash of its ID (never Python's salted
    ``hash``), so that which cases were prepared before, and in what order, changes nothing."""
    import hashlib

    return int.from_bytes(hashlib.sha256(case_id.encode("utf-8")).digest()[:8], "little")


def preprocess_case(case: LoadedCase, settings: PrepareSettings) -> dict[str, Any]:
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
    rng = np.random.default_rng(case_seed(case.case_id))
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


PREPARING = ".preparing"
"""Marker ``.CASE.preparing`` that a worker holds while it prepares CASE (names the case if the
worker dies; removed when it finishes, and by the next preparation)."""


def _prepare_one(args: tuple[Dataset, Case, Path, PrepareSettings]) -> tuple[str, dict | None, str | None, bool]:
    """Prepare one case into the cache: (case id, record, error or None, whether the error
    stops the whole preparation, e.g. a full disk)."""
    from scnas.data.arrays import SUFFIX, write_array
    from scnas.records import checksum

    dataset, case, cache, settings = args
    marker = cache / f".{case.case_id}{PREPARING}"
    marker.write_text(f"{os.getpid()}\n")
    try:
        try:
            result = preprocess_case(load_case(dataset, case), settings)
        except DatasetError as exc:
            return case.case_id, None, str(exc), False
        except MemoryError:
            return case.case_id, None, f"case {case.case_id}: does not fit in memory (its header's shape: see " \
                                       "'scnas data check')", False
        try:
            files = result["record"]["files"] = {}
            files[f"{case.case_id}{SUFFIX}"] = write_array(cache / f"{case.case_id}{SUFFIX}",
                                                           result["image"].astype(settings.image_dtype))
            if result["label"] is not None:
                files[f"{case.case_id}_seg{SUFFIX}"] = write_array(cache / f"{case.case_id}_seg{SUFFIX}", result["label"])
            foreground = _npy_bytes(result["foreground"])
            atomic_write_bytes(cache / f"{case.case_id}_fg.npy", foreground)
            files[f"{case.case_id}_fg.npy"] = {"bytes": len(foreground), "checksum": checksum(foreground)}
            atomic_write_text(cache / f"{case.case_id}.json", json.dumps(result["record"], indent=1) + "\n")
        except (OSError, OutputError, RuntimeError) as exc:   # blosc2 reports a failed compression as RuntimeError
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return case.case_id, None, f"case {case.case_id}: cannot write to the cache: {reason}", True
        return case.case_id, result["record"], None, False
    finally:
        marker.unlink(missing_ok=True)


@dataclass
class PrepareReport:
    cache: Path
    prepared: list[str]
    skipped: list[str]
    _: KW_ONLY
    seconds: float
    input_bytes: int
    damaged: list[str] = field(default_factory=list)   # found damaged, prepared again (lines naming file and fault)


class _FileEntry(BaseModel):
    bytes: int = Field(ge=0)
    checksum: str


class CaseRecord(BaseModel):
    """The fields of ``CASE.json`` that readers rely on (the rest is kept as it is)."""

    model_config = ConfigDict(extra="allow")
    case_id: str
    shape: list[int] = Field(min_length=3, max_length=3)
    files: dict[str, _FileEntry] | None = None   # format v3 on


class CacheHeader(BaseModel):
    """The fields of ``settings.json`` and ``cache.json`` that readers rely on."""

    model_config = ConfigDict(extra="allow")
    format: str
    version: int
    settings: dict[str, Any]
    dataset: dict[str, Any]


class FinishedCache(CacheHeader):
    cases: list[str]
    records: list[CaseRecord]


def prepare_again(cache: Path, force: bool = False) -> str:
    """The command that repairs ``cache``, with its task folder and settings where its
    ``settings.json`` still tells them (else placeholders)."""
    try:
        header = json.loads((cache / "settings.json").read_text())
        source, settings = header["dataset"]["source"], header["settings"]
        options = (f" --spacing {' '.join(f'{v:g}' for v in settings['target_spacing'])} "
                   f"--dtype {settings['image_dtype']}")
    except (OSError, ValueError, KeyError, TypeError):
        source, options = "TASK", " --spacing X Y Z"
    return f"scnas data prepare {source} -o {cache}{options}{' --force' if force else ''}"


NOT_PREPARED = "not prepared"


def case_problem(cache: Path, case_id: str, checksums: bool) -> str | None:
    """Why case ``case_id`` of a v3 ``cache`` is not finished (None: it is): not prepared
    (:data:`NOT_PREPARED`: no ``CASE.json``), a damaged ``CASE.json``, a file missing or of
    another size than recorded, or (``checksums``: every byte read) another checksum."""
    from scnas.records import damaged, read_json, verify_file

    record_path = cache / f"{case_id}.json"
    if not record_path.exists():
        return NOT_PREPARED
    try:
        record = read_json(record_path, "", CaseRecord)
        if not record["files"]:
            raise damaged(record_path, "is damaged: lists no files", "")
        for name, entry in record["files"].items():
            path = cache / name
            if checksums:
                verify_file(path, entry["checksum"], "")
            elif not path.is_file():
                raise damaged(path, "is missing", "")
            elif path.stat().st_size != entry["bytes"]:
                raise damaged(path, f"is damaged: {path.stat().st_size} bytes, not the {entry['bytes']} recorded", "")
    except DamagedFileError as exc:
        return str(exc)
    return None


def _cache_header(dataset: Dataset, settings: PrepareSettings) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "scnas_version": __version__,
            "settings": settings.model_dump(mode="json"),
            "dataset": {"name": dataset.name, "flavour": dataset.flavour, "source": str(dataset.root.resolve()),
                        "channel_names": dataset.channel_names, "labels": dataset.labels}}


def _check_existing_cache(cache: Path, header: dict[str, Any]) -> None:
    marker = cache / "cache.json"
    settings_file = cache / "settings.json"
    from scnas.records import read_json

    for path in (marker, settings_file):
        if path.exists():
            existing = read_json(path, f"this preparation cannot repair it: {prepare_again(cache, force=True)}",
                                 CacheHeader)
            if existing.get("version") != CACHE_VERSION:
                raise DatasetError(f"holds a cache in format v{existing.get('version')} (written by scnas "
                                   f"{existing.get('scnas_version', '?')}); this scnas writes v{CACHE_VERSION}: use "
                                   "another folder, or --force to rebuild it here (an existing v1 cache is still "
                                   "read as it is: pass the cache folder itself as --data)", source=str(cache))
            if existing.get("settings") != header["settings"] or existing.get("dataset", {}).get("labels") != \
                    header["dataset"]["labels"] or existing.get("dataset", {}).get("channel_names") != \
                    header["dataset"]["channel_names"]:
                raise DatasetError(f"this cache was prepared with other settings or another dataset "
                                   f"({existing.get('settings')}); use another folder, or --force to rebuild it",
                                   source=str(cache))


def prepare_dataset(dataset_dir: str | os.PathLike, cache_dir: str | os.PathLike,
                    settings: PrepareSettings | None = None, *, workers: int | str = D.WORKERS, force: bool = False,
                    splits_file: str | os.PathLike | None = None, progress: bool = True,
                    checksums: bool = True) -> PrepareReport:
    """Preprocess every case of a task folder into ``cache_dir`` (see the module docstring), in
    ``workers`` processes (``auto``: one per usable core). Finished cases are skipped unless
    ``force``; a case whose files are damaged is prepared again (found by their sizes, and
    with ``checksums`` by reading every byte: ~1.7 GB/s); ``splits_final.json`` is written
    beside them (nnU-Net's folds, or ``splits_file`` checked and copied). A bad case does not
    stop the others; a full disk stops the cases not yet started; either way the finished
    cases are kept and the error names the case.

    Args:
        dataset_dir: the task folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``).
        cache_dir: the cache folder to write (or to complete).
        settings: target spacing and storage (default: :class:`PrepareSettings`'s).
        workers: processes preparing cases in parallel, or ``auto``.
        force: prepare every case again, and replace a cache made with other settings.
        splits_file: a ``splits_final.json`` to use instead of nnU-Net's 5 folds.
        progress: show a progress bar.
        checksums: check finished cases' files by their checksums (not only their sizes).
    """
    import time

    from scnas.records import read_json

    settings = settings or PrepareSettings()
    dataset = read_dataset(dataset_dir)
    if not dataset.cases:
        raise DatasetError("dataset.json lists no training cases", source=str(dataset.root))
    case_ids = [c.case_id for c in dataset.cases]
    if splits_file:
        splits = read_splits(splits_file, case_ids)
    else:  # fewer than 5 cases: no cross-validation split to write (training will ask for one)
        splits = kfold_splits(case_ids) if len(case_ids) >= 5 else None
    cache = ensure_folder(cache_dir, DatasetError, "a cache folder")
    with _exclusive(cache) as lock:   # a second preparation of the same cache waits, then finds it done
        header = _cache_header(dataset, settings)
        if force:
            for path in cache.glob("*"):
                if path.is_file() and (path.suffix in (".npy", ".json", ".b2nd")):
                    path.unlink()
        else:
            _check_existing_cache(cache, header)
        # Recorded before any case so that a half-finished cache still refuses other settings.
        atomic_write_text(cache / "settings.json", json.dumps(header, indent=2) + "\n")
        problems = {c.case_id: NOT_PREPARED if force else case_problem(cache, c.case_id, checksums)
                    for c in dataset.cases}
        todo = [c for c in dataset.cases if problems[c.case_id] is not None]
        skipped = sorted(set(case_ids) - {c.case_id for c in todo})
        damaged = [problem for problem in problems.values() if problem not in (None, NOT_PREPARED)]
        input_bytes = sum(p.stat().st_size for c in todo for p in c.images if p.exists())
        start = time.perf_counter()
        jobs = [(dataset, case, cache, settings) for case in todo]
        errors, done = [], []
        with _progress(progress, len(jobs)) as advance:
            _run_jobs(jobs, resolve_workers(workers), cache, done, errors, advance, lock.fileno())
        if errors:  # finished cases stay in the cache; a rerun after the fix skips them
            raise DatasetError(problems=[Problem("", error) for error in errors], source=str(dataset.root))
        records = [read_json(cache / f"{cid}.json", prepare_again(cache), CaseRecord) for cid in sorted(case_ids)]
        if splits is not None and (splits_file or force or not (cache / "splits_final.json").exists()):
            write_splits(cache / "splits_final.json", splits)
        atomic_write_text(cache / "cache.json", json.dumps({**header, "cases": sorted(case_ids),
                                                            "records": records}, indent=1) + "\n")
        return PrepareReport(cache, sorted(done), skipped, seconds=time.perf_counter() - start,
                             input_bytes=input_bytes, damaged=damaged)


class _exclusive:
    """Hold an exclusive lock on ``CACHE/.lock`` (POSIX ``flock``; several folds or commands
    preparing one cache at once take turns instead of writing the same files). The holder
    writes its process ID into the file; a process that waits more than ``notice_after``
    seconds says for what and for whom, once."""

    def __init__(self, cache: Path, notice_after: float = 3.0):
        self.path, self.notice_after = cache / ".lock", notice_after

    def __enter__(self):
        try:
            import fcntl
        except ImportError:   # not POSIX: no lock
            self.handle = None
            return self
        import time

        try:
            self.handle = open(self.path, "a+")
        except OSError as exc:
            raise DatasetError(f"cannot write in the cache folder: {exc.strerror or exc}",
                               source=str(self.path.parent)) from None
        waited_since = time.monotonic()
        while True:
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if waited_since is not None and time.monotonic() - waited_since >= self.notice_after:
                    sys.stderr.write(f"{self.waiting_for()}\n")
                    sys.stderr.flush()
                    waited_since = None
                time.sleep(0.2)
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"{os.getpid()}\n")
        self.handle.flush()
        return self

    def waiting_for(self) -> str:
        """What a process waiting for the lock is waiting for, and for whom."""
        try:
            holder = int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            holder = None
        cache = self.path.parent
        if holder is not None and _alive(holder):
            return (f"waiting for process {holder}, which is preparing the cache {cache} (a 'scnas data prepare', "
                    "or a search, training or study preparing its task); this goes on when it ends")
        who = f"process {holder}, which is gone" if holder is not None else "a process that did not say who it is"
        return (f"waiting for the lock {self.path}, held by what {who} left behind (processes it started?): "
                f"list them with 'fuser -v {self.path}' and end them")

    def fileno(self) -> int | None:
        return None if self.handle is None else self.handle.fileno()

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.close()   # closing releases the lock
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's: alive
        return True
    return True


def _die_with_parent(parent: int, lock_fd: int | None) -> None:
    """Pool worker initializer: end this worker when the process that started it dies (a
    SIGKILL gives that process no chance to stop its pool, whose workers would wait for work
    forever), and let go of the inherited cache lock, which is the parent's to hold. Linux:
    ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; elsewhere a thread that watches the parent."""
    import signal
    import threading
    import time

    if lock_fd is not None:
        try:
            os.close(lock_fd)   # the lock stays held by the parent's descriptor
        except OSError:
            pass
    try:
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL)) != 0:   # 1: PR_SET_PDEATHSIG
            raise OSError
    except (OSError, AttributeError):
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent and not _alive(parent):   # died before the signal was armed (under
        os._exit(1)                                      # forkserver, the parent is the server: fine)


def resolve_workers(workers: int | str) -> int:
    """A worker count: a positive number, or ``auto`` for the cores this process may use."""
    if workers == "auto":
        return usable_cores()
    try:
        count = int(workers)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise DatasetError(f"workers must be a positive number or 'auto', not {workers!r}")
    return count


def remove_stale_temporaries(cache: Path) -> list[Path]:
    """Remove what a killed preparation left in ``cache``: its workers' ``.CASE.preparing``
    markers, half-written arrays (``.NAME.*.partial.b2nd``) and atomic writes never renamed
    (``.NAME.*.tmp``, e.g. ``.cache.json.*.tmp``). Called with the cache's lock held: every
    writer of a cache holds it, so whatever temporaries are there belong to dead writers."""
    from scnas.data.arrays import remove_partial_files

    removed = remove_partial_files(cache)
    for pattern in (f".*{PREPARING}", ".*.tmp"):
        for stale in cache.glob(pattern):
            if stale.is_file():
                stale.unlink(missing_ok=True)
                removed.append(stale)
    return removed


def _run_jobs(jobs: list, workers: int, cache: Path, done: list[str], errors: list[str], advance,
              lock_fd: int | None = None) -> None:
    """Prepare ``jobs`` (in ``workers`` processes), collecting finished cases and errors. A
    fatal error (full disk) stops the cases not yet started; a dead worker is named by case."""
    from concurrent.futures import as_completed
    from concurrent.futures.process import BrokenProcessPool

    remove_stale_temporaries(cache)
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            if _collect(_prepare_one(job), done, errors):
                errors.append(f"{len(jobs) - len(done) - len(errors)} case(s) not started after that failure")
                return
            advance()
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), initializer=_die_with_parent,
                             initargs=(os.getpid(), lock_fd)) as pool:
        futures = [pool.submit(_prepare_one, job) for job in jobs]
        try:
            for future in as_completed(futures):
                if _collect(future.result(), done, errors):
                    stopped = sum(f.cancel() for f in futures)
                    errors.append(f"{stopped} case(s) not started after that failure")
                    break
                advance()
        except BrokenProcessPool:
            dying = sorted(p.name[1:-len(PREPARING)] for p in cache.glob(f".*{PREPARING}"))
            for marker in cache.glob(f".*{PREPARING}"):
                marker.unlink(missing_ok=True)
            errors.append(f"a preparation worker died (killed; out of memory?) while preparing "
                          f"{'one of ' if len(dying) > 1 else ''}{', '.join(dying) or 'an unknown case'}; "
                          f"the {len(done)} case(s) finished meanwhile are kept: prepare again to go on "
                          "(with fewer --workers if memory ran out)")


def _collect(result, done: list[str], errors: list[str]) -> bool:
    """Record one case's result; True when it must stop the preparation."""
    case_id, record, error, fatal = result
    if error:
        errors.append(error)
    else:
        done.append(case_id)
    return fatal


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
