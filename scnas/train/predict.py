"""Segment NIfTI images with a model file (.safetensors) or an ONNX file from ``export-onnx``.

Per case: preprocessing from the model's metadata (crop to the nonzero region, resample to
the target spacing, z-normalise), sliding-window inference in that space, argmax, labels
mapped back onto the original grid and crop box, NIfTI written with the input's affine and
header and named like the input case (so prediction and ground-truth folders pair up).
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from scnas import defaults as D
from scnas.build.model_file import ModelFileError
from scnas.engine.compiling import compiled_for_inference
from scnas.data.dataset import Case, Dataset, DatasetError, is_nifti, load_case, strip_nifti_ending
from scnas.data.preprocess import PrepareSettings, label_to_original, preprocess_case
from scnas.errors import OutputError, Problem, ScnasError, check_choice
from scnas.fileio import ensure_folder, give_default_mode
from scnas.train.inference import TensorPredictFn, sliding_window_logits

CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
"""A channel file's name without its NIfTI ending: CASE_XXXX (XXXX the channel)."""


class PredictError(ScnasError):
    """A prediction that cannot run as asked (device, precision, memory, unreadable cases)."""


def _say(message: str) -> None:
    print(message, file=sys.stderr)


DEVICE_SHARE = 0.5
"""Accumulate on the GPU only when image, logit sums, weights and the label map take at most
this share of its free memory (the rest is the network's working set); otherwise in CPU memory."""


def accumulation_bytes(shape: tuple[int, ...], num_classes: int) -> int:
    """Device bytes of :func:`sliding_window_logits` with ``accumulate="device"`` for an image of
    ``shape`` (C, X, Y, Z): the image, K logit sums and the weight sum in float32, and argmax's
    int64 label map."""
    voxels = math.prod(shape[1:])
    return voxels * (4 * (shape[0] + num_classes + 1) + 8)


@dataclass
class Predictor:
    """A model ready to predict: its preprocessing, patch and classes, and ``run``, which maps a
    batch of windows on ``device`` to logits on ``device``."""

    run: TensorPredictFn
    preprocessing: dict[str, Any]
    patch: tuple[int, int, int]
    _: KW_ONLY
    num_classes: int
    in_channels: int
    backend: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: str = "off"
    say: Callable[[str], None] = _say

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Logits of a numpy batch (B, C, *patch), float32 numpy."""
        with torch.inference_mode():
            return self.run(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()

    def logits(self, image: np.ndarray | torch.Tensor, overlap: float = D.OVERLAP,
               batch_size: int = D.PREDICT_BATCH_SIZE, *, mirror: bool = False,
               accumulate: str = "device") -> torch.Tensor:
        """Sliding-window logits (K, X, Y, Z) of a preprocessed image (C, X, Y, Z), float32, on
        the device (``accumulate="device"``) or in CPU memory (``"host"``).

        Args:
            image: preprocessed (C, X, Y, Z).
            overlap: the windows' overlap.
            batch_size: windows per forward pass.
            mirror: also average over the 8 mirrorings.
            accumulate: ``device`` or ``host``: where the sums are kept.
        """
        tensor = torch.from_numpy(image) if isinstance(image, np.ndarray) else image
        return sliding_window_logits(tensor, self.run, self.patch, num_classes=self.num_classes, overlap=overlap,
                                     batch_size=batch_size,
                                     mirror=mirror, device=self.device, accumulate=accumulate)

    def segment(self, image: np.ndarray, overlap: float = D.OVERLAP, batch_size: int = D.PREDICT_BATCH_SIZE, *,
                mirror: bool = False) -> np.ndarray:
        """The label map (int16, X, Y, Z) of a preprocessed image (C, X, Y, Z). On a GPU the
        whole volume stays on the device when it fits (:data:`DEVICE_SHARE`); otherwise, or
        when the device runs out of memory, the sums are kept in CPU memory, with a notice.

        Args:
            image: preprocessed (C, X, Y, Z).
            overlap: the windows' overlap.
            batch_size: windows per forward pass.
            mirror: also average over the 8 mirrorings.
        """
        accumulate = "device"
        if self.device.type == "cuda":
            need = accumulation_bytes(image.shape, self.num_classes)
            free = torch.cuda.mem_get_info(self.device)[0]
            if need > DEVICE_SHARE * free:
                accumulate = "host"
                self.say(f"note: a volume of {'x'.join(map(str, image.shape))} voxels needs {need / 2**30:.1f} GiB "
                         f"to blend on the GPU ({free / 2**30:.1f} GiB free): blending in CPU memory (slower)")
        for attempt in ("first", "fallback"):
            try:
                with torch.inference_mode():
                    return self.logits(image, overlap, batch_size, mirror=mirror,
                                       accumulate=accumulate).argmax(0).to(torch.int16).cpu().numpy()
            except torch.OutOfMemoryError:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if accumulate == "host" or attempt == "fallback":
                    raise PredictError(f"out of {self.device.type} memory while predicting a batch of {batch_size} "
                                       f"window(s) of {'x'.join(map(str, self.patch))}: use a smaller --batch-size "
                                       f"(or --amp fp16 on a GPU)") from None
                accumulate = "host"
                self.say("note: the GPU ran out of memory blending this volume: blending in CPU memory (slower)")
        raise AssertionError("unreachable")


def load_predictor(model_path: str | os.PathLike, backend: str = D.BACKEND, device: str = D.DEVICE,
                   *, amp: str = D.AMP, compile: bool = False, say: Callable[[str], None] = _say) -> Predictor:
    """Open a .safetensors (torch) or .onnx (onnxruntime) model for prediction.

    ``device``: auto (CUDA when available), cpu or cuda. ``amp`` (torch backend): fp16 or bf16
    autocast, off for exact float32; auto: fp16 on CUDA, off on the CPU (where fp16 runs, but
    emulated and slower than float32). ``compile``: ``torch.compile`` the network (torch
    backend); the first batch pays the compilation (printed), a failed compilation falls back
    to eager with a notice. On CUDA, ``cudnn.benchmark`` is switched on (windows all have the
    patch's shape, so the fastest convolution algorithms are searched once).

    Args:
        model_path: a ``.safetensors`` model file, or an ``.onnx`` export.
        backend: ``torch`` or ``onnxruntime`` (must match the file).
        device: ``auto``, ``cpu`` or ``cuda``.
        amp: torch backend only: ``auto``, ``off``, ``fp16`` or ``bf16``.
        compile: torch backend only: ``torch.compile`` the network.
        say: prints notices (compile time, a missing CUDA provider).
    """
    from scnas.build.model_file import read_any_model_info
    from scnas.engine.processes import resolve_device
    from scnas.engine.steps import AMP_CHOICES, resolve_amp

    check_choice(backend, D.BACKEND_CHOICES, "--backend", error=PredictError)
    check_choice(amp, AMP_CHOICES, "--amp", error=PredictError)
    target = resolve_device(device, PredictError)
    info = read_any_model_info(model_path)
    if not info.preprocessing or "target_spacing" not in info.preprocessing or "patch_size" not in info.preprocessing:
        raise ModelFileError("has no preprocessing settings (target_spacing, patch_size) in its metadata; models "
                             "written by 'scnas train' have them", source=str(model_path))
    patch = tuple(int(p) for p in info.preprocessing["patch_size"])
    onnx_file = str(model_path).lower().endswith(".onnx")
    common = dict(preprocessing=info.preprocessing, patch=patch, num_classes=info.config.num_classes,
                  in_channels=info.config.in_channels, backend=backend, say=say)
    if backend == "onnxruntime":
        if not onnx_file:
            raise ModelFileError("--backend onnxruntime needs an .onnx file (make one with 'scnas export-onnx')",
                                 source=str(model_path))
        if compile:
            raise PredictError("--compile applies to the torch backend only (onnxruntime optimises the graph itself)")
        if amp not in ("auto", "off"):
            raise PredictError(f"--amp {amp} applies to the torch backend; for half precision in onnxruntime export "
                               "with 'scnas export-onnx --fp16'")
        return Predictor(_onnx_runner(model_path, target, say), device=torch.device("cpu"), amp="off", **common)
    if onnx_file:
        raise ModelFileError("--backend torch needs the .safetensors model file (or use --backend onnxruntime)",
                             source=str(model_path))
    from scnas.build import load_model
    from scnas.engine.steps import Precision

    model = load_model(model_path, str(target))
    precision = Precision(amp, target)
    if target.type == "cuda":
        torch.backends.cudnn.benchmark = True
    network = compiled_for_inference(model, say) if compile else model

    def run(batch: torch.Tensor) -> torch.Tensor:
        with precision.autocast():
            return network(batch)

    return Predictor(run, device=target, amp=resolve_amp(amp, target), **common)


def _onnx_runner(model_path, target: torch.device, say: Callable[[str], None]) -> TensorPredictFn:
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if target.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        else:
            say("note: this onnxruntime has no CUDA execution provider (install scnas's gpu extra instead of the "
                "cpu one): running the ONNX model on the CPU")
    session = ort.InferenceSession(str(model_path), providers=providers)
    name = session.get_inputs()[0].name

    def run(batch: torch.Tensor) -> torch.Tensor:
        output = session.run(None, {name: batch.cpu().numpy().astype(np.float32, copy=False)})[0]
        return torch.from_numpy(np.asarray(output, dtype=np.float32))

    return run


def find_cases(path: str | os.PathLike) -> list[Case]:
    """Cases in an input: one NIfTI file (3D or 4D), or a folder of them, where files named
    CASE_0000.nii.gz, CASE_0001.nii.gz, ... are the channels of one case."""
    path = Path(path)
    if path.is_file():
        return [Case(strip_nifti_ending(path.name), [path], None)]
    if not path.is_dir():
        raise DatasetError("no such file or folder", source=str(path))
    grouped: dict[str, dict[int, Path]] = {}
    singles = []
    for file in sorted(path.iterdir()):
        if file.name.startswith("._") or not is_nifti(file.name):
            continue
        match = CHANNEL_FILE.match(strip_nifti_ending(file.name))
        if match:
            grouped.setdefault(match["case"], {})[int(match["channel"])] = file
        else:
            singles.append(Case(strip_nifti_ending(file.name), [file], None))
    cases = singles + [Case(case, [files[c] for c in sorted(files)], None) for case, files in sorted(grouped.items())]
    if not cases:
        raise DatasetError("holds no NIfTI images", source=str(path))
    return cases


def read_case(predictor: Predictor, case: Case) -> tuple[dict[str, Any], Any]:
    """(the case preprocessed as the model's metadata says, the NIfTI image of its first
    channel file, whose grid, affine and header the prediction gets)."""
    import nibabel as nib

    preprocessing = predictor.preprocessing
    channels = preprocessing.get("channel_names") or [f"channel {i}" for i in range(predictor.in_channels)]
    dataset = Dataset(case.images[0].parent, "input", "input", channel_names=list(channels),
                      labels=dict(preprocessing.get("labels", {})))
    loaded = load_case(dataset, case, with_label=False)
    settings = PrepareSettings(target_spacing=tuple(preprocessing["target_spacing"]))
    return preprocess_case(loaded, settings), nib.load(str(case.images[0]))


def predict_case(predictor: Predictor, case: Case, overlap: float = D.OVERLAP, *, tta: bool = False,
                 batch_size: int = D.PREDICT_BATCH_SIZE
                 ) -> tuple[np.ndarray, Any]:
    """(label map on the original grid, the NIfTI image of the first channel file).

    Args:
        predictor: from :func:`load_predictor`.
        case: the case's channel files.
        overlap: the sliding windows' overlap.
        tta: also average over the 8 mirrorings.
        batch_size: windows per forward pass.
    """
    prepared, reference = read_case(predictor, case)
    label = predictor.segment(prepared["image"], overlap, batch_size, mirror=tta)
    return label_to_original(label, prepared["record"]), reference


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
        give_default_mode(temporary)   # mkstemp made it 0600; a prediction is an ordinary file
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def predict_folder(model_path: str | os.PathLike, inputs: str | os.PathLike, output: str | os.PathLike,
                   *, backend: str = D.BACKEND, device: str = D.DEVICE, overlap: float = D.OVERLAP, tta: bool = False,
                   batch_size: int = D.PREDICT_BATCH_SIZE, progress: bool = True, only: list[str] | None = None,
                   amp: str = D.AMP, compile: bool = False, prefetch: bool | None = None,
                   say: Callable[[str], None] = _say) -> list[Path]:
    """Predict every case of ``inputs`` (or those in ``only``) into the folder ``output``.

    ``prefetch`` (default: on when predicting on a GPU) reads and preprocesses the next case
    and writes the previous one in background threads while the current one is predicted, so
    the device does not wait for NIfTI I/O and resampling. A case that cannot be read is
    skipped: the others are predicted and written, then a :class:`PredictError` lists the
    skipped ones.

    Args:
        model_path: a ``.safetensors`` model file from ``scnas train``, or its ``.onnx`` export.
        inputs: a NIfTI image, or a folder of them (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``,
            ... are the channels of one case).
        output: the folder for the label maps (``CASE.nii.gz``); made if missing.
        backend: ``torch`` (a .safetensors file) or ``onnxruntime`` (an .onnx file).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        overlap: the sliding windows' overlap, 0 to 0.95 (paper: 0.5).
        tta: also average over the 8 mirrorings (slower, slightly better).
        batch_size: windows per forward pass.
        progress: show a progress bar over the cases.
        only: predict only these case IDs (each must have an image).
        amp: precision of the torch backend: ``auto`` (fp16 on CUDA, off on the CPU), ``off``,
            ``fp16``, ``bf16``.
        compile: ``torch.compile`` the network (torch backend; falls back to eager with a
            notice).
        prefetch: read the next case and write the previous one in background threads (None: on
            a GPU only).
        say: prints notices.
    """
    out = ensure_folder(output, OutputError, "the output folder")
    predictor = load_predictor(model_path, backend, device, amp=amp, compile=compile, say=say)
    cases = find_cases(inputs)
    if only is not None:
        missing = sorted(set(only) - {case.case_id for case in cases})
        if missing:
            raise DatasetError(f"no image for case(s) {', '.join(missing[:5])}", source=str(inputs))
        cases = [case for case in cases if case.case_id in set(only)]
    if prefetch is None:
        prefetch = predictor.device.type == "cuda"
    from scnas.progress import StepBar

    written: list[Path] = []
    failed: list[Problem] = []
    bar = StepBar(progress, len(cases))
    reader, writer = (ThreadPoolExecutor(1, "scnas-read"), ThreadPoolExecutor(1, "scnas-write")) if prefetch \
        else (_Inline(), _Inline())
    writes: deque[tuple[Case, Path, Future]] = deque()

    def finish(target: Path, label: np.ndarray, record: dict[str, Any], reference) -> None:
        write_label(label_to_original(label, record), reference, target)

    def drain(keep: int) -> None:
        while len(writes) > keep:
            case, target, future = writes.popleft()
            future.result()
            written.append(target)
            bar.advance(case.case_id)

    bar.start("predicting")
    try:
        queue = deque(cases)
        reading = deque([(queue.popleft(), None)]) if queue else deque()
        while reading:
            case, future = reading.popleft()
            future = future or reader.submit(read_case, predictor, case)
            if prefetch and queue:  # read the next case while this one is predicted
                following = queue.popleft()
                reading.append((following, reader.submit(read_case, predictor, following)))
            elif queue:
                reading.append((queue.popleft(), None))
            try:
                prepared, reference = future.result()
            except (ScnasError, MemoryError) as exc:
                failed.append(Problem("", _reason(exc)))
                bar.advance(case.case_id)
                continue
            try:
                label = predictor.segment(prepared["image"], overlap, batch_size, mirror=tta)
            except ScnasError as exc:
                raise exc.with_source(f"case {case.case_id}") from None
            target = out / f"{case.case_id}.nii.gz"
            writes.append((case, target, writer.submit(finish, target, label, prepared["record"], reference)))
            del prepared
            drain(keep=1)
        drain(keep=0)
    finally:
        bar.stop()
        for pool in (reader, writer):
            pool.shutdown(wait=True, cancel_futures=True)
    if failed:
        raise PredictError(problems=[Problem("", f"wrote {len(written)} of {len(cases)} segmentation(s) of {inputs} "
                                                 f"to {out}; {len(failed)} case(s) could not be read:")] + failed)
    return written


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ScnasError):
        return "; ".join(exc.lines())
    return f"{type(exc).__name__}: {str(exc)[:160] or 'out of memory'}"


class _Inline:
    """The executor interface, running each call at once in the calling thread."""

    def submit(self, function: Callable, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(function(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the result, as a pool would
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass
