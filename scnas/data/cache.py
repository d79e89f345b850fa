"""Reading a prepared cache: memory-mapped case arrays and their records."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from scnas.data.dataset import DatasetError
from scnas.data.preprocess import CACHE_FORMAT, CACHE_VERSION


def open_or_prepare(data: str | os.PathLike, prepared: str | os.PathLike, spacing: tuple[float, float, float],
                    prepare: bool = True, wait=lambda: None, workers: int = 1) -> "Cache":
    """``data`` as a cache: a prepared cache folder itself, or a task folder prepared into
    ``prepared`` (by this process when ``prepare``, with ``workers`` processes; ``wait`` lets
    other processes wait for it)."""
    from scnas.data.preprocess import PrepareSettings, prepare_dataset

    data = Path(data)
    if (data / "cache.json").exists():
        return Cache(data)
    if (data / "dataset.json").exists():
        if prepare:
            prepare_dataset(data, prepared, PrepareSettings(target_spacing=spacing), workers=workers, progress=False)
        wait()
        return Cache(prepared)
    raise DatasetError("is neither a prepared cache (cache.json) nor a task folder (dataset.json)", source=str(data))


@dataclass
class CachedCase:
    case_id: str
    image: np.ndarray          # (C, X, Y, Z) float32, memory-mapped
    label: np.ndarray | None   # (X, Y, Z) int16, memory-mapped
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
        self.header = json.loads(marker.read_text())
        if self.header.get("format") != CACHE_FORMAT or self.header.get("version") != CACHE_VERSION:
            raise DatasetError(f"cache format {self.header.get('format')} v{self.header.get('version')} is not "
                               f"{CACHE_FORMAT} v{CACHE_VERSION}; prepare it again", source=str(marker))
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

    @cached_property
    def splits(self) -> list[dict[str, list[str]]]:
        from scnas.data.splits import read_splits

        path = self.folder / "splits_final.json"
        if not path.exists():
            raise DatasetError("has no splits_final.json (fewer than 5 cases?); give a splits file", source=str(self.folder))
        return read_splits(path, self.case_ids)

    def load(self, case_id: str) -> CachedCase:
        if case_id not in self.records:
            raise DatasetError(f"no case {case_id!r} in this cache", source=str(self.folder))
        image = np.load(self.folder / f"{case_id}.npy", mmap_mode="r", allow_pickle=False)
        seg_path = self.folder / f"{case_id}_seg.npy"
        label = np.load(seg_path, mmap_mode="r", allow_pickle=False) if seg_path.exists() else None
        foreground = np.load(self.folder / f"{case_id}_fg.npy", allow_pickle=False)
        return CachedCase(case_id, image, label, foreground, self.records[case_id])
