"""``scnas data check``: read every case and report every problem in one pass."""

from __future__ import annotations

import os

import numpy as np

from scnas.data.dataset import DatasetError, load_case, read_dataset
from scnas.data.preprocess import image_problems


def check_dataset(root: str | os.PathLike) -> tuple[int, list[str]]:
    """(number of cases, one line per problem: "file: case X: what is wrong"). A dataset.json
    that cannot be read raises ``DatasetError`` (nothing else can be checked then)."""
    dataset = read_dataset(root)
    lines: list[str] = []
    if not dataset.cases:
        lines.append(f"{dataset.root / 'dataset.json'}: lists no training cases")
    for case in dataset.cases:
        try:
            loaded = load_case(dataset, case)
        except DatasetError as exc:
            for line in exc.lines():
                lines.append(line if f"case {case.case_id}" in line else f"{line} (case {case.case_id})")
            continue
        except MemoryError:   # a header's size is checked before reading; a real case can still be too large
            lines.append(f"{case.images[0]}: case {case.case_id}: does not fit in this machine's memory")
            continue
        for problem in image_problems(loaded.image):
            lines.append(f"{case.images[0]}: case {case.case_id}: {problem}")
        if loaded.label is not None and not np.any(loaded.label):
            lines.append(f"{case.label}: case {case.case_id}: label has no foreground (allowed, but check it)")
    return len(dataset.cases), lines


__all__ = ["check_dataset"]
