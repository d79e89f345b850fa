"""Medical Segmentation Decathlon task folders: ``dataset.json`` in the MSD v1 and the
nnU-Net v2 flavour, and the NIfTI images and labels they reference.

MSD v1: ``modality`` {"0": "FLAIR", ...}, ``labels`` {"0": "background", ...}, ``training`` a
list of {"image": "./imagesTr/X.nii.gz", "label": "./labelsTr/X.nii.gz"}; a multi-channel
image is one 4D NIfTI (x, y, z, channel). nnU-Net v2: ``channel_names`` {"0": "T2", ...},
``labels`` {"background": 0, ...}, ``file_ending``; images are ``imagesTr/CASE_0000.nii.gz``
(one file per channel) and labels ``labelsTr/CASE.nii.gz``. Files starting with ``._``
(macOS resource forks inside the MSD archives) are ignored.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import zlib
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scnas.errors import ScnasError
from scnas.fileio import check_input_file, read_bytes_bounded

MAX_DATASET_JSON_BYTES = 64 << 20


class DatasetError(ScnasError):
    """A dataset that cannot be read as described: the message names the case and the file."""


@dataclass
class Case:
    """One training case: its image file(s) (one 4D file, or one file per channel) and label."""

    case_id: str
    images: list[Path]
    label: Path | None


@dataclass
class Dataset:
    """A task folder, read."""

    root: Path
    name: str
    flavour: str                      # "msd" or "nnunetv2"
    _: KW_ONLY
    channel_names: list[str]
    labels: dict[str, int]            # name -> value, background included
    cases: list[Case] = field(default_factory=list)
    file_ending: str = ".nii.gz"

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def case(self, case_id: str) -> Case:
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise DatasetError(f"no case {case_id!r} in this dataset", source=str(self.root))


def _hidden(path: Path | str) -> bool:
    return Path(path).name.startswith("._")


NIFTI_ENDINGS = (".nii.gz", ".nii")
"""The file-name endings of NIfTI files, longest first."""


def is_nifti(name: str) -> bool:
    """Whether a file name ends like a NIfTI file (.nii.gz or .nii)."""
    return name.endswith(NIFTI_ENDINGS)


def strip_nifti_ending(name: str) -> str:
    """A file name without its NIfTI ending (``CASE.nii.gz`` -> ``CASE``); other names unchanged."""
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return name


def read_dataset(root: str | Path) -> Dataset:
    """Read ``root/dataset.json`` (either flavour) and list the cases. Only the JSON is read;
    images are read by :func:`load_case`."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("is not a folder (expected a task folder with dataset.json)" if root.exists()
                           else "no such folder", source=str(root))
    description = root / "dataset.json"
    try:
        meta = json.loads(read_bytes_bounded(description, MAX_DATASET_JSON_BYTES, DatasetError).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"not valid JSON: {exc}", source=str(description)) from None
    if not isinstance(meta, dict):
        raise DatasetError("must be a JSON object", source=str(description))
    if "channel_names" in meta:
        return _read_nnunet_v2(root, meta, description)
    if "modality" in meta:
        return _read_msd(root, meta, description)
    raise DatasetError("has neither 'modality' (MSD) nor 'channel_names' (nnU-Net v2)", source=str(description))


def _channels(mapping: Any, key: str, source: Path) -> list[str]:
    if not isinstance(mapping, dict) or not mapping:
        raise DatasetError(f"'{key}' must map channel numbers to names", source=str(source))
    try:
        order = sorted(mapping, key=int)
    except ValueError:
        raise DatasetError(f"'{key}' keys must be channel numbers \"0\", \"1\", ...", source=str(source)) from None
    if [int(k) for k in order] != list(range(len(order))):
        raise DatasetError(f"'{key}' must number channels 0..{len(order) - 1}", source=str(source))
    return [str(mapping[k]) for k in order]


def _check_label_values(labels: dict[str, int], source: Path) -> None:
    """Label values must be 0 (background), 1, ..., K-1: the network's K outputs are those
    classes, and the loss one-hot encodes label maps with them."""
    values = sorted(labels.values())
    if values != list(range(len(values))):
        renumber = ", ".join(f"{old} -> {new}" for new, old in enumerate(values) if old != new)
        raise DatasetError(f"'labels' declares the values {values}; scnas needs them numbered 0 (background) to "
                           f"{len(values) - 1} without gaps or repeats: renumber them in dataset.json and the label "
                           f"files ({renumber or 'one value per label'})", source=str(source))


def _read_msd(root: Path, meta: dict, source: Path) -> Dataset:
    channels = _channels(meta.get("modality"), "modality", source)
    raw_labels = meta.get("labels")
    if not isinstance(raw_labels, dict):
        raise DatasetError("'labels' must map values to names, e.g. {\"0\": \"background\"}", source=str(source))
    try:
        labels = {str(name): int(value) for value, name in raw_labels.items()}
    except ValueError:
        raise DatasetError("'labels' keys must be integers (MSD: {\"0\": \"background\", ...})", source=str(source)) from None
    _check_label_values(labels, source)
    training = meta.get("training")
    if not isinstance(training, list):
        raise DatasetError("'training' must be a list of {\"image\": ..., \"label\": ...}", source=str(source))
    cases = []
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry:
            raise DatasetError(f"training[{i}] must have an 'image'", source=str(source))
        image = root / str(entry["image"])
        if _hidden(image):
            continue
        label = root / str(entry["label"]) if entry.get("label") else None
        cases.append(Case(strip_nifti_ending(image.name), [image], label))
    return Dataset(root, str(meta.get("name", root.name)), "msd", channel_names=channels, labels=labels, cases=cases)


def _read_nnunet_v2(root: Path, meta: dict, source: Path) -> Dataset:
    channels = _channels(meta.get("channel_names"), "channel_names", source)
    raw_labels = meta.get("labels")
    if not isinstance(raw_labels, dict):
        raise DatasetError("'labels' must map names to values, e.g. {\"background\": 0}", source=str(source))
    labels = {}
    for name, value in raw_labels.items():
        if isinstance(value, (list, tuple)):
            raise DatasetError(f"label {name!r} is a region (a list of values); region-based training is not "
                               "supported, give one value per label", source=str(source))
        if not isinstance(value, int) or isinstance(value, bool):
            raise DatasetError(f"label {name!r} must have an integer value", source=str(source))
        labels[str(name)] = value
    _check_label_values(labels, source)
    ending = str(meta.get("file_ending", ".nii.gz"))
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise DatasetError("no imagesTr folder", source=str(root))
    by_case: dict[str, dict[int, Path]] = {}
    for path in sorted(images_dir.iterdir()):
        if _hidden(path) or not path.name.endswith(ending):
            continue
        stem = path.name.removesuffix(ending)
        case_id, _, channel = stem.rpartition("_")
        if not case_id or not channel.isdigit() or len(channel) != 4:
            raise DatasetError(f"image file name must be CASE_XXXX{ending} (XXXX the channel)", source=str(path))
        by_case.setdefault(case_id, {})[int(channel)] = path
    cases = []
    for case_id, files in sorted(by_case.items()):
        images = [files.get(c, images_dir / f"{case_id}_{c:04d}{ending}") for c in range(len(channels))]
        label = labels_dir / f"{case_id}{ending}"
        cases.append(Case(case_id, images, label))
    return Dataset(root, str(meta.get("name", root.name)), "nnunetv2", channel_names=channels, labels=labels,
                   cases=cases, file_ending=ending)


@dataclass
class LoadedCase:
    """A case in memory: image (C, X, Y, Z) float32 in file axis order, label (X, Y, Z) int16."""

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    _: KW_ONLY
    affine: np.ndarray
    spacing: tuple[float, float, float]


DEFLATE_MAX_RATIO = 1032
"""Deflate (gzip, .nii.gz) cannot shrink data more than about 1032:1, so a .nii.gz of n bytes
holds at most 1032 n bytes of voxels: a header that declares more is wrong or the file cut."""


def _size(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def memory_bytes() -> int | None:
    """Physical memory of this machine, if the system says."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def declared_size_problem(image, path: Path) -> str | None:
    """What is wrong with the voxel count a NIfTI header declares, judged before reading any
    voxel: an axis of size 0; more voxel bytes than the file can hold (exactly for an
    uncompressed file, by deflate's maximum ratio for gzip); more than this machine's memory
    as float32 (what preparation needs, several times over)."""
    shape = tuple(int(n) for n in image.shape)
    if any(n == 0 for n in shape):
        return f"its header declares shape {shape}: an axis of size 0, so no voxels"
    voxels = math.prod(shape)
    declared = voxels * np.dtype(image.get_data_dtype()).itemsize
    size = path.stat().st_size
    offset = int(getattr(image.dataobj, "offset", 0) or 0)   # the header copy of a loaded image reads 0
    with path.open("rb") as fh:
        magic = fh.read(2)
    what = f"its header declares {'x'.join(map(str, shape))} voxels ({_size(declared)})"
    if magic == b"\x1f\x8b":
        if declared > DEFLATE_MAX_RATIO * size:
            return (f"{what}, more than a {_size(size)} gzip file can hold (deflate compresses at most "
                    f"{DEFLATE_MAX_RATIO}:1): a wrong header or a truncated file")
    elif path.name.endswith(".nii") and offset + declared > size:
        return f"{what} from byte {offset}, but the file has {size} bytes: a wrong header or a truncated file"
    memory = memory_bytes()
    if memory is not None and voxels * 4 > memory:
        return f"{what}: {_size(voxels * 4)} as float32, more than this machine's {_size(memory)} of memory"
    return None


def _load_nifti(path: Path, case_id: str):
    import nibabel as nib

    check_input_file(path, DatasetError)
    try:
        image = nib.load(str(path))
        problem = declared_size_problem(image, path)
        if problem:
            raise DatasetError(f"case {case_id}: {problem}", source=str(path))
        data = np.asanyarray(image.dataobj)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise DatasetError(f"case {case_id}: cannot read ({type(exc).__name__}: {str(exc)[:120]}); truncated or not a "
                           "NIfTI file?", source=str(path)) from None
    return image, data


def affine_problem(affine: np.ndarray, spacing: tuple[float, ...]) -> str | None:
    """Why an image's voxel-to-world matrix cannot place it in space (None when it can): not
    finite, or singular (e.g. all zero: a header whose sform and qform are unset or zeroed),
    or voxel sizes that are not positive."""
    if not np.all(np.isfinite(affine)):
        return "the header's affine (voxel-to-world matrix) has NaN/Inf entries"
    singular = np.linalg.svd(np.asarray(affine, np.float64)[:3, :3], compute_uv=False)
    if singular[0] == 0 or singular[-1] <= 1e-8 * singular[0]:
        return ("the header's affine (voxel-to-world matrix) is singular (all zero here)" if not np.any(affine[:3, :3])
                else "the header's affine (voxel-to-world matrix) is singular") + \
            ": the voxels have no place or size in space; fix the sform/qform of the file"
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        return f"voxel sizes {tuple(spacing)} in the header (pixdim) are not all positive"
    return None


def _channel_problem(found: int, shape: tuple[int, ...], dataset: Dataset, files: int) -> str:
    expected = f"expected {dataset.num_channels} ({', '.join(dataset.channel_names)})"
    if files == 1 and found == 1 and dataset.num_channels > 1 and shape[-1] == dataset.num_channels:
        return (f"image is a 3D array of shape {tuple(shape)} whose last axis has {shape[-1]} entries: a 2D image with "
                f"{shape[-1]} channels? scnas segments 3D volumes; {expected} channels as a 4D image (x, y, z, channel)")
    if files == 1 and found == 1:
        return f"image has 1 channel(s), {expected} (a single 3D volume {tuple(shape)}; channels come as a 4D image)"
    return f"image has {found} channel(s), {expected}"


def load_case(dataset: Dataset, case: Case, with_label: bool = True) -> LoadedCase:
    """Read a case's image channels and label, checking that they fit together."""
    if with_label and case.label is None:
        raise DatasetError(f"case {case.case_id}: its training entry has no 'label'; every training case needs a "
                           "label file (list unlabelled images under 'test')", source=str(dataset.root / "dataset.json"))
    channels, affine, spacing, shape = [], None, None, None
    for path in case.images:
        image, data = _load_nifti(path, case.case_id)
        if data.ndim == 4 and len(case.images) == 1:
            parts = [data[..., c] for c in range(data.shape[3])]
        elif data.ndim == 3:
            parts = [data]
        else:
            raise DatasetError(f"case {case.case_id}: image has {data.ndim} dimensions {data.shape}; a 3D task needs "
                               "3D volumes (or 4D x, y, z, channel)", source=str(path))
        if shape is None:
            shape, affine = parts[0].shape, image.affine
            spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
            problem = affine_problem(affine, spacing)
            if problem:
                raise DatasetError(f"case {case.case_id}: {problem}", source=str(path))
        elif parts[0].shape != shape or not np.allclose(image.affine, affine, atol=1e-3):
            raise DatasetError(f"case {case.case_id}: channel files differ in shape or affine", source=str(path))
        channels += parts
    if len(channels) != dataset.num_channels:
        raise DatasetError(f"case {case.case_id}: {_channel_problem(len(channels), shape, dataset, len(case.images))}",
                           source=str(case.images[0]))
    image_array = np.stack(channels).astype(np.float32, copy=False)
    label_array = None
    if with_label and case.label is not None:
        label_image, label_data = _load_nifti(case.label, case.case_id)
        if label_data.shape != shape:
            raise DatasetError(f"case {case.case_id}: label shape {label_data.shape} differs from image shape {shape}",
                               source=str(case.label))
        if not np.allclose(label_image.affine, affine, atol=1e-3):
            raise DatasetError(f"case {case.case_id}: label affine differs from the image affine", source=str(case.label))
        if np.issubdtype(label_data.dtype, np.floating):
            if not np.all(np.isfinite(label_data)) or np.any(label_data != np.round(label_data)):
                raise DatasetError(f"case {case.case_id}: label has non-integer values", source=str(case.label))
        label_array = np.asarray(label_data).astype(np.int16)
        undeclared = sorted(set(np.unique(label_array).tolist()) - set(dataset.labels.values()))
        if undeclared:
            raise DatasetError(f"case {case.case_id}: label values {undeclared} are not declared in dataset.json "
                               f"(declared: {sorted(dataset.labels.values())})", source=str(case.label))
    return LoadedCase(case.case_id, image_array, label_array, affine=np.asarray(affine), spacing=spacing)
