"""Model files: safetensors weights with the genotype, the build config, the scnas version
and (when known) the preprocessing in the header metadata, so a model file alone is enough
to rebuild the network. Nothing is unpickled."""

from __future__ import annotations

import json
import os
from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from scnas import __version__
from scnas.build.config import BuildConfig
from scnas.build.network import SCNASUNet, build_network
from scnas.errors import ScnasError
from scnas.fileio import atomic_write_bytes, check_input_file
from scnas.genotype import Genotype, genotype_from_data, genotype_hash

MODEL_FORMAT = "scnas-model"
MODEL_FORMAT_VERSION = "1"


class ModelFileError(ScnasError):
    """A model file that cannot be read, lacks scnas metadata, or does not fit a network."""


@dataclass
class ModelInfo:
    """What a model file says about itself."""

    genotype: Genotype
    config: BuildConfig
    scnas_version: str
    _: KW_ONLY
    preprocessing: dict[str, Any] | None
    metadata: dict[str, str]


def model_metadata(model: SCNASUNet, preprocessing: dict[str, Any] | None = None,
                   extra: dict[str, str] | None = None) -> dict[str, str]:
    """The description every model file carries (safetensors header, ONNX metadata_props)."""
    genotype: Genotype = model.genotype
    return {
        "format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "scnas_version": __version__,
        "genotype": json.dumps(genotype.to_dict(), sort_keys=True), "genotype_hash": genotype_hash(genotype),
        "build_config": model.config.model_dump_json(),
        **({"preprocessing": json.dumps(preprocessing, sort_keys=True)} if preprocessing is not None else {}),
        **(extra or {}),
    }


def save_model(model: SCNASUNet, path: str | os.PathLike, preprocessing: dict[str, Any] | None = None,
               *, extra: dict[str, str] | None = None) -> None:
    """Write ``model``'s weights and its description to ``path`` atomically.

    Args:
        model: the network (its genotype and ``BuildConfig`` are stored with the weights).
        path: the ``.safetensors`` file to write.
        preprocessing: what a predictor must do to a new image (spacing, normalisation, patch
            size).
        extra: more metadata (strings), e.g. how the model was trained.
    """
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    atomic_write_bytes(path, safetensors_save(tensors, metadata=model_metadata(model, preprocessing, extra)))


def _open(path: str | os.PathLike):
    name = str(path)
    check_input_file(path, ModelFileError)
    try:
        return safe_open(name, framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"not a safetensors model file ({exc})", source=name) from None


def model_info_from_metadata(metadata: dict[str, str], source: str) -> ModelInfo:
    """Parse the description written by :func:`model_metadata` (from any kind of model file)."""
    if metadata.get("format") != MODEL_FORMAT:
        raise ModelFileError("has no scnas metadata (was it written by 'scnas build -o', 'scnas train' or "
                             "'scnas export-onnx'?)", source=source)
    if metadata.get("format_version") != MODEL_FORMAT_VERSION:
        raise ModelFileError(f"model format version {metadata.get('format_version')!r} is not one this scnas reads "
                             f"({MODEL_FORMAT_VERSION})", source=source)
    try:
        genotype = genotype_from_data(json.loads(metadata["genotype"]), source=f"{source} [genotype]")
        config = BuildConfig.model_validate_json(metadata["build_config"])
        preprocessing = json.loads(metadata["preprocessing"]) if "preprocessing" in metadata else None
    except KeyError as exc:
        raise ModelFileError(f"metadata lacks {exc.args[0]!r}", source=source) from None
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ModelFileError(f"metadata is damaged: {str(exc).splitlines()[0]}", source=source) from None
    return ModelInfo(genotype, config, metadata.get("scnas_version", "?"), preprocessing=preprocessing,
                     metadata=dict(metadata))


def read_model_info(path: str | os.PathLike) -> ModelInfo:
    """The genotype, build config and preprocessing stored in a model file (weights not read)."""
    with _open(path) as handle:
        metadata = handle.metadata() or {}
    return model_info_from_metadata(metadata, str(path))


def read_onnx_info(path: str | os.PathLike) -> ModelInfo:
    """The scnas description stored in an ONNX file's metadata."""
    import onnx

    name = str(path)
    check_input_file(path, ModelFileError)
    try:
        proto = onnx.load(name, load_external_data=False)
    except Exception as exc:
        raise ModelFileError(f"not an ONNX file ({type(exc).__name__})", source=name) from None
    return model_info_from_metadata({p.key: p.value for p in proto.metadata_props}, name)


def read_any_model_info(path: str | os.PathLike) -> ModelInfo:
    """Model info from a ``.onnx`` or a safetensors model file."""
    return read_onnx_info(path) if str(path).lower().endswith(".onnx") else read_model_info(path)


HEADS = "heads."
"""The prefix of the deep-supervision heads' weights: trained or not, a model file loads into a
network built with or without them (inference never uses them)."""


def load_weights(model: SCNASUNet, path: str | os.PathLike) -> None:
    """Load the weights of ``path`` into ``model``; a clear error when they were saved from a
    different genotype or build (names the differing settings). Deep supervision may differ:
    the heads' weights (``heads.*``) load where both have them and are otherwise left out (a
    file without them leaves the network's heads as they are); every other tensor must fit."""
    name = str(path)
    info = read_model_info(path)
    differences = []
    if genotype_hash(info.genotype) != genotype_hash(model.genotype):
        differences.append("genotype differs")
    for key, value in model.config.model_dump(exclude={"deep_supervision"}).items():
        saved = getattr(info.config, key)
        if saved != value:
            differences.append(f"{key}: file {saved}, network {value}")
    with _open(path) as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    expected = model.state_dict()
    optional = {key for key in set(expected) ^ set(tensors) if key.startswith(HEADS)}
    missing = sorted(set(expected) - set(tensors) - optional)
    unexpected = sorted(set(tensors) - set(expected) - optional)
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if differences or missing or unexpected or wrong:
        detail = "; ".join(differences) or (f"{len(missing)} missing, {len(unexpected)} unexpected, "
                                            f"{len(wrong)} wrong-shape tensors (e.g. {(missing + unexpected + wrong)[0]})")
        raise ModelFileError(f"weights do not fit this network: {detail}", source=name)
    model.load_state_dict({key: value for key, value in tensors.items() if key not in optional},
                          strict=not optional)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> SCNASUNet:
    """Rebuild the network described in a model file and load its weights (eval mode)."""
    info = read_model_info(path)
    model = build_network(info.genotype, info.config)
    load_weights(model, path)
    return model.to(device).eval()
