"""A trained scnas model as a MONAI bundle, so that ``python -m monai.bundle run`` segments NIfTI
images as ``scnas predict`` does, inside MONAI's own workflow, transforms, inferer and writer.

The bundle follows MONAI's bundle specification: ``configs/metadata.json`` (the schema's
required keys, the network's inputs and outputs), ``configs/inference.json`` (the network built
from the genotype written inline, through :func:`build_network_from_genotype`; the model's
recorded preprocessing as MONAI transforms; a ``SlidingWindowInferer`` with the model's patch,
overlap 0.5 and Gaussian blending; the labels mapped back onto the input's grid and written as
NIfTI), ``models/model.pt`` (a plain state dict) and, on request, ``models/model.onnx``.

Where MONAI's own components compute differently from scnas, the bundle names small pieces
from here instead, each the MONAI class or a function MONAI's ``Lambdad`` runs:
:class:`WholeVoxelSpacingd` (scnas's resampling grid), :func:`zscore_in_nonzero_mask` (scnas's
z-score statistics), :class:`EvenSlidingWindowInferer` (scnas's window placement and weights)
and :func:`labels_from_maps` (scnas's rule for labels resampled back). With them the labels
equal 'scnas predict''s; docs/integrations.md gives what each one changed.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import KW_ONLY, dataclass
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

from scnas import __version__
from scnas import defaults as D
from scnas.errors import OutputError, ScnasError

SCHEMA_URL = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
              "meta_schema_20240725.json")
"""The metadata schema MONAI's model zoo bundles name (``verify_metadata`` downloads it)."""
BUNDLE_VERSION = "0.1.0"
MODULE = "scnas.integrations.monai_bundle"
"""What the bundle's ``_target_`` entries name: the functions and MONAI classes here that build
its network, list its cases, resample, z-score, slide windows and name its outputs."""
SIGMA_SCALE = 1 / 8
"""The Gaussian's sigma as a share of the window, as in :func:`scnas.train.inference.gaussian_importance`."""
TRANSLATABLE = {"crop": "nonzero", "normalization": "zscore-nonzero", "image_interpolation": "cubic"}
"""The recorded preprocessing settings the bundle's MONAI transforms reproduce."""
RUNTIME_PACKAGES = ("monai", "pytorch-ignite", "fire", "nibabel")
"""What ``python -m monai.bundle run`` needs for this bundle besides scnas and torch: its
evaluator is ignite's, and ``fire`` is the command line of ``python -m monai.bundle``."""
CHANNEL_SUFFIX = re.compile(r"_\d{4}$")


class BundleError(ScnasError):
    """A model that cannot become a bundle, or a bundle folder that cannot be written."""


def build_network_from_genotype(genotype: dict[str, Any], build_config: dict[str, Any]):
    """The network of a genotype document and build settings (plain data, as a bundle config
    holds them): what ``network_def`` in a bundle's ``inference.json`` calls."""
    from scnas.build import BuildConfig, build_network
    from scnas.genotype import genotype_from_data

    return build_network(genotype_from_data(genotype, source="network_def genotype"),
                         BuildConfig.model_validate(build_config))


def bundle_datalist(dataset_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One ``{"image": ...}`` item per case of a folder, found as ``scnas predict`` finds them:
    a NIfTI file per case (3D or 4D), or ``CASE_0000``, ``CASE_0001``, ... as its channels."""
    from scnas.train.predict import find_cases

    items = []
    for case in find_cases(dataset_dir):
        files = [str(path) for path in case.images]
        items.append({"image": files[0] if len(files) == 1 else files})
    return items


def zscore_in_nonzero_mask(image):
    """Each channel of ``image`` (C, X, Y, Z) z-scored with the mean and standard deviation of
    its voxels where any channel is nonzero, every voxel included, as
    :func:`scnas.data.preprocess.preprocess_case` scores the cropped image. Resampling
    preserves constants, so z-scoring first and resampling then gives scnas's values (which
    resample first); MONAI's ``NormalizeIntensityd`` measures each channel's own nonzero voxels
    and scores only those."""
    import torch

    mask = (image != 0).any(0)
    scored = torch.empty_like(image, dtype=torch.float32)
    for channel in range(image.shape[0]):
        values = image[channel][mask].double()
        std = max(float(values.std(unbiased=False)), 1e-8)
        scored[channel] = (image[channel].float() - float(values.mean())) / std
    return scored


def labels_from_maps(maps):
    """A label map (1, X, Y, Z) from per-label maps (K, X, Y, Z) resampled from one-hot maps, as
    :func:`scnas.data.preprocess.resample_label` decides: the highest label whose map is >= 0.5,
    else background (an argmax would give ties of 0.5, frequent at resampling factors such as
    1.5, to the lower label)."""
    import torch

    values = torch.arange(maps.shape[0], dtype=maps.dtype, device=maps.device).view(-1, *[1] * (maps.ndim - 1))
    return ((maps >= 0.5) * values).amax(0, keepdim=True)


def case_file_name(metadict: dict, saver) -> dict[str, Any]:
    """``SaveImaged``'s ``output_name_formatter``: the case name as ``scnas predict`` writes it
    (the input's name without NIfTI ending and without a ``_0000`` channel suffix)."""
    from scnas.data.dataset import strip_nifti_ending

    source = (metadict or {}).get("filename_or_obj", getattr(saver, "_data_index", 0))
    if isinstance(source, (list, tuple)):
        source = source[0]
    return {"subject": CHANNEL_SUFFIX.sub("", strip_nifti_ending(Path(str(source)).name)), "idx": None}


def _preprocessing_of(info, source: str) -> dict[str, Any]:
    preprocessing = info.preprocessing or {}
    if "target_spacing" not in preprocessing or "patch_size" not in preprocessing:
        raise BundleError("has no preprocessing settings (target_spacing, patch_size) in its metadata; models "
                          "written by 'scnas train' have them", source=source)
    for key, expected in TRANSLATABLE.items():
        if preprocessing.get(key, expected) != expected:
            raise BundleError(f"records preprocessing {key}={preprocessing[key]!r}; the bundle's MONAI transforms "
                              f"reproduce {key}={expected!r} only", source=source)
    return preprocessing


def _class_names(info, preprocessing: dict[str, Any]) -> dict[str, str]:
    by_value = {int(value): name for name, value in (preprocessing.get("labels") or {}).items()}
    return {str(k): by_value.get(k, f"class {k}") for k in range(info.config.num_classes)}


def preprocessing_transforms(preprocessing: dict[str, Any]) -> list[dict[str, Any]]:
    """The model's recorded preprocessing (:func:`scnas.data.preprocess.preprocess_case`) as
    MONAI transforms, configs for ``Compose``: crop to the box of voxels nonzero in any
    channel; resample the image (cubic spline) and that nonzero mask (linear) to the target
    spacing on scnas's grid (:class:`WholeVoxelSpacingd`); zero the image outside the mask
    (>= 0.5); z-score each channel inside it."""
    return [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "CropForegroundd", "keys": "image", "source_key": "image",
         "select_fn": "$lambda x: x != 0", "margin": 0, "allow_smaller": True},
        {"_target_": "CopyItemsd", "keys": "image", "names": "mask"},
        {"_target_": "Lambdad", "keys": "mask", "func": "$lambda x: (x != 0).any(0, keepdim=True).float()"},
        {"_target_": "Lambdad", "keys": "image", "func": {"_target_": f"{MODULE}.zscore_in_nonzero_mask",
                                                           "_mode_": "callable"}},
        {"_target_": f"{MODULE}.WholeVoxelSpacingd", "keys": ["image", "mask"],
         "pixdim": list(preprocessing["target_spacing"]), "mode": [3, 1], "padding_mode": "nearest",
         "inverse_mode": 1},
        {"_target_": "MaskIntensityd", "keys": "image", "mask_key": "mask", "select_fn": "$lambda m: m >= 0.5"},
        {"_target_": "DeleteItemsd", "keys": "mask"},
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
    ]


@functools.cache
def _whole_voxel_spacingd() -> type:
    from monai.transforms import Spacingd
    from monai.utils import TraceKeys

    class WholeVoxelSpacingd(Spacingd):
        """MONAI's ``Spacingd`` on the grid scnas (and nnU-Net) resample to: round(n * spacing /
        target) voxels spanning the image's extent, voxel centres at (j + 0.5) * n / count - 0.5
        (``scipy.ndimage.zoom``'s ``grid_mode``). ``Spacingd`` keeps the target spacing exactly,
        which shifts voxels far from the first by up to half a voxel against scnas's, and its
        offset is off where the image's corner lies within half a voxel of world coordinate 0.
        Sizes, spacing and affine come from the first key. The inverse is ``Spacingd``'s.
        ``inverse_mode``: the spline order (0-5) of the inverse, e.g. 1 for one-hot label maps,
        which scnas maps back linearly; None: the forward mode."""

        def __init__(self, keys, pixdim, *args, inverse_mode: int | None = None, **kwargs):
            super().__init__(keys, pixdim, *args, **kwargs)
            self.inverse_mode = inverse_mode

        def __call__(self, data, lazy=None):
            import torch

            d = dict(data)
            first = d[self.keys[0]]
            affine = np.asarray(first.affine, dtype=np.float64)
            sizes = np.asarray(first.shape[1:], dtype=np.float64)
            extent = sizes * np.asarray(first.pixdim, dtype=np.float64)
            target = self.spacing_transform.pixdim[:len(sizes)]
            stretch = sizes / np.maximum(1, np.round(extent / target))   # input voxels per output voxel
            grid = affine.copy()
            grid[:-1, :-1] = affine[:-1, :-1] * stretch
            grid[:-1, -1] = affine[:-1, :-1] @ (0.5 * (stretch - 1)) + affine[:-1, -1]
            shape = [int(n) for n in np.round(sizes / stretch)]
            for key, mode, padding_mode, align_corners, dtype in self.key_iterator(
                    d, self.mode, self.padding_mode, self.align_corners, self.dtype):
                d[key] = self.spacing_transform.sp_resample(d[key], dst_affine=torch.as_tensor(grid),
                                                            spatial_size=shape, mode=mode, padding_mode=padding_mode,
                                                            align_corners=align_corners, dtype=dtype)
            return d

        def inverse(self, data):
            d = dict(data)
            if self.inverse_mode is not None:
                for key in self.key_iterator(d):
                    trace = self.spacing_transform.sp_resample.get_most_recent_transform(d[key])
                    trace[TraceKeys.EXTRA_INFO]["mode"] = self.inverse_mode
            return super().inverse(d)

    return WholeVoxelSpacingd


@functools.cache
def _even_sliding_window_inferer() -> type:
    from monai.inferers import SlidingWindowInferer
    from monai.utils import convert_to_dst_type

    class EvenSlidingWindowInferer(SlidingWindowInferer):
        """MONAI's ``SlidingWindowInferer`` placing and blending windows as scnas (and nnU-Net)
        do (:func:`scnas.train.inference.sliding_window_logits`): corners spread evenly from 0
        to size - patch, Gaussian weights (sigma = patch / 8) falling to ~1e-9 in a window's
        corners. MONAI steps by int(patch x (1 - overlap)) with the last window flush at the
        end and floors its weights at 1e-3: with InstanceNorm in every cell, a window's
        prediction depends on where it lies: MONAI's placement changed 3-6% of the foreground
        labels of the phantom models in docs/integrations.md. ``num_classes``: the network's
        outputs."""

        def __init__(self, roi_size, sw_batch_size: int = 1, overlap: float = 0.5, *args,
                     num_classes: int, **kwargs):
            super().__init__(roi_size, sw_batch_size, overlap, *args, **kwargs)
            self.num_classes = num_classes

        def __call__(self, inputs, network, *args, **kwargs):
            import torch

            from scnas.train.inference import sliding_window_logits

            images = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
            logits = torch.stack([
                sliding_window_logits(image, lambda batch: network(batch, *args, **kwargs),
                                      tuple(int(n) for n in self.roi_size), num_classes=self.num_classes,
                                      overlap=float(self.overlap),
                                      batch_size=self.sw_batch_size, gaussian=self.mode == "gaussian")
                for image in images])
            return convert_to_dst_type(logits, inputs, dtype=logits.dtype)[0]

    return EvenSlidingWindowInferer


MONAI_CLASSES = {"WholeVoxelSpacingd": _whole_voxel_spacingd, "EvenSlidingWindowInferer": _even_sliding_window_inferer}


def __getattr__(name: str) -> Any:
    # MONAI classes are made on first use, so that exporting a bundle does not import MONAI.
    if name in MONAI_CLASSES:
        return MONAI_CLASSES[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def inference_config(info, preprocessing: dict[str, Any]) -> dict[str, Any]:
    """``configs/inference.json``: MONAI's inference workflow for this model (see the module docstring)."""
    genotype = {key: value for key, value in info.genotype.to_dict().items() if key != "provenance"}
    build = info.config.model_dump(mode="json") | {"deep_supervision": False}  # inference never uses the heads
    patch = [int(p) for p in preprocessing["patch_size"]]
    load = {"_target_": "LoadImaged", "keys": "image", "image_only": True}
    return {
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "dataset_dir": "$@bundle_root + '/input'",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": {"_target_": f"{MODULE}.bundle_datalist", "dataset_dir": "@dataset_dir"},
        "network_def": {"_target_": f"{MODULE}.build_network_from_genotype", "genotype": genotype, "build_config": build},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing_transforms(preprocessing)},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": f"{MODULE}.EvenSlidingWindowInferer", "roi_size": patch,
                    "sw_batch_size": D.PREDICT_BATCH_SIZE, "overlap": D.OVERLAP, "mode": "gaussian",
                    "sigma_scale": SIGMA_SCALE, "num_classes": info.config.num_classes},
        "postprocessing": {"_target_": "Compose", "transforms": [
            # Labels go back in CPU memory, as scnas's do: MONAI's spline resampling of a CUDA
            # tensor needs CuPy.
            {"_target_": "ToDeviced", "keys": "pred", "device": "cpu"},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True, "to_onehot": info.config.num_classes},
            # Back through the resampling and the crop (the one-hot maps, then argmax: as scnas maps
            # each label's mask back and thresholds it), onto the input's grid and affine.
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "Lambdad", "keys": "pred", "func": {"_target_": f"{MODULE}.labels_from_maps",
                                                             "_mode_": "callable"}},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "",
             "output_ext": ".nii.gz", "separate_folder": False, "resample": False, "output_dtype": "$numpy.uint8",
             "output_name_formatter": {"_target_": f"{MODULE}.case_file_name", "_mode_": "callable"},
              "print_log": False},
        ]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "@ckpt_path", "load_dict": {"model": "@network"},
                      "map_location": "@device"}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": [],
        "run": ["$@evaluator.run()"],
    }


def _version(package: str) -> str:
    try:
        return package_metadata.version(package)
    except package_metadata.PackageNotFoundError:
        raise BundleError(f"needs {package} to describe the bundle's runtime: pip install 'scnas[monai]'") from None


def bundle_metadata(info, preprocessing: dict[str, Any], model_name: str) -> dict[str, Any]:
    """``configs/metadata.json``: the keys MONAI's metadata schema requires, the network's inputs
    and outputs, and what scnas knows of the model (under ``scnas``)."""
    import numpy
    import torch

    from scnas.genotype import genotype_hash, short_hash

    config = info.config
    channels = list(preprocessing.get("channel_names") or [f"channel {i}" for i in range(config.in_channels)])
    classes = _class_names(info, preprocessing)
    shape = [f"{config.divisor}*n"] * 3
    spacing = "x".join(f"{s:g}" for s in preprocessing["target_spacing"])
    return {
        "schema": SCHEMA_URL,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by scnas {__version__} from {model_name}"},
        "monai_version": _version("monai"),
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"scnas": __version__,
                                      **{name: _version(name) for name in RUNTIME_PACKAGES if name != "monai"}},
        "name": f"scnas {short_hash(info.genotype)}",
        "task": f"3D segmentation of {', '.join(classes[k] for k in sorted(classes, key=int) if k != '0')}",
        "description": (f"A network of genotype {short_hash(info.genotype)} (SCNAS cells, stem "
                        f"{config.stem_channels}, depth {config.depth}) trained with scnas. Inputs: "
                        f"{len(channels)} channel(s) ({', '.join(channels)}), cropped to their nonzero box, z-scored "
                        f"per channel in the nonzero voxels and resampled to {spacing} mm; sliding window of "
                        f"{'x'.join(map(str, preprocessing['patch_size']))} voxels, overlap {D.OVERLAP}, Gaussian "
                        "blending; labels written on the input's grid."),
        "authors": "not recorded in the model file (exported by scnas export-bundle)",
        "copyright": "not recorded in the model file",
        "data_type": "nibabel",
        "image_classes": f"{len(channels)} channel(s): {', '.join(channels)}",
        "label_classes": ", ".join(f"{k}: {name}" for k, name in classes.items()),
        "pred_classes": ", ".join(f"{k}: {name}" for k, name in classes.items()),
        "intended_use": "research",
        "references": ["Kim et al., Scalable Neural Architecture Search for 3D Medical Image Segmentation, "
                       "MICCAI 2019"],
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "MR or CT",
                                 "num_channels": config.in_channels, "spatial_shape": shape, "dtype": "float32",
                                 "value_range": [], "is_patch_data": True,
                                 "channel_def": {str(i): name for i, name in enumerate(channels)}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": config.num_classes,
                                 "spatial_shape": shape, "dtype": "float32", "value_range": [],
                                 "is_patch_data": True, "channel_def": classes}},
        },
        "scnas": {"scnas_version": info.scnas_version, "genotype_hash": genotype_hash(info.genotype),
                  "build_config": config.model_dump(mode="json"), "preprocessing": preprocessing},
    }


BUNDLE_README = """# {name}

A segmentation network found and trained with scnas, as a MONAI bundle (exported from {model}).

    python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
        --dataset_dir IMAGES --output_dir PREDICTIONS

IMAGES holds one NIfTI file per case (3D or 4D), or CASE_0000.nii.gz, CASE_0001.nii.gz, ... as
the channels of a case; each case's labels are written as PREDICTIONS/CASE.nii.gz on its grid.
Needs scnas, MONAI, pytorch-ignite and nibabel: pip install 'scnas[monai]'.
"""


@dataclass
class BundleReport:
    path: Path
    files: list[str]
    seconds: float
    _: KW_ONLY
    onnx: Any = None   # the ExportReport of models/model.onnx, when asked for


def export_bundle(model_path: str | os.PathLike, output: str | os.PathLike, onnx: bool = False,
                  *, say: Callable[[str], None] = lambda message: None) -> BundleReport:
    """Write the bundle of the model file ``model_path`` into the new folder ``output``.

    An existing ``output`` is refused (nothing is written); the bundle is written into a
    temporary folder beside it and renamed into place when complete. ``onnx``: also
    ``models/model.onnx``, verified in onnxruntime against PyTorch (``scnas export-onnx``).

    Args:
        model_path: a ``.safetensors`` model file from ``scnas train``.
        output: the bundle folder to make (must not exist).
        onnx: also write ``models/model.onnx``, verified in onnxruntime.
        say: prints notices.
    """
    import torch

    from scnas.build import build_network
    from scnas.build.model_file import ModelFileError, load_weights, read_model_info

    start = time.perf_counter()
    name = str(model_path)
    target = Path(output)
    if target.exists() or target.is_symlink():
        raise BundleError("already exists; give a new folder for the bundle (nothing was written)", source=str(target))
    if name.lower().endswith(".onnx"):
        raise ModelFileError("is an ONNX file; export the bundle from the .safetensors model file", source=name)
    info = read_model_info(model_path)
    preprocessing = _preprocessing_of(info, name)
    meta = bundle_metadata(info, preprocessing, Path(name).name)
    config = inference_config(info, preprocessing)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"folder {str(parent)!r} does not exist", source=str(target))
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=parent))
    except OSError as exc:
        raise OutputError(f"cannot write in {str(parent)!r}: {exc.strerror or exc}", source=str(target)) from None
    try:
        for folder in ("configs", "models", "docs"):
            (staging / folder).mkdir()
        (staging / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        (staging / "configs" / "inference.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / "docs" / "README.md").write_text(BUNDLE_README.format(name=meta["name"], model=Path(name).name))
        # Inference never uses the deep-supervision heads: the bundle's network has none.
        model = build_network(info.genotype, info.config.model_copy(update={"deep_supervision": False}))
        load_weights(model, model_path)
        torch.save(model.eval().state_dict(), staging / "models" / "model.pt")
        report = None
        if onnx:
            from scnas.export import export_onnx

            say("exporting and verifying models/model.onnx (10-20 s)")
            report = export_onnx(model, staging / "models" / "model.onnx", preprocessing=preprocessing)
        from scnas.fileio import give_default_mode

        give_default_mode(staging)   # mkdtemp made it 0700; a bundle is an ordinary folder
        try:
            os.rename(staging, target)   # fails if the target appeared meanwhile and is not empty
        except OSError as exc:
            raise BundleError(f"cannot be created: {exc.strerror or exc} (nothing was written)",
                              source=str(target)) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    return BundleReport(target, files, time.perf_counter() - start, onnx=report)
