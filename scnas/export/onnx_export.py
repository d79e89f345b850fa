"""ONNX export of scnas networks, verified in onnxruntime against PyTorch.

Exporter: torch's ``dynamo=True`` exporter at opset 18, with dynamic batch and spatial axes
(spatial sizes as multiples of 2**depth, expressed with ``torch.export.Dim``), the ONNX graph
optimiser on, and everything in one file. The legacy TorchScript exporter is deprecated and
cannot export the layout changes in scnas's max pooling; the dynamo exporter is slower to run
(docs/benchmarks.md, "Export") but is torch's supported path.

The model's description (genotype, build config, scnas version, preprocessing when known)
goes into the ONNX ``metadata_props`` under the same keys as in safetensors model files, so
an ONNX file alone is enough to predict.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from dataclasses import KW_ONLY, asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from scnas.build import BuildError, SCNASUNet
from scnas.build.model_file import model_metadata
from scnas.build.network import check_spatial_size
from scnas import defaults as D
from scnas.defaults import ONNX_PROVIDER_CHOICES
from scnas.errors import ScnasError, check_choice
from scnas.fileio import atomic_write_bytes, ensure_writable
from scnas.genotype import short_hash

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "image", "logits"
PROVIDERS = dict(zip(ONNX_PROVIDER_CHOICES, ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider")))
TOLERANCE = (1e-4, 1e-3)
"""(atol, rtol): the float32 graph passes when max|onnx - torch| <= atol + rtol * max|torch|.
Randomly initialised, InstanceNorm-heavy networks differ by up to ~1e-4 of the output range
between runtimes in float32; a wrong operation differs by order 1."""
FP16_MIN_LABEL_AGREEMENT = 0.95
FP16_MAX_REL = 0.25
"""The float16 graph is the verified float32 graph converted, so its check is about precision
only: outputs finite, at least 95% of voxels with the same label (argmax) as PyTorch float32,
and max|diff| <= 0.25 x max|torch|. Half precision is poorly conditioned for untrained
networks: random-weight networks differ by 3-15% of the output range even inside PyTorch's
own float16, trained ones far less."""


class ExportError(ScnasError):
    """An export that cannot be made or that fails its verification."""


@dataclass
class ParityCheck:
    dtype: str
    shape: tuple[int, ...]
    max_abs: float
    _: KW_ONLY
    max_rel: float           # max_abs / max|torch output|
    label_agreement: float   # share of voxels whose argmax class equals PyTorch's
    passed: bool


@dataclass
class ExportReport:
    path: str
    dtype: str
    opset: int
    _: KW_ONLY
    export_seconds: float
    file_bytes: int
    provider: str | None
    checks: list[ParityCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def default_check_shapes(model: SCNASUNet) -> list[tuple[int, ...]]:
    """Two different, small input shapes: (1, C, 2m, 2m, 2m) and (2, C, 3m, 2m, 4m), m = 2**depth."""
    m, c = model.config.divisor, model.config.in_channels
    return [(1, c, 2 * m, 2 * m, 2 * m), (2, c, 3 * m, 2 * m, 4 * m)]


def _onnx_model(model: SCNASUNet, dtype: torch.dtype = torch.float32):
    from torch.export import Dim

    m = model.config.divisor
    example = torch.zeros(2, model.config.in_channels, 2 * m, 2 * m, 2 * m, dtype=dtype)  # batch 2: 1 would be fixed
    spatial = {axis: m * Dim(f"{name}_blocks", min=1, max=4096 // m) for axis, name in zip((2, 3, 4), "dhw")}
    dynamic = {"x": {0: Dim("batch", min=1, max=1024), **spatial}}
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    try:
        # The exporter logs that torchvision is absent and warns about its own internals: noise here.
        onnx_logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], optimize=True,
                                        external_data=False, verbose=False)
    except Exception as exc:  # the exporter's many error types; the message is what helps
        raise ExportError(f"torch could not export the network: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    finally:
        onnx_logger.setLevel(level)
    return program.model_proto


def export_onnx(model: SCNASUNet, path: str | os.PathLike, *, preprocessing: dict[str, Any] | None = None,
                fp16: bool = False, verify: bool = True, provider: str = D.ONNX_PROVIDER,
                check_shapes: list[tuple[int, ...]] | None = None,
                metadata: dict[str, str] | None = None) -> ExportReport:
    """Export ``model`` to one ONNX file at ``path``.

    The float32 graph is checked with ``onnx.checker`` and, unless ``verify`` is False, run in
    onnxruntime on ``provider`` against PyTorch at two input shapes (:data:`TOLERANCE`). With
    ``fp16`` that verified graph is converted to float16 inside (inputs and outputs stay
    float32) and checked for precision (:data:`FP16_MIN_LABEL_AGREEMENT`). ``metadata``: more
    entries for ``metadata_props`` (e.g. a trained model's ``training``). Raises
    ``ExportError`` when a check fails; the file is written only when all pass.

    Args:
        model: the network to export (eval mode is set here).
        path: the ``.onnx`` file to write.
        preprocessing: what a predictor must do to a new image, stored in the metadata.
        fp16: convert the verified graph to float16 inside.
        verify: run the file in onnxruntime against PyTorch.
        provider: the onnxruntime execution provider to verify on: ``cpu``, ``cuda`` or
            ``tensorrt``.
        check_shapes: the input shapes verified (default: :func:`default_check_shapes`).
        metadata: more ``metadata_props`` entries.
    """
    import onnx

    shapes = check_shapes or default_check_shapes(model)
    for shape in shapes:
        if len(shape) != 5 or shape[1] != model.config.in_channels:
            raise BuildError(f"check shape {shape} must be (batch, {model.config.in_channels}, D, H, W)")
        check_spatial_size(tuple(shape[2:]), model.config)
    if preprocessing and preprocessing.get("patch_size"):
        check_spatial_size(tuple(preprocessing["patch_size"]), model.config)
    session_factory = _session_factory(provider) if verify else None
    ensure_writable(path)
    model = copy.deepcopy(model).float().eval()
    start = time.perf_counter()
    proto = _onnx_model(model, torch.float32)
    if fp16:
        from onnxconverter_common import float16

        float32_proto = proto
        with warnings.catch_warnings():  # "weight x truncated to 1e-07": the fp16 check below measures the effect
            warnings.simplefilter("ignore", UserWarning)
            proto = float16.convert_float_to_float16(float32_proto, keep_io_types=True)
    seconds = time.perf_counter() - start
    properties = model_metadata(model, preprocessing, {**(metadata or {}), "dtype": "float16" if fp16 else "float32",
                                                      "io_dtype": "float32", "input_name": INPUT_NAME,
                                                      "output_name": OUTPUT_NAME,
                                                      "spatial_multiple": str(model.config.divisor)})
    del proto.metadata_props[:]
    for key, value in properties.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "scnas"
    proto.doc_string = f"scnas network, genotype {short_hash(properties['genotype_hash'])}; see metadata_props"
    data = proto.SerializeToString()
    try:
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported graph fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    report = ExportReport(str(path), "float16" if fp16 else "float32", OPSET, export_seconds=seconds,
                          file_bytes=len(data),
                          provider=provider if verify else None)
    if session_factory is not None:
        graphs = [("float32", float32_proto.SerializeToString() if fp16 else data)] + ([("float16", data)] if fp16 else [])
        for dtype, graph in graphs:
            session = session_factory(graph)
            report.checks += [_parity(session, model, shape, dtype) for shape in shapes]
        failed = [check for check in report.checks if not check.passed]
        if failed:
            worst = failed[0]
            rule = (f"allowed: {TOLERANCE[0]:g} + {TOLERANCE[1]:g} x max|output|" if worst.dtype == "float32" else
                    f"needs >= {FP16_MIN_LABEL_AGREEMENT:.0%} same labels and max rel <= {FP16_MAX_REL:g}")
            raise ExportError(f"onnxruntime ({provider}, {worst.dtype}) differs from PyTorch at shape {worst.shape}: "
                              f"max abs {worst.max_abs:.3g}, max rel {worst.max_rel:.3g}, labels agree "
                              f"{worst.label_agreement:.2%} ({rule}); nothing was written", source=str(path))
    atomic_write_bytes(path, data)
    return report


def _session_factory(provider: str):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("verification needs onnxruntime, which is not installed: pip install 'scnas[cpu]' "
                          "(or 'scnas[gpu]' for CUDA/TensorRT; never both), or export with --no-verify") from None
    check_choice(provider, ONNX_PROVIDER_CHOICES, "--provider", error=ExportError)
    available = ort.get_available_providers()
    if PROVIDERS[provider] not in available:
        hint = ("install the GPU build instead of the CPU one: pip uninstall onnxruntime && pip install 'scnas[gpu]'"
                if provider != "cpu" else "reinstall onnxruntime")
        raise ExportError(f"onnxruntime here has no {PROVIDERS[provider]} (available: {', '.join(available)}); {hint}")

    def make(data: bytes):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(data, options, providers=[PROVIDERS[provider]])
    return make


def _parity(session, model: SCNASUNet, shape: tuple[int, ...], dtype: str) -> ParityCheck:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator)
    with torch.inference_mode():
        expected = model(x).numpy()
    got = session.run(None, {INPUT_NAME: x.numpy()})[0].astype(np.float32)
    if got.shape != expected.shape or not np.isfinite(got).all():
        return ParityCheck(dtype, tuple(shape), float("inf"), max_rel=float("inf"), label_agreement=0.0, passed=False)
    max_abs = float(np.abs(got - expected).max())
    scale = float(np.abs(expected).max())
    max_rel = max_abs / max(scale, 1e-12)
    agreement = float((got.argmax(1) == expected.argmax(1)).mean())
    if dtype == "float32":
        passed = max_abs <= TOLERANCE[0] + TOLERANCE[1] * scale
    else:
        passed = agreement >= FP16_MIN_LABEL_AGREEMENT and max_rel <= FP16_MAX_REL
    return ParityCheck(dtype, tuple(shape), max_abs, max_rel=max_rel, label_agreement=agreement, passed=passed)


__all__ = ["ExportError", "ExportReport", "FP16_MIN_LABEL_AGREEMENT", "ParityCheck", "TOLERANCE", "default_check_shapes",
           "export_onnx"]
