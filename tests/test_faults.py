"""Faults found by hostile testing (issue 15, failures 2-10): each gets a clear error that names
the file or case and the fault, exit 1 (never the crash code 3), and the good cases go on.

Read-only folders: the tests run as root, for whom chmod does not block writes, so a read-only
file system is simulated by making ``os.mkdir``/``os.open`` fail with EROFS under one folder
(the real thing, a read-only tmpfs mount, gives the same messages; checked by hand)."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import stat

import nibabel as nib
import numpy as np
import pytest
import torch

from scnas.build import BuildConfig, build_network, save_model
from scnas.cli.main import interrupted_message
from scnas.data import Cache, DatasetError, check_dataset, read_dataset, write_phantom_dataset
from scnas.data.dataset import DEFLATE_MAX_RATIO
from scnas.genotype import builtin_genotype
from scnas.train import predict_folder
from scnas.train.predict import PredictError

SHAPE = (12, 12, 10)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A 5-case MSD phantom (2 channels, labels 0..2) at 1 mm: copy it before breaking it."""
    return write_phantom_dataset(tmp_path_factory.mktemp("faults") / "task", cases=5, channels=2, classes=2,
                                 shape=SHAPE, spacing=(1.0, 1.0, 1.0), seed=3)


@pytest.fixture
def copy(task, tmp_path):
    return shutil.copytree(task, tmp_path / "task")


def _huge_header_nifti(path, shape=(30000, 30000, 30000, 4)):
    """A .nii.gz whose header claims ``shape`` float32 voxels, with a 400-byte payload."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape(shape)
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + np.zeros(100, np.float32).tobytes()))


def _zero_affine(path):
    """Rewrite a NIfTI with an all-zero sform (and no qform): an all-zero affine."""
    image = nib.load(str(path))
    header = image.header.copy()
    header["sform_code"], header["qform_code"] = 1, 0
    for row in ("srow_x", "srow_y", "srow_z"):
        header[row] = 0
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), None, header), str(path))
    assert not np.any(nib.load(str(path)).affine[:3])


def _lines_for(text, case_id):
    return [line for line in text.splitlines() if case_id in line]


# ------------------------------------------------------------ 2: a header that claims too much


def test_a_header_claiming_more_voxels_than_its_file_holds_is_refused_before_reading(copy, cli, tmp_path):
    image = copy / "imagesTr" / "phantom_001.nii.gz"
    _huge_header_nifti(image)
    count, lines = check_dataset(copy)
    assert count == 5 and len(lines) == 1
    assert lines[0].startswith(f"{image}: case phantom_001: its header declares 30000x30000x30000x4 voxels")
    assert "more than a" in lines[0] and "gzip file can hold" in lines[0]
    result = cli("data", "check", copy)
    assert result.code == 1 and "phantom_001" in result.out and "internal error" not in result.err, result
    # preparation reports the case and prepares every other one
    result = cli("data", "prepare", copy, "-o", tmp_path / "cache", "--spacing", "1", "1", "1", "--workers", "1")
    assert result.code == 1 and "internal error" not in result.err and "Traceback" not in result.err, result
    assert len(_lines_for(result.err, "phantom_001")) == 1 and "30000x30000x30000x4" in result.err
    prepared = sorted(p.stem for p in (tmp_path / "cache").glob("phantom_*.json"))
    assert prepared == ["phantom_000", "phantom_002", "phantom_003", "phantom_004"]


def test_an_uncompressed_file_shorter_than_its_header_says_and_a_volume_larger_than_memory(copy, monkeypatch):
    source = nib.load(str(copy / "imagesTr" / "phantom_002.nii.gz"))
    plain = copy / "imagesTr" / "phantom_002.nii"
    nib.save(source, str(plain))
    plain.write_bytes(plain.read_bytes()[:-100])                  # cut: 100 bytes short of the header's promise
    meta = json.loads((copy / "dataset.json").read_text())
    meta["training"][2]["image"] = "./imagesTr/phantom_002.nii"
    (copy / "dataset.json").write_text(json.dumps(meta))
    _, lines = check_dataset(copy)
    assert len(lines) == 1 and "case phantom_002" in lines[0] and "but the file has" in lines[0], lines
    # a header whose size the file could hold, but no memory could
    import scnas.data.dataset as dataset_module

    monkeypatch.setattr(dataset_module, "memory_bytes", lambda: 1000)
    _, lines = check_dataset(copy)
    assert len(lines) == 5 and all("more than this machine's 1000 bytes of memory" in line or "phantom_002" in line
                                   for line in lines), lines


def test_check_reports_a_case_that_does_not_fit_in_memory_and_goes_on(copy, monkeypatch):
    import scnas.data.check as check_module

    real = check_module.load_case

    def short_of_memory(dataset, case, *args, **kwargs):
        if case.case_id == "phantom_002":
            raise MemoryError
        return real(dataset, case, *args, **kwargs)

    monkeypatch.setattr(check_module, "load_case", short_of_memory)
    count, lines = check_dataset(copy)
    assert count == 5 and lines == [f"{copy / 'imagesTr' / 'phantom_002.nii.gz'}: case phantom_002: does not fit in "
                                    "this machine's memory"]


def test_the_deflate_bound_is_a_true_bound():
    """What makes refusing by the ratio safe: the most compressible data (zeros) stays under it."""
    zeros = bytes(64 << 20)
    assert len(zeros) <= DEFLATE_MAX_RATIO * len(gzip.compress(zeros, 9))


# ------------------------------------------------------------ 3, 4: output folders


def _read_only_under(monkeypatch, root):
    """Make creating, renaming and removing folders and files under ``root`` fail as on a
    read-only file system."""
    root = str(root)
    real_mkdir, real_open = os.mkdir, os.open
    real = {name: getattr(os, name) for name in ("replace", "rename", "rmdir", "unlink")}

    def refuses(path):
        return os.path.abspath(os.fsdecode(path)).startswith(root)

    def mkdir(path, *args, **kwargs):
        if refuses(path):
            raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if refuses(path) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    def refusing(name):
        def call(*args, **kwargs):
            if any(refuses(path) for path in args[:2] if isinstance(path, (str, bytes, os.PathLike))):
                raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(args[0]))
            return real[name](*args, **kwargs)
        return call

    for name in real:
        monkeypatch.setattr(os, name, refusing(name))
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)


COMMANDS = {
    "data prepare": lambda task, out: ("data", "prepare", task, "-o", out, "--spacing", "1", "1", "1"),
    "data phantom": lambda task, out: ("data", "phantom", out, "--cases", "1", "--shape", "8", "8", "8"),
    "search": lambda task, out: ("search", "--data", task, "-o", out, "--stem", "2", "--patch", "16", "16", "16",
                                 "--epochs", "1", "--steps-per-epoch", "1", "--spacing", "1", "1", "1"),
    "train": lambda task, out: ("train", "minimal", "--data", task, "-o", out, "--stem", "2", "--patch", "16", "16",
                                "16", "--epochs", "1", "--steps-per-epoch", "1", "--spacing", "1", "1", "1"),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_read_only_output_folder_is_named_and_exits_1(command, task, tmp_path, cli, monkeypatch):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    _read_only_under(monkeypatch, read_only)
    for out in (read_only / "out", read_only):     # a folder to create in it, and the folder itself
        result = cli(*COMMANDS[command](task, out))
        assert result.code == 1, (out, result)
        assert "Read-only file system" in result.err and str(read_only) in result.err, result
        assert "internal error" not in result.err and "Traceback" not in result.err
    assert list(read_only.iterdir()) == []


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_output_path_that_is_a_file_is_named_and_exits_1(command, task, tmp_path, cli):
    existing = tmp_path / "a-file"
    existing.write_text("mine\n")
    out = existing / "out" if command == "data phantom" else existing
    result = cli(*COMMANDS[command](task, out))
    assert result.code == 1 and "internal error" not in result.err, result
    assert f"'{existing}' is a file, not a folder" in result.err or f"{existing}: is a file, not a folder" in \
        result.err, result
    assert existing.read_text() == "mine\n"


def test_an_environment_oserror_is_an_error_not_a_crash(cli, monkeypatch, tmp_path):
    import scnas.data

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ph" / "x.nii.gz"))

    monkeypatch.setattr(scnas.data, "write_phantom_dataset", full_disk)
    result = cli("data", "phantom", tmp_path / "ph")
    assert result.code == 1 and f"error: {tmp_path / 'ph' / 'x.nii.gz'}: No space left on device" in result.err, result

    def bug(*args, **kwargs):
        raise OSError("not an errno: a bug")

    monkeypatch.setattr(scnas.data, "write_phantom_dataset", bug)
    assert cli("data", "phantom", tmp_path / "ph").code == 3


# ------------------------------------------------------------ 5, 7: affine, truncated cases in predict


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An untrained seeded network with preprocessing metadata for the phantom's channels."""
    torch.manual_seed(0)
    net = build_network(builtin_genotype("minimal"), BuildConfig(stem_channels=2, in_channels=2, num_classes=3, depth=2))
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_model(net, path, {"target_spacing": [1.0, 1.0, 1.0], "patch_size": [16, 16, 16],
                           "normalization": "zscore-nonzero", "channel_names": ["FLAIR", "T1w"],
                           "labels": {"background": 0, "class1": 1, "class2": 2}})
    return path


def test_a_singular_affine_is_refused_by_check_prepare_and_predict(copy, cli, tmp_path, model):
    _zero_affine(copy / "imagesTr" / "phantom_003.nii.gz")
    _zero_affine(copy / "labelsTr" / "phantom_003.nii.gz")
    _, lines = check_dataset(copy)
    assert len(lines) == 1 and "case phantom_003" in lines[0] and "affine" in lines[0] and "singular" in lines[0]
    result = cli("data", "prepare", copy, "-o", tmp_path / "cache", "--spacing", "1", "1", "1", "--workers", "1")
    assert result.code == 1 and len(_lines_for(result.err, "phantom_003")) == 1 and "singular" in result.err, result
    assert not (tmp_path / "cache" / "phantom_003.json").exists() and (tmp_path / "cache" / "phantom_004.json").exists()
    with pytest.raises(PredictError) as raised:
        predict_folder(model, copy / "imagesTr", tmp_path / "pred", device="cpu", progress=False)
    assert any("phantom_003" in line and "singular" in line for line in raised.value.lines())
    assert not (tmp_path / "pred" / "phantom_003.nii.gz").exists()


def test_predict_writes_every_readable_case_and_lists_the_others(copy, cli, tmp_path, model):
    images = copy / "imagesTr"
    data = (images / "phantom_001.nii.gz").read_bytes()
    (images / "phantom_001.nii.gz").write_bytes(data[: len(data) // 3])      # truncated
    _huge_header_nifti(images / "phantom_002.nii.gz")
    _zero_affine(images / "phantom_003.nii.gz")
    result = cli("predict", model, "-i", images, "-o", tmp_path / "pred", "--device", "cpu")
    assert result.code == 1 and "wrote 2 of 5 segmentation(s)" in result.err, result
    for case_id, words in (("phantom_001", "cannot read"), ("phantom_002", "30000x30000x30000x4"),
                           ("phantom_003", "singular")):
        assert len(_lines_for(result.err, case_id)) == 1 and words in _lines_for(result.err, case_id)[0], result
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["phantom_000.nii.gz", "phantom_004.nii.gz"]


# ------------------------------------------------------------ 6, 8, 9: what a case holds


def test_a_training_entry_without_a_label_is_refused_naming_the_case(copy, cli, tmp_path):
    meta = json.loads((copy / "dataset.json").read_text())
    del meta["training"][4]["label"]
    (copy / "dataset.json").write_text(json.dumps(meta))
    _, lines = check_dataset(copy)
    assert len(lines) == 1 and "case phantom_004" in lines[0] and "has no 'label'" in lines[0]
    result = cli("data", "prepare", copy, "-o", tmp_path / "cache", "--spacing", "1", "1", "1", "--workers", "1")
    assert result.code == 1 and "case phantom_004: its training entry has no 'label'" in result.err, result
    assert not (tmp_path / "cache" / "phantom_004.json").exists()
    assert not (tmp_path / "cache" / "cache.json").exists() and not (tmp_path / "cache" / "splits_final.json").exists()


def test_a_zero_size_axis_and_a_2d_multichannel_image_are_described_as_what_they_are(copy):
    nib.save(nib.Nifti1Image(np.zeros((12, 0, 10, 2), np.float32), np.eye(4)), str(copy / "imagesTr" / "phantom_001.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((12, 12, 2), np.float32), np.eye(4)), str(copy / "imagesTr" / "phantom_002.nii.gz"))
    _, lines = check_dataset(copy)
    assert len(lines) == 2, lines
    assert "case phantom_001: its header declares shape (12, 0, 10, 2): an axis of size 0" in lines[0]
    assert "case phantom_002: image is a 3D array of shape (12, 12, 2) whose last axis has 2 entries: a 2D " \
           "image with 2 channels?" in lines[1]
    assert "1 dimensions" not in " ".join(lines) and "1 channel(s)" not in " ".join(lines)


@pytest.mark.parametrize("flavour", ["msd", "nnunetv2"])
def test_label_values_with_gaps_are_refused_with_the_values_and_a_renumbering(flavour, tmp_path, cli):
    task = write_phantom_dataset(tmp_path / "task", cases=2, channels=1, classes=2, shape=(8, 8, 8), layout=flavour)
    meta = json.loads((task / "dataset.json").read_text())
    if flavour == "msd":
        meta["labels"] = {"0": "background", "1": "edema", "4": "enhancing"}
    else:
        meta["labels"] = {"background": 0, "edema": 1, "enhancing": 4}
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError) as raised:
        read_dataset(task)
    message = str(raised.value)
    assert message.startswith(f"{task / 'dataset.json'}: 'labels' declares the values [0, 1, 4]") and "4 -> 2" in message
    for command in (("data", "check", task), ("data", "prepare", task, "-o", tmp_path / "cache")):
        result = cli(*command)
        assert result.code == 1 and "declares the values [0, 1, 4]" in result.err, result
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------ 10: resume, temporaries, modes, Ctrl-C


@pytest.fixture(scope="module")
def runs(task, tmp_path_factory):
    """A finished one-step search and one-step training on the phantom."""
    from scnas.cli import main

    root = tmp_path_factory.mktemp("runs")
    common = ("--patch", "16", "16", "16", "--epochs", "1", "--steps-per-epoch", "1", "--spacing", "1", "1", "1",
              "--device", "cpu", "--workers", "0")
    assert main(["search", "--data", str(task), "-o", str(root / "search"), "--stem", "2", "--no-plots",
                 *common]) == 0
    assert main(["train", "minimal", "--data", str(task), "-o", str(root / "train"), "--stem", "2", "--batch-size", "1",
                 *common]) == 0
    return root


def test_resume_refuses_a_setting_it_would_ignore_and_takes_those_that_may_change(runs, cli):
    search = runs / "search"
    before = (search / "checkpoint.pt").read_bytes()
    result = cli("search", "--resume", "-o", search, "--stem", "3", "--tau-max", "5")
    assert result.code == 1, result
    assert "--stem 3 (the run's: 2)" in result.err and "--tau-max 5.0 (the run's: 10.0)" in result.err, result
    assert (search / "checkpoint.pt").read_bytes() == before
    # the run's own values, given again, and settings that may change are accepted
    result = cli("search", "--resume", "-o", search, "--stem", "2", "--workers", "0", "--no-plots", "--device", "cpu")
    assert result.code == 0, result
    train = runs / "train"
    result = cli("train", "minimal", "--resume", "-o", train, "--lr", "0.1")
    assert result.code == 1 and "--lr 0.1 (the run's: 0.0003)" in result.err, result
    result = cli("train", "uresnet", "--resume", "-o", train)
    assert result.code == 1 and "GENOTYPE uresnet is another one" in result.err, result
    assert cli("train", "minimal", "--resume", "-o", train, "--workers", "0", "--device", "cpu").code == 0


def test_a_rerun_removes_what_a_killed_preparation_left(task, tmp_path, cli):
    cache = tmp_path / "cache"
    args = ("data", "prepare", task, "-o", cache, "--spacing", "1", "1", "1", "--workers", "1")
    assert cli(*args).code == 0
    leftovers = [cache / ".cache.json.k2j3h4.tmp", cache / ".phantom_001.json.a8b7.tmp",
                 cache / ".phantom_002.x1y2.partial.b2nd", cache / ".phantom_003.preparing"]
    for path in leftovers:
        path.write_bytes(b"half")
    (cache / "phantom_000.json").unlink()      # one case to prepare again, as after a kill
    assert cli(*args).code == 0
    assert not [path for path in leftovers if path.exists()]
    assert Cache(cache).case_ids == [f"phantom_{i:03d}" for i in range(5)]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_predictions_and_phantom_folders_follow_the_umask(umask, task, tmp_path, model):
    previous = os.umask(umask)
    try:
        phantom = write_phantom_dataset(tmp_path / "ph", cases=1, channels=2, classes=2, shape=(8, 8, 8))
        written = predict_folder(model, task / "imagesTr" / "phantom_000.nii.gz", tmp_path / "pred", device="cpu",
                                 progress=False)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(phantom.stat().st_mode) == 0o777 & ~umask
    assert [stat.S_IMODE(path.stat().st_mode) for path in written] == [0o666 & ~umask]


def test_ctrl_c_says_what_was_kept_and_how_to_go_on(cli, monkeypatch, tmp_path):
    import scnas.data

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scnas.data, "write_phantom_dataset", interrupted)
    result = cli("data", "phantom", tmp_path / "ph")
    assert result.code == 130 and result.err.strip().startswith("interrupted"), result
    assert len(result.err.strip().splitlines()) == 1
    run = tmp_path / "run"
    args = ["search", "--data", "task", "-o", str(run)]
    assert "nothing to resume" in interrupted_message(args)
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    assert interrupted_message(args).endswith(f"continue with: scnas search --data task -o {run} --resume")
    assert "prepare the rest with: scnas data prepare t" in interrupted_message(["data", "prepare", "t"])
