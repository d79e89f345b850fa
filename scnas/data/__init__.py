"""Datasets: MSD/nnU-Net task folders, phantoms, preprocessing cache, splits, patches, augmentation.

Everything here is numpy, nibabel and scipy; torch appears only in ``scnas.data.loader``.
"""

from scnas.data.cache import Cache, CachedCase, open_or_prepare
from scnas.data.check import check_dataset
from scnas.data.dataset import Case, Dataset, DatasetError, LoadedCase, load_case, read_dataset
from scnas.data.phantom import write_phantom_dataset
from scnas.data.preprocess import PrepareSettings, prepare_dataset, preprocess_case
from scnas.data.splits import architecture_split, fold_cases, kfold_splits, read_splits, write_splits

__all__ = ["Cache", "CachedCase", "Case", "Dataset", "DatasetError", "LoadedCase", "PrepareSettings",
           "architecture_split", "check_dataset", "fold_cases", "kfold_splits", "load_case", "open_or_prepare", "prepare_dataset",
           "preprocess_case", "read_dataset", "read_splits", "write_phantom_dataset", "write_splits"]
