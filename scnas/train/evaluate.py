"""Dice per class per case between a folder of predictions and a folder of ground truth.

Convention (nnU-Net's): a class absent from both the prediction and the ground truth of a
case has an undefined Dice (NaN), which is left out of the means; absent from one of them
only, its Dice is 0.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scnas.data.dataset import DatasetError, is_nifti, strip_nifti_ending
from scnas.fileio import atomic_write_text, check_input_file
from scnas.metrics import dice

def _case_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DatasetError("is not a folder", source=str(folder))
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("._"):
            continue
        if is_nifti(path.name):
            files[strip_nifti_ending(path.name)] = path
    return files


@dataclass
class Evaluation:
    labels: list[int]
    cases: dict[str, dict[int, float]] = field(default_factory=dict)

    def mean(self) -> dict[int, float]:
        return {label: float(np.nanmean([c[label] for c in self.cases.values()]))
                if any(not np.isnan(c[label]) for c in self.cases.values()) else float("nan") for label in self.labels}

    def overall(self) -> float:
        values = [v for v in self.mean().values() if not np.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    def to_dict(self) -> dict:
        return {"convention": "Dice NaN when a class is absent from both prediction and truth; NaN left out of means",
                "labels": self.labels, "cases": {case: {str(k): v for k, v in d.items()} for case, d in self.cases.items()},
                "mean": {str(k): v for k, v in self.mean().items()}, "mean_over_classes": self.overall()}

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["case", *[f"dice_{label}" for label in self.labels]])
        for case, scores in self.cases.items():
            writer.writerow([case, *[f"{scores[label]:.6f}" for label in self.labels]])
        writer.writerow(["mean", *[f"{value:.6f}" for value in self.mean().values()]])
        return buffer.getvalue()


def evaluate_folders(predictions: str | os.PathLike, truth: str | os.PathLike,
                     labels: list[int] | None = None, *, cases: list[str] | None = None) -> Evaluation:
    """Pair NIfTI files by name and compute Dice per foreground class and case (of every
    ground-truth case, or of ``cases`` only).

    Args:
        predictions: the folder of predicted label maps (``CASE.nii.gz``).
        truth: the folder of ground-truth label maps.
        labels: the foreground labels to score (default: every label in the ground truth).
        cases: score only these case IDs.
    """
    import nibabel as nib

    predicted, expected = _case_files(Path(predictions)), _case_files(Path(truth))
    if cases is not None:
        absent = sorted(set(cases) - set(expected))
        if absent:
            raise DatasetError(f"no ground truth for case(s) {', '.join(absent[:5])}", source=str(truth))
        expected = {case: expected[case] for case in cases}
    missing = sorted(set(expected) - set(predicted))
    if missing:
        raise DatasetError(f"no prediction for {len(missing)} ground-truth case(s): {', '.join(missing[:5])}",
                           source=str(predictions))
    if not expected:
        raise DatasetError("holds no NIfTI files", source=str(truth))
    loaded = {}
    for case, path in expected.items():
        check_input_file(predicted[case], DatasetError)
        truth_array = np.asarray(nib.load(str(path)).dataobj).astype(np.int32)
        predicted_array = np.asarray(nib.load(str(predicted[case])).dataobj).astype(np.int32)
        if truth_array.shape != predicted_array.shape:
            raise DatasetError(f"case {case}: prediction shape {predicted_array.shape} differs from ground truth "
                               f"{truth_array.shape}", source=str(predicted[case]))
        loaded[case] = (predicted_array, truth_array)
    if labels is None:
        labels = sorted({int(v) for _, t in loaded.values() for v in np.unique(t)} - {0})
    result = Evaluation(list(labels))
    for case, (p, t) in loaded.items():
        result.cases[case] = {label: dice(p, t, label) for label in labels}
    return result


def write_evaluation(result: Evaluation, path: str | os.PathLike) -> None:
    """Write the evaluation as .csv or .json (by suffix), atomically."""
    text = result.to_csv() if str(path).endswith(".csv") else json.dumps(result.to_dict(), indent=2) + "\n"
    atomic_write_text(path, text)
