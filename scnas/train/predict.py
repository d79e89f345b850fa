"""Segment NIfTI images with a model file (.safetensors) or an ONNX file from ``export-onnx``.

Per case: preprocessing from the model's metadata (crop to the nonzero region, resample to
the target spacing, z-normalise), sliding-window inference in that space, argmax, labels
mapped back onto the original grid and crop box, NIfTI written with the input's affine and
header and named like the input case (so prediction and ground-truth folders pair up).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scnas.build.model_file import ModelFileError
from scnas.data.dataset import Case, Dataset, DatasetError, load_case
from scnas.data.preprocess import PrepareSettings, label_to_original, preprocess_case
from scnas.errors import OutputError
from scnas.fileio import ensure_writable
from scnas.train.inference import PredictFn, sliding_window

CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$")


@dataclass
class Predictor:
    """A model ready to predict: its preprocessing, patch, classes and a batch function."""

    predict: PredictFn
    preprocessing: dict[str, Any]
    patch: tuple[int, int, int]
    num_classes: int
    in_channels: int
    backend: str


def load_predictor(model_path: str | os.PathLike, backend: str = "torch", device: str = "cpu",
                   amp: str = "auto") -> Predictor:
    """Open a .safetensors (torch) or .onnx (onnxruntime) model for prediction. ``amp`` (torch
    backend): fp16 or bf16 autocast, off for exact float32; auto: fp16 on CUDA, off on CPU."""
    from scnas.export import read_any_model_info

    info = read_any_model_info(model_path)
    if not info.preprocessing or "target_spacing" not in info.preprocessing or "patch_size" not in info.preprocessing:
        raise ModelFileError("has no preprocessing settings (target_spacing, patch_size) in its metadata; models "
                             "written by 'scnas train' have them", source=str(model_path))
    patch = tuple(int(p) for p in info.preprocessing["patch_size"])
    onnx_file = str(model_path).lower().endswith(".onnx")
    if backend == "onnxruntime":
        path = model_path
        if not onnx_file:
            raise ModelFileError("--backend onnxruntime needs an .onnx file (make one with 'scnas export-onnx')",
                                 source=str(model_path))
        import onnxruntime as ort

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        session = ort.InferenceSession(str(path), providers=providers)
        name = session.get_inputs()[0].name

        def run(batch: np.ndarray) -> np.ndarray:
            return session.run(None, {name: batch.astype(np.float32)})[0].astype(np.float32)
    elif backend == "torch":
        if onnx_file:
            raise ModelFileError("--backend torch needs the .safetensors model file (or use --backend onnxruntime)",
                                 source=str(model_path))
        import torch

        from scnas.build import load_model

        from scnas.steps import Precision

        if amp not in ("auto", "off", "fp16", "bf16"):
            raise ModelFileError(f"--amp must be auto, off, fp16 or bf16, not {amp!r}")
        model = load_model(model_path, device)
        precision = Precision(amp, torch.device(device))

        def run(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode(), precision.autocast():
                return model(torch.from_numpy(batch).to(device)).float().cpu().numpy()
    else:
        raise ModelFileError(f"unknown backend {backend!r}: torch or onnxruntime")
    return Predictor(run, info.preprocessing, patch, info.config.num_classes, info.config.in_channels, backend)


def find_cases(path: str | os.PathLike) -> list[Case]:
    """Cases in an input: one NIfTI file (3D or 4D), or a folder of them, where files named
    CASE_0000.nii.gz, CASE_0001.nii.gz, ... are the channels of one case."""
    path = Path(path)
    if path.is_file():
        return [Case(_case_name(path.name), [path], None)]
    if not path.is_dir():
        raise DatasetError("no such file or folder", source=str(path))
    grouped: dict[str, dict[int, Path]] = {}
    singles = []
    for file in sorted(path.iterdir()):
        if file.name.startswith("._") or not (file.name.endswith(".nii.gz") or file.name.endswith(".nii")):
            continue
        match = CHANNEL_FILE.match(file.name)
        if match:
            grouped.setdefault(match["case"], {})[int(match["channel"])] = file
        else:
            singles.append(Case(_case_name(file.name), [file], None))
    cases = singles + [Case(case, [files[c] for c in sorted(files)], None) for case, files in sorted(grouped.items())]
    if not cases:
        raise DatasetError("holds no NIfTI images", source=str(path))
    return cases


def _case_name(filename: str) -> str:
    for ending in (".nii.gz", ".nii"):
        if filename.endswith(ending):
            return filename[: -len(ending)]
    return filename


def predict_case(predictor: Predictor, case: Case, overlap: float = 0.5, tta: bool = False, batch_size: int = 2
                 ) -> tuple[np.ndarray, Any]:
    """(label map on the original grid, the NIfTI image of the first channel file)."""
    import nibabel as nib

    preprocessing = predictor.preprocessing
    channels = preprocessing.get("channel_names") or [f"channel {i}" for i in range(predictor.in_channels)]
    dataset = Dataset(case.images[0].parent, "input", "input", list(channels), dict(preprocessing.get("labels", {})))
    loaded = load_case(dataset, case, with_label=False)
    settings = PrepareSettings(target_spacing=tuple(preprocessing["target_spacing"]))
    prepared = preprocess_case(loaded, settings)
    logits = sliding_window(prepared["image"], predictor.predict, predictor.patch, predictor.num_classes, overlap,
                            batch_size, mirror=tta)
    label = logits.argmax(0).astype(np.int16)
    return label_to_original(label, prepared["record"]), nib.load(str(case.images[0]))


def write_label(label: np.ndarray, reference, path: Path) -> None:
    """Save a label map with the reference image's affine and header, atomically."""
    import nibabel as nib

    header = reference.header.copy()
    header.set_data_dtype(np.uint8 if label.max() < 256 else np.int16)
    image = nib.Nifti1Image(label.astype(header.get_data_dtype()), reference.affine, header)
    if reference.ndim == 4:
        image.header.set_data_shape(label.shape)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".nii.gz", dir=path.parent)
    os.close(fd)
    try:
        nib.save(image, temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def predict_folder(model_path: str | os.PathLike, inputs: str | os.PathLike, output: str | os.PathLike,
                   backend: str = "torch", device: str = "cpu", overlap: float = 0.5, tta: bool = False,
                   batch_size: int = 2, progress: bool = True, only: list[str] | None = None,
                   amp: str = "auto") -> list[Path]:
    """Predict every case of ``inputs`` (or those in ``only``) into the folder ``output``."""
    out = Path(output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder: {exc.strerror or exc}", source=str(out)) from None
    ensure_writable(out / "probe.nii.gz")
    predictor = load_predictor(model_path, backend, device, amp)
    cases = find_cases(inputs)
    if only is not None:
        missing = sorted(set(only) - {case.case_id for case in cases})
        if missing:
            raise DatasetError(f"no image for case(s) {', '.join(missing[:5])}", source=str(inputs))
        cases = [case for case in cases if case.case_id in set(only)]
    written = []
    from scnas.runtime import StepBar

    bar = StepBar(progress, len(cases))
    bar.start("predicting")
    try:
        for case in cases:
            label, reference = predict_case(predictor, case, overlap, tta, batch_size)
            target = out / f"{case.case_id}.nii.gz"
            write_label(label, reference, target)
            written.append(target)
            bar.advance(case.case_id)
    finally:
        bar.stop()
    return written
