"""scnas export-bundle: a MONAI bundle that MONAI's own runner executes and MONAI's own verifiers
accept, whose labels agree with 'scnas predict' on phantom cases; inputs it refuses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from scnas.build import BuildConfig, build_network, save_model
from scnas.cli import main
from scnas.data import write_phantom_dataset
from scnas.genotype import builtin_genotype

SCHEMA = "SCNAS_MONAI_SCHEMA"
"""A local copy of the metadata schema the bundle names (``verify_metadata`` downloads it otherwise)."""
MIN_AGREEMENT = 0.9999            # share of all voxels with the same label as 'scnas predict' (measured: all)
MIN_FOREGROUND_AGREEMENT = 0.999  # ... of the voxels either of the two calls foreground (measured: all)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A phantom task on an anisotropic grid (1 x 1 x 2 mm) and a network trained on it for 50
    steps at 0.9 x 0.9 x 1.5 mm (validation Dice 0.94), so that preprocessing resamples every
    axis, three windows overlap along x and y (where MONAI's own placement differs from
    scnas's), and the labels are worth comparing. Deep supervision on: the export drops the heads."""
    root = tmp_path_factory.mktemp("bundle")
    task = write_phantom_dataset(root / "task", cases=5, channels=2, foreground_classes=2, shape=(32, 32, 16),
                                 spacing=(1.0, 1.0, 2.0), seed=3)
    code = main(["train", "minimal", "--data", str(task), "-o", str(root / "run"), "--stem", "4", "--patch", "16",
                 "16", "16", "--batch-size", "2", "--micro-batch", "2", "--epochs", "5", "--steps-per-epoch", "10",
                 "--lr", "0.01", "--spacing", "0.9", "0.9", "1.5", "--device", "cpu", "--seed", "0", "--workers", "0",
                 "--deep-supervision"])
    assert code == 0
    return root / "run" / "model.safetensors", task


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory):
    model, _ = trained
    folder = tmp_path_factory.mktemp("exported") / "bundle"
    assert main(["export-bundle", str(model), "-o", str(folder)]) == 0
    return folder


def _labels(folder: Path) -> dict[str, nib.Nifti1Image]:
    return {path.name: nib.load(str(path)) for path in sorted(folder.glob("*.nii.gz"))}


def _monai(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "monai.bundle", *map(str, args)], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_monai_bundle_run_agrees_with_scnas_predict(trained, bundle, tmp_path, cli):
    """``python -m monai.bundle run`` writes one label file per case on the input's grid, with
    the input's affine, and the labels of 'scnas predict' (measured: every voxel; the bounds
    leave room for float rounding at a tie on other CPUs; docs/integrations.md)."""
    model, task = trained
    _monai("run", "--config_file", bundle / "configs" / "inference.json", "--meta_file",
           bundle / "configs" / "metadata.json", "--bundle_root", bundle, "--dataset_dir", task / "imagesTr",
           "--output_dir", tmp_path / "monai")
    assert cli("predict", model, "-i", task / "imagesTr", "-o", tmp_path / "scnas", "--device", "cpu").code == 0
    ours, theirs = _labels(tmp_path / "scnas"), _labels(tmp_path / "monai")
    assert sorted(theirs) == sorted(ours) == [f"phantom_{i:03d}.nii.gz" for i in range(5)]
    same = total = same_foreground = foreground = 0
    for name, image in ours.items():
        source = nib.load(str(task / "imagesTr" / name))
        label, other = np.asarray(image.dataobj), np.asarray(theirs[name].dataobj)
        assert other.shape == label.shape == source.shape[:3]
        np.testing.assert_allclose(theirs[name].affine, source.affine)
        assert theirs[name].get_data_dtype() == np.uint8
        fractions = np.bincount(label.ravel(), minlength=3) / label.size
        assert fractions[1] > 0.01 and fractions[2] > 0.005, (name, fractions)  # both classes predicted
        either = (label > 0) | (other > 0)
        same += int((label == other).sum())
        total += label.size
        same_foreground += int(((label == other) & either).sum())
        foreground += int(either.sum())
    assert same / total >= MIN_AGREEMENT, same / total
    assert same_foreground / foreground >= MIN_FOREGROUND_AGREEMENT, same_foreground / foreground


def test_monai_verifiers_accept_the_bundle_and_catch_a_wrong_one(trained, bundle):
    """MONAI's verify_net_in_out builds ``network_def`` from the inline genotype and checks the
    output channels and dtype the metadata declares (a wrong count fails); the workflow has
    every property MONAI requires of an inference bundle; metadata.json has every key of
    MONAI's own bundle template."""
    from monai.bundle import ConfigWorkflow, verify_net_in_out
    from monai.bundle.utils import DEFAULT_METADATA

    configs = bundle / "configs"
    verify_net_in_out(net_id="network_def", meta_file=str(configs / "metadata.json"),
                      config_file=str(configs / "inference.json"), device="cpu", n=2)
    with pytest.raises(ValueError, match="output channel number"):
        verify_net_in_out(net_id="network_def", meta_file=str(configs / "metadata.json"),
                          config_file=str(configs / "inference.json"), device="cpu", n=2,
                          **{"_meta_#network_data_format#outputs#pred#num_channels": 4})
    workflow = ConfigWorkflow(config_file=str(configs / "inference.json"), meta_file=str(configs / "metadata.json"),
                              workflow_type="infer", bundle_root=str(bundle), dataset_dir=str(trained[1] / "imagesTr"))
    workflow.initialize()
    assert workflow.check_properties() == []
    metadata = json.loads((configs / "metadata.json").read_text())
    assert set(DEFAULT_METADATA) <= set(metadata)


def test_verify_metadata_accepts_the_bundle_and_refuses_a_key_missing(bundle, tmp_path):
    """MONAI's verify_metadata against the schema the bundle names: from $SCNAS_MONAI_SCHEMA
    when set (verify_metadata then skips its download), else downloaded; skipped only when
    neither is possible (no network). Without a required key the same check fails."""
    from monai.bundle import verify_metadata

    schema = tmp_path / "schema.json"
    if os.environ.get(SCHEMA):
        shutil.copyfile(os.environ[SCHEMA], schema)
    meta = bundle / "configs" / "metadata.json"
    try:
        verify_metadata(meta_file=str(meta), filepath=str(schema))
    except OSError as exc:   # urllib's URLError: no network and no local copy
        pytest.skip(f"MONAI's metadata schema could not be downloaded ({exc}); set {SCHEMA} to a local copy")
    damaged = json.loads(meta.read_text())
    del damaged["network_data_format"]
    (tmp_path / "metadata.json").write_text(json.dumps(damaged))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(schema))


def test_channel_files_make_one_case_with_the_same_preprocessing(bundle, tmp_path):
    """A case given as CASE_0000/CASE_0001 files is one item whose bundle preprocessing equals
    that of the same case as one 4D file, and its output is named CASE.nii.gz."""
    from monai.bundle import ConfigParser

    from scnas.integrations.monai_bundle import bundle_datalist, case_file_name

    image = np.random.default_rng(0).normal(10, 2, size=(20, 18, 12, 2)).astype(np.float32)
    image[:3] = 0
    affine = np.diag([0.9, 1.1, 2.0, 1.0])
    for folder in ("single", "split"):
        (tmp_path / folder).mkdir()
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "single" / "case7.nii.gz"))
    for channel in range(2):
        nib.save(nib.Nifti1Image(image[..., channel], affine), str(tmp_path / "split" / f"case7_{channel:04d}.nii.gz"))
    split = bundle_datalist(tmp_path / "split")
    assert split == [{"image": [str(tmp_path / "split" / f"case7_{c:04d}.nii.gz") for c in range(2)]}]
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    preprocessing = parser.get_parsed_content("preprocessing")
    one = preprocessing(dict(bundle_datalist(tmp_path / "single")[0]))["image"]
    two = preprocessing(dict(split[0]))["image"]
    assert one.shape == two.shape and one.shape[0] == 2
    np.testing.assert_array_equal(one.numpy(), two.numpy())
    assert case_file_name({"filename_or_obj": split[0]["image"][0]}, None)["subject"] == "case7"
    assert case_file_name({"filename_or_obj": str(tmp_path / "single" / "case7.nii.gz")}, None)["subject"] == "case7"


def test_labels_from_maps_draws_the_highest_label_at_half_and_background_below():
    """Resampled one-hot maps become labels as scnas's per-label rule decides: a tie at 0.5
    goes to the higher label (an argmax would pick the lower), no map >= 0.5 is background."""
    from scnas.integrations.monai_bundle import labels_from_maps

    maps = torch.tensor([[0.5, 0.2, 0.4, 0.0], [0.5, 0.8, 0.3, 0.0], [0.0, 0.0, 0.3, 1.0]]).view(3, 4, 1, 1)
    assert labels_from_maps(maps).view(-1).tolist() == [1, 1, 0, 2]


def test_export_bundle_refuses_an_existing_folder(trained, tmp_path, cli):
    model, _ = trained
    for target in (tmp_path / "full", tmp_path / "empty"):
        target.mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    for target in (tmp_path / "full", tmp_path / "empty"):
        result = cli("export-bundle", model, "-o", target)
        assert result.code == 1
        assert result.err.strip() == f"error: {target}: already exists; give a new folder for the bundle (nothing " \
                                     "was written)"
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["empty", "full", "full/keep.txt"]


def test_export_bundle_refuses_files_that_are_not_scnas_models(tmp_path, cli):
    """A file that is no safetensors file, a safetensors file without scnas metadata, an ONNX
    file, a model without preprocessing (an untrained 'scnas build -o') and one whose recorded
    preprocessing the bundle cannot repeat: one line each, exit 1, no bundle and no temporary
    folder left."""
    from safetensors.torch import save_file

    (tmp_path / "notes.safetensors").write_text("not a model")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    torch.manual_seed(0)
    network = build_network(builtin_genotype("minimal"), BuildConfig(stem_channels=2, in_channels=1, num_classes=2,
                                                                     depth=2))
    save_model(network, tmp_path / "untrained.safetensors")
    save_model(network, tmp_path / "ct.safetensors", {"target_spacing": [1, 1, 1], "patch_size": [8, 8, 8],
                                                      "normalization": "ct-percentile"})
    expected = {"notes.safetensors": "not a safetensors model file",
                "other.safetensors": "has no scnas metadata",
                "model.onnx": "is an ONNX file; export the bundle from the .safetensors model file",
                "untrained.safetensors": "has no preprocessing settings (target_spacing, patch_size)",
                "ct.safetensors": "records preprocessing normalization='ct-percentile'; the bundle's MONAI transforms "
                                  "reproduce normalization='zscore-nonzero' only"}
    before = sorted(p.name for p in tmp_path.iterdir())
    for name, message in expected.items():
        result = cli("export-bundle", tmp_path / name, "-o", tmp_path / "bundle")
        assert result.code == 1, result
        lines = result.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / name}: ") and message in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_failed_export_leaves_nothing(trained, tmp_path, monkeypatch):
    """The bundle is written into a temporary folder and renamed at the end: a failure while
    writing (here: the weights) leaves neither the bundle nor the temporary folder."""
    import scnas.integrations.monai_bundle as monai_bundle

    model, _ = trained

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError):
        monai_bundle.export_bundle(model, tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


def test_onnx_goes_into_models_from_the_network_without_heads(trained, tmp_path, monkeypatch):
    """--onnx hands export_onnx (verified in tests/test_export.py) the bundle's own network, with no
    deep-supervision heads, and the model's preprocessing, and the file ends up in models/."""
    import scnas.export

    model, _ = trained
    calls = []

    def export_onnx(network, path, preprocessing=None):
        calls.append((network.config.deep_supervision, preprocessing["patch_size"], sorted(network.state_dict())))
        Path(path).write_bytes(b"onnx")
        return scnas.export.ExportReport(str(path), "float32", 18, export_seconds=0.0, file_bytes=4, provider="cpu")

    monkeypatch.setattr(scnas.export, "export_onnx", export_onnx)
    assert main(["export-bundle", str(model), "-o", str(tmp_path / "bundle"), "--onnx"]) == 0
    assert (tmp_path / "bundle" / "models" / "model.onnx").read_bytes() == b"onnx"
    weights = torch.load(tmp_path / "bundle" / "models" / "model.pt", weights_only=True)
    assert calls == [(False, [16, 16, 16], sorted(weights))]


@pytest.mark.parametrize("direction, origin", [
    ([1.0, 1.0, 2.0], [2.0, 2.0, 2.0]),
    ([1.0, 1.0, 2.0], [0.0, 0.0, 0.0]),       # Spacingd's own offset is off here (np.sign(0))
    ([-1.0, -1.0, 2.0], [120.0, 100.0, -30.0]),
    ("rotated", [10.0, -4.0, 7.0])])
def test_whole_voxel_spacing_resamples_exactly_as_scnas(direction, origin):
    """WholeVoxelSpacingd gives the voxels scnas's resample_image gives (scipy zoom, cubic, on
    round(n * spacing / target) voxels) for any orientation and origin, and its inverse returns
    the input's grid: shape and affine."""
    from monai.data import MetaTensor

    from scnas.data.preprocess import resample_image
    from scnas.integrations.monai_bundle import WholeVoxelSpacingd

    if direction == "rotated":
        angle = np.deg2rad(20)
        linear = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]) \
            @ np.diag([1.0, 1.0, 2.0])
    else:
        linear = np.diag(direction)
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, origin
    image = np.random.default_rng(0).normal(size=(2, 27, 25, 14)).astype(np.float32)
    transform = WholeVoxelSpacingd("image", (1.5, 1.5, 1.5), mode=3, padding_mode="nearest")
    out = transform({"image": MetaTensor(torch.from_numpy(image.copy()), affine=torch.from_numpy(affine))})["image"]
    assert tuple(out.shape) == (2, 18, 17, 19)              # 27 x 1, 25 x 1, 14 x 2 mm at 1.5 mm, rounded
    np.testing.assert_allclose(out.numpy(), resample_image(image, (18, 17, 19)), atol=1e-5)
    back = transform.inverse({"image": out})["image"]
    assert tuple(back.shape) == image.shape
    np.testing.assert_allclose(np.asarray(back.affine), affine, atol=1e-9)


def test_even_sliding_window_inferer_is_scnas_sliding_window():
    """The bundle's inferer gives scnas's logits (windows at 0, 7, 14 on an axis of 30, where
    MONAI's own would be at 0, 8, 14), for each image of a batch."""
    from scnas.integrations.monai_bundle import EvenSlidingWindowInferer
    from scnas.train.inference import sliding_window_logits

    torch.manual_seed(0)
    network = build_network(builtin_genotype("minimal"), BuildConfig(stem_channels=2, in_channels=2, num_classes=3,
                                                                     depth=2)).eval()
    images = torch.randn(2, 2, 30, 24, 19)
    inferer = EvenSlidingWindowInferer((16, 16, 16), 2, 0.5, mode="gaussian", sigma_scale=0.125, num_classes=3)
    with torch.inference_mode():
        logits = inferer(images, network)
        for image, result in zip(images, logits):
            torch.testing.assert_close(result, sliding_window_logits(image, network, (16, 16, 16), num_classes=3,
                                                                     overlap=0.5, batch_size=2))
