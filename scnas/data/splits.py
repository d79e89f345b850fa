"""Cross-validation splits: nnU-Net's 5 folds, its ``splits_final.json``, and the paper's 4:1
weight/architecture split of a fold's training cases.

nnU-Net draws its folds with scikit-learn's ``KFold(n_splits=5, shuffle=True,
random_state=12345)`` over the sorted case IDs; :func:`kfold_splits` reproduces that with numpy
alone (scikit-learn shuffles with ``numpy.random.RandomState(12345).shuffle``), so the same
case IDs give the same folds as nnU-Net, and a ``splits_final.json`` from either reads in both.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from scnas.data.dataset import DatasetError
from scnas.fileio import atomic_write_text, read_bytes_bounded

NNUNET_SEED = 12345


def kfold_splits(case_ids: list[str], n_splits: int = 5, seed: int = NNUNET_SEED) -> list[dict[str, list[str]]]:
    """[{"train": [...], "val": [...]}, ...] exactly as nnU-Net v2's ``generate_crossval_split``."""
    ids = sorted(case_ids)
    if len(ids) < n_splits:
        raise DatasetError(f"{n_splits}-fold cross-validation needs at least {n_splits} cases; there are {len(ids)}")
    indices = np.arange(len(ids))
    np.random.RandomState(seed).shuffle(indices)
    sizes = np.full(n_splits, len(ids) // n_splits)
    sizes[: len(ids) % n_splits] += 1
    splits, start = [], 0
    for size in sizes:
        val = np.zeros(len(ids), bool)
        val[indices[start:start + size]] = True
        splits.append({"train": [ids[i] for i in np.flatnonzero(~val)], "val": [ids[i] for i in np.flatnonzero(val)]})
        start += size
    return splits


def write_splits(path: str | os.PathLike, splits: list[dict[str, list[str]]]) -> None:
    atomic_write_text(path, json.dumps(splits, indent=4) + "\n")


def read_splits(path: str | os.PathLike, case_ids: list[str] | None = None) -> list[dict[str, list[str]]]:
    """Read a ``splits_final.json`` (nnU-Net's format); with ``case_ids``, check it names only those."""
    name = str(path)
    try:
        splits: Any = json.loads(read_bytes_bounded(path, 64 << 20, DatasetError).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"not valid JSON: {exc}", source=name) from None
    if not isinstance(splits, list) or not splits:
        raise DatasetError("must be a list of {\"train\": [...], \"val\": [...]} folds", source=name)
    for i, fold in enumerate(splits):
        if not isinstance(fold, dict) or set(fold) != {"train", "val"} or not all(
                isinstance(fold[k], list) and all(isinstance(c, str) for c in fold[k]) for k in ("train", "val")):
            raise DatasetError(f"fold {i} must be {{\"train\": [case ids], \"val\": [case ids]}}", source=name)
        overlap = set(fold["train"]) & set(fold["val"])
        if overlap:
            raise DatasetError(f"fold {i}: cases in both train and val: {sorted(overlap)[:5]}", source=name)
        if case_ids is not None:
            unknown = sorted((set(fold["train"]) | set(fold["val"])) - set(case_ids))
            if unknown:
                raise DatasetError(f"fold {i} names cases this dataset does not have: {unknown[:5]}", source=name)
    return splits


def fold_cases(splits: list[dict[str, list[str]]], fold: int) -> tuple[list[str], list[str]]:
    """(train, val) case IDs of ``fold``."""
    if not 0 <= fold < len(splits):
        raise DatasetError(f"fold {fold} does not exist: there are {len(splits)} folds (0..{len(splits) - 1})")
    return list(splits[fold]["train"]), list(splits[fold]["val"])


def architecture_split(train_ids: list[str], seed: int = 0, architecture_share: float = 0.2) -> tuple[list[str], list[str]]:
    """The paper's 4:1 split of a fold's training cases into a weight set (to train the network
    weights) and an architecture set (to train alpha). Seeded; both lists sorted."""
    ids = sorted(train_ids)
    if len(ids) < 2:
        raise DatasetError(f"the weight/architecture split needs at least 2 training cases; there are {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_arch = min(len(ids) - 1, max(1, round(len(ids) * architecture_share)))
    arch = sorted(ids[i] for i in order[:n_arch])
    return sorted(set(ids) - set(arch)), arch
