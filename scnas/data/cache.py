"""Reading a prepared cache: case arrays (compressed, read a patch at a time) and their records;
where a task folder's shared cache lives."""

from __future__ import annotations

import json
import os
from dataclasses import KW_ONLY, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from scnas import defaults as D
from scnas.data.dataset import DatasetError
from scnas.errors import ScnasError
from scnas.data.preprocess import CACHE_FORMAT, CACHE_VERSION, READABLE_VERSIONS, FinishedCache, prepare_again
from scnas.records import damaged, open_b2nd, read_json, read_npy


CACHE_ENV = "SCNAS_CACHE"
"""Environment variable naming the folder where task folders' caches are prepared."""


def cache_root() -> Path:
    """Where shared caches live: ``$SCNAS_CACHE``, else ``$XDG_CACHE_HOME/scnas``, else
    ``~/.cache/scnas``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "scnas"


def shared_cache_folder(task: str | os.PathLike, settings) -> Path:
    """The one cache of ``task`` prepared with ``settings`` (a ``PrepareSettings``): every fold,
    search, training and study that names the task folder uses it, so it is prepared once.
    ``cache_root()/NAME-KEY``, where KEY hashes the task folder's absolute path, the settings
    and the cache format version."""
    import hashlib

    task = Path(task).resolve()
    identity = {"source": str(task), "settings": settings.model_dump(mode="json"), "version": CACHE_VERSION}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / f"{task.name}-{key}"


DEFAULT_SPACING = D.SPACING
"""mm: the paper's target spacing, used for a task folder when no spacing is given."""


def open_or_prepare(data: str | os.PathLike, spacing: tuple[float, float, float] | None,
                    prepared: str | os.PathLike | None = None, *, prepare: bool = True, workers: int | str = D.WORKERS,
                    say=lambda line: None) -> "Cache":
    """``data`` as a cache: a prepared cache folder itself (at its own spacing; a ``spacing``
    given that differs is refused), or a task folder prepared at ``spacing`` (default
    :data:`DEFAULT_SPACING`; by this process when ``prepare``, with ``workers`` processes) into
    ``prepared``, by default its shared cache (:func:`shared_cache_folder`); finished cases are
    never prepared twice.

    Args:
        data: a prepared cache folder or a task folder.
        spacing: the target spacing for a task folder (None: :data:`DEFAULT_SPACING`).
        prepared: where to prepare a task folder (default: its shared cache folder).
        prepare: prepare the task in this process (False: only open a prepared cache).
        workers: processes preparing cases, or ``auto``.
        say: prints notices (the cache being prepared).
    """
    from scnas.data.preprocess import PrepareSettings, prepare_dataset

    data = Path(data)
    if (data / "cache.json").exists():
        cache = Cache(data)
        cache.check_spacing(spacing)
        return cache
    if (data / "dataset.json").exists():
        settings = PrepareSettings(target_spacing=spacing or DEFAULT_SPACING)
        target = Path(prepared) if prepared is not None else shared_cache_folder(data, settings)
        if prepare:
            if not (target / "cache.json").exists():
                say(f"preparing {data} into {target} (set {CACHE_ENV} to keep caches elsewhere)")
            prepare_dataset(data, target, settings, workers=workers, progress=False, checksums=False)
        return Cache(target)
    raise DatasetError("is neither a prepared cache (cache.json) nor a task folder (dataset.json)", source=str(data))


@dataclass
class CachedCase:
    case_id: str
    image: Any                 # (C, X, Y, Z): a blosc2 NDArray (v2) or a float32 memmap (v1); slices are numpy
    label: Any | None          # (X, Y, Z) int16, likewise
    _: KW_ONLY
    foreground: np.ndarray     # (N, 4) rows of label, x, y, z
    record: dict[str, Any]


class Cache:
    """A prepared cache folder (written by ``scnas data prepare``)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        marker = self.folder / "cache.json"
        if not marker.exists():
            hint = " (preparation did not finish: run 'scnas data prepare' again)" if (
                self.folder / "settings.json").exists() else " (prepare one with 'scnas data prepare')"
            raise DatasetError(f"is not a finished scnas cache{hint}", source=str(self.folder))
        self.header = read_json(marker, f"prepare it again: {prepare_again(self.folder, force=True)}", FinishedCache)
        if self.header.get("format") != CACHE_FORMAT or self.header.get("version") not in READABLE_VERSIONS:
            raise DatasetError(f"cache format {self.header.get('format')} v{self.header.get('version')} is not "
                               f"{CACHE_FORMAT} v{', v'.join(map(str, READABLE_VERSIONS))}; prepare it again with "
                               "this scnas ('scnas data prepare TASK FOLDER')", source=str(marker))
        self.version = int(self.header["version"])
        self.case_ids: list[str] = list(self.header["cases"])
        self.records = {r["case_id"]: r for r in self.header["records"]}

    @property
    def channel_names(self) -> list[str]:
        return list(self.header["dataset"]["channel_names"])

    @property
    def labels(self) -> dict[str, int]:
        return dict(self.header["dataset"]["labels"])

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.header["settings"])

    @property
    def spacing(self) -> tuple[float, ...]:
        """The target spacing (mm) the cache was prepared at."""
        return tuple(float(v) for v in self.header["settings"]["target_spacing"])

    def check_spacing(self, spacing, error: type[ScnasError] = DatasetError) -> None:
        """Refuse a ``spacing`` asked for (None: none) that is not the one the cache was prepared at."""
        if spacing is not None and self.spacing != tuple(float(v) for v in spacing):
            raise error(f"was prepared at spacing {list(self.spacing)}, not the --spacing {list(spacing)} asked for; "
                        "leave --spacing out to use the cache's, or prepare the task again", source=str(self.folder))

    @cached_property
    def splits(self) -> list[dict[str, list[str]]]:
        from scnas.data.splits import read_splits

        path = self.folder / "splits_final.json"
        if not path.exists():
            raise DatasetError("has no splits_final.json (fewer than 5 cases?); give a splits file", source=str(self.folder))
        return read_splits(path, self.case_ids)

    def repair(self, case_id: str) -> str:
        """How to get a good copy of a damaged case: prepare the cache again (v3: which redoes
        the damaged cases alone; older formats: every case, --force)."""
        old = self.version < CACHE_VERSION
        return (f"case {case_id} cannot be used; {'rebuild the cache' if old else 'prepare it again'} (every case is "
                f"checked and {'all are' if old else 'the damaged ones are'} prepared again): "
                f"{prepare_again(self.folder, force=old)}")

    def load(self, case_id: str) -> CachedCase:
        """A case's arrays and record. From format v3 on, every file is checked against the size
        and CRC-32 its record gives before it is used (each call reads the files once: callers
        keep the case); any damage is a ``DamagedFileError`` naming the file and the repair."""
        if case_id not in self.records:
            raise DatasetError(f"no case {case_id!r} in this cache", source=str(self.folder))
        record, fix = self.records[case_id], self.repair(case_id)
        shape, channels = tuple(record["shape"]), len(self.channel_names)
        files = record.get("files")
        if self.version >= 3 and not files:
            raise damaged(self.folder / "cache.json", f"is damaged: case {case_id} lists no files", fix)

        def checksum(name: str) -> str | None:
            return None if files is None else (files.get(name) or {}).get("checksum", "absent")

        if self.version == 1:   # float32 .npy files, memory-mapped
            image = self._npy(f"{case_id}.npy", fix)
            seg_path = self.folder / f"{case_id}_seg.npy"
            label = self._npy(seg_path.name, fix) if seg_path.exists() else None
        else:
            from scnas.data.arrays import SUFFIX

            image = open_b2nd(self.folder / f"{case_id}{SUFFIX}", fix, checksum(f"{case_id}{SUFFIX}"),
                              shape=(channels, *shape))
            seg = f"{case_id}_seg{SUFFIX}"
            labelled = seg in files if files is not None else record.get("label_voxels") is not None
            label = open_b2nd(self.folder / seg, fix, checksum(seg), shape=shape, dtype=np.int16) if labelled else None
        foreground = read_npy(self.folder / f"{case_id}_fg.npy", fix, checksum(f"{case_id}_fg.npy"), dtype=np.int32,
                              columns=4)
        return CachedCase(case_id, image, label, foreground=foreground, record=record)

    def _npy(self, name: str, fix: str):
        """A v1 array, memory-mapped (unchecked: v1 has no checksums)."""
        try:
            return np.load(self.folder / name, mmap_mode="r", allow_pickle=False)
        except Exception as exc:   # missing, truncated or garbled
            raise damaged(self.folder / name, f"is damaged or missing ({type(exc).__name__}: {exc})", fix) from None
