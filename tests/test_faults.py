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
    return write_phantom_dataset(tmp_path_factory.mktemp("faults") / "task", cases=5, channels=2, foreground_classes=2,
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
    task = write_phantom_dataset(tmp_path / "task", cases=2, channels=1, foreground_classes=2, shape=(8, 8, 8), layout=flavour)
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
        phantom = write_phantom_dataset(tmp_path / "ph", cases=1, channels=2, foreground_classes=2, shape=(8, 8, 8))
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


# ------------------------------------------------------------ issue 27: what scnas wrote, read back


SPACING = ("--spacing", "1", "1", "1")


def _prepare(task, cache, workers=1):
    from scnas.data import PrepareSettings, prepare_dataset

    return prepare_dataset(task, cache, PrepareSettings(target_spacing=(1.0, 1.0, 1.0)), workers=workers,
                           progress=False)


def _files(folder):
    """Every file of a cache (hidden ones too, but not the lock, which names its last holder) and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def prepared(task, tmp_path_factory):
    """An uninterrupted preparation of the phantom: copy it before breaking it."""
    cache = tmp_path_factory.mktemp("prepared") / "cache"
    _prepare(task, cache)
    return cache


@pytest.fixture
def damaged_cache(prepared, tmp_path):
    return shutil.copytree(prepared, tmp_path / "cache")


class Killed(BaseException):
    """What a SIGKILL would do to the preparation at that moment (not an Exception: nothing catches it)."""


@pytest.mark.parametrize("kill_at", [6, 9, 12, 16])
def test_a_preparation_killed_and_run_again_is_byte_identical_to_one_never_killed(task, tmp_path, monkeypatch,
                                                                                  kill_at):
    """Killed after its kill_at-th file write (settings.json, then per case image, label, foreground,
    record): the rerun must give the same files. Few foreground samples per label, so that which ones
    are drawn matters (the phantom's labels are small)."""
    import scnas.data.preprocess as preprocess
    import scnas.fileio as fileio

    monkeypatch.setattr(preprocess, "FOREGROUND_SAMPLES", 7)
    whole = tmp_path / "whole"
    _prepare(task, whole)
    real, writes = fileio.os.replace, []

    def replace(source, target):
        writes.append(target)
        if len(writes) == kill_at:
            raise Killed
        return real(source, target)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(Killed):
        _prepare(task, tmp_path / "killed")
    monkeypatch.setattr(fileio.os, "replace", real)
    report = _prepare(task, tmp_path / "killed")
    assert report.skipped and report.prepared     # it was killed half-way
    assert _files(tmp_path / "killed") == _files(whole)


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(p) for p in fh.read().split()]


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not os.path.exists("/proc/self/task") or
                    __import__("multiprocessing").get_start_method() != "fork",
                    reason="reads /proc (Linux); the workers must be the command's children (fork)")
def test_sigkill_of_a_parallel_preparation_takes_its_workers_and_lock_with_it(tmp_path):
    """The pool workers of a SIGKILLed 'data prepare --workers 2' die with it (they held the cache
    lock, so every later preparation waited for ever); the rerun finishes the cache, byte for byte
    the cache of a preparation never killed."""
    import signal
    import subprocess
    import sys
    import time

    task = write_phantom_dataset(tmp_path / "task", cases=10, channels=2, foreground_classes=2, shape=(40, 40, 20),
                                 spacing=(1.0, 1.0, 2.0), seed=5)
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "scnas", "data", "prepare", str(task), "-o", str(cache), *SPACING,
               "--workers", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(cache.glob("phantom_*.json")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.005)
    workers = _children(process.pid)
    process.send_signal(signal.SIGKILL)
    process.wait()
    try:
        assert len(workers) == 2 and not (cache / "cache.json").exists(), "killed too late to test anything"
        deadline = time.monotonic() + 10
        while not all(_gone(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_gone(pid) for pid in workers), "the pool workers outlived their parent"
    finally:
        for pid in workers:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0 and "skipped" in rerun.stdout, rerun
    _prepare(task, tmp_path / "whole", workers=2)
    assert _files(cache) == _files(tmp_path / "whole")


def test_a_process_waiting_for_the_cache_lock_says_for_whom(tmp_path, capsys):
    import fcntl
    import threading
    import time

    from scnas.data.preprocess import _exclusive

    tmp_path.joinpath(".lock").write_text("1\n")
    for holder, words in ((os.getpid(), f"waiting for process {os.getpid()}, which is preparing the cache"),
                          (_dead_pid(), "which is gone")):
        (tmp_path / ".lock").write_text(f"{holder}\n")
        with open(tmp_path / ".lock") as other:
            fcntl.flock(other, fcntl.LOCK_EX)
            waiter = threading.Thread(target=lambda: _exclusive(tmp_path, notice_after=0.2).__enter__().handle.close())
            waiter.start()
            time.sleep(0.8)
            assert waiter.is_alive()
        waiter.join(5)
        assert not waiter.is_alive()
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"


def _dead_pid():
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_single_byte_flip_in_a_cached_array_is_detected_before_use(damaged_cache):
    """40 single-byte flips spread over a case's image (the issue's scan found 36 of 40 used silently)."""
    from scnas.errors import DamagedFileError

    image = damaged_cache / "phantom_002.b2nd"
    original = image.read_bytes()
    offsets = np.linspace(0, len(original) - 1, 40).astype(int)
    for offset in offsets:
        _flip(image, offset)
        with pytest.raises(DamagedFileError) as raised:
            Cache(damaged_cache).load("phantom_002")
        message = str(raised.value)
        assert message.startswith(f"{image}: is damaged: its checksum") and "case phantom_002 cannot be used" in message
        assert f"scnas data prepare {Cache(damaged_cache).header['dataset']['source']} -o {damaged_cache} " \
               "--spacing 1 1 1 --dtype float16" in message
        image.write_bytes(original)
    Cache(damaged_cache).load("phantom_002")          # intact again: read


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path):
    data = bytearray(path.read_bytes())
    data[16:48] = b"garbage!" * 4
    path.write_bytes(bytes(data))


FAULTS = {
    "truncated image": ("phantom_001.b2nd", _truncate),
    "garbled image": ("phantom_001.b2nd", _garble),
    "truncated label": ("phantom_001_seg.b2nd", _truncate),
    "garbled label": ("phantom_001_seg.b2nd", _garble),
    "garbage foreground": ("phantom_001_fg.npy", lambda p: p.write_bytes(b"\x93NUMPY garbage, not an array")),
    "pickled foreground": ("phantom_001_fg.npy", lambda p: np.save(p, np.array([{"a": 1}], dtype=object))),
    "deleted image": ("phantom_001.b2nd", lambda p: p.unlink()),
    "deleted label": ("phantom_001_seg.b2nd", lambda p: p.unlink()),
}


def _unchecked(cache):
    """The same cache as format v2 wrote it: no checksums (read as it is)."""
    header = json.loads((cache / "cache.json").read_text())
    for record in header["records"]:
        del record["files"]
    (cache / "cache.json").write_text(json.dumps({**header, "version": 2}))


@pytest.mark.parametrize("version", [3, 2])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_damaged_cache_file_is_named_with_its_repair_never_used_nor_a_crash(damaged_cache, fault, version):
    from scnas.errors import DamagedFileError

    name, damage = FAULTS[fault]
    if version == 2:
        _unchecked(damaged_cache)
    damage(damaged_cache / name)
    cache = Cache(damaged_cache)
    with pytest.raises(DamagedFileError) as raised:
        case = cache.load("phantom_001")
        np.asarray(case.image[:]), np.asarray(case.label[:])       # v2: what is not checked must still not crash
    message = str(raised.value)
    assert message.startswith(f"{damaged_cache / name}: ") and "case phantom_001 cannot be used" in message, message
    assert "scnas data prepare" in message and ("--force" in message) == (version == 2)
    cache.load("phantom_000")


def test_training_on_a_damaged_cache_stops_naming_the_file(damaged_cache, cli, tmp_path):
    for i in range(5):                 # whichever case it opens first
        _flip(damaged_cache / f"phantom_00{i}_seg.b2nd", 200)
    result = cli("train", "minimal", "--data", damaged_cache, "-o", tmp_path / "run", "--stem", "2", "--patch", "16",
                 "16", "16", "--epochs", "1", "--steps-per-epoch", "1", "--device", "cpu", "--workers", "0")
    assert result.code == 1 and "Traceback" not in result.err and "internal error" not in result.err, result
    assert "_seg.b2nd: is damaged: its checksum" in result.err and "scnas data prepare" in result.err, result


@pytest.mark.parametrize("content", [b"", b'{"format": "scnas-cache", "vers', b'{"format": "scnas-cache"}'])
def test_a_damaged_cache_json_is_an_error_saying_force_also_to_prepare(damaged_cache, task, cli, content, tmp_path):
    (damaged_cache / "cache.json").write_bytes(content)
    for args in (("train", "minimal", "--data", damaged_cache, "-o", tmp_path / "run", "--device", "cpu"),
                 ("data", "prepare", task, "-o", damaged_cache, *SPACING)):
        result = cli(*args)
        assert result.code == 1 and "internal error" not in result.err, result
        assert f"{damaged_cache / 'cache.json'}: is damaged" in result.err and \
            f"scnas data prepare {task.resolve()} -o {damaged_cache} --spacing 1 1 1 --dtype float16 --force" in \
            result.err, result
    assert cli("data", "prepare", task, "-o", damaged_cache, *SPACING, "--force").code == 0
    assert Cache(damaged_cache).case_ids


@pytest.mark.parametrize("fault", ["truncated image", "deleted label", "garbage foreground", "flipped byte"])
def test_preparing_again_redoes_a_damaged_case_and_names_it(damaged_cache, prepared, task, cli, fault):
    name, damage = FAULTS[fault] if fault in FAULTS else ("phantom_001.b2nd", lambda p: _flip(p, 100))
    damage(damaged_cache / name)
    result = cli("data", "prepare", task, "-o", damaged_cache, *SPACING)
    assert result.code == 0 and "prepared 1 case(s), skipped 4" in result.out, result
    assert f"prepared again: {damaged_cache / name}: is" in result.err, result
    assert _files(damaged_cache) == _files(prepared)


def test_a_search_or_training_preparing_its_task_redoes_a_truncated_case(task, tmp_path, monkeypatch):
    """The implicit preparation of a task folder checks sizes only (no byte is read): cheap at every start."""
    from scnas.data import open_or_prepare

    first = open_or_prepare(task, (1.0, 1.0, 1.0), tmp_path / "c")
    _truncate(first.folder / "phantom_004_seg.b2nd")
    (first.folder / "phantom_000.b2nd").unlink()
    again = open_or_prepare(task, (1.0, 1.0, 1.0), tmp_path / "c")
    for case_id in again.case_ids:
        again.load(case_id)


def test_a_full_disk_is_named_as_such_not_as_blosc2s_failure(task, tmp_path, monkeypatch):
    """The arrays are written by scnas.fileio (blosc2 wrote them itself and said 'Error while
    creating the NDArray'); the file system's error reaches the user with the file named."""
    import scnas.fileio as fileio

    real = fileio.os.fsync

    def full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".b2nd.tmp") or ".b2nd." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(fileio.os, "fsync", full)
    with pytest.raises(DatasetError) as raised:
        _prepare(task, tmp_path / "c")
    message = str(raised.value)
    assert f"case phantom_000: cannot write to the cache: {tmp_path / 'c' / 'phantom_000.b2nd'}: cannot write: No " \
           "space left on device" in message, message
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".phantom")]


@pytest.mark.parametrize("kind", ["search", "train"])
@pytest.mark.parametrize("content", [b"", b'{"scnas_version": "0.1.0", "tr', b'{"scnas_version": "0.1.0"}', b"\xff\xfe"])
def test_resume_with_a_damaged_config_json_names_it(runs, tmp_path, cli, kind, content):
    run = shutil.copytree(runs / kind, tmp_path / kind)
    (run / "config.json").write_bytes(content)
    result = cli(*(("train", "minimal") if kind == "train" else ("search",)), "--resume", "-o", run)
    assert result.code == 1 and "internal error" not in result.err, result
    assert f"{run / 'config.json'}: is damaged: " in result.err and "put back a good copy" in result.err, result


def _checkpoint_fault(name):
    """Ways to break a training checkpoint's state."""
    def shape(state):
        key = next(k for k, v in state["net"].items() if v.dim() == 5)
        state["net"][key] = torch.zeros(3, 3, 3, 3, 3)

    def moments(state):
        moment = next(iter(state["optimiser"]["state"].values()))
        moment["exp_avg"] = torch.zeros(7)

    return {"a weight of another shape": shape, "Adam's moments of another shape": moments,
            "epoch as text": lambda state: state.update(epoch="1"),
            "the generator state as a list": lambda state: state.update(torch_rng=[1, 2, 3]),
            "history not a list": lambda state: state.update(history={"epoch": 1}),
            "no network": lambda state: state.pop("net"),
            "settings that do not parse": lambda state: state.update(config='{"stem": "two"}')}[name]


@pytest.mark.parametrize("fault", ["truncated", "a weight of another shape", "Adam's moments of another shape",
                                   "epoch as text", "the generator state as a list", "history not a list",
                                   "no network", "settings that do not parse"])
def test_resume_from_a_damaged_checkpoint_names_it(runs, tmp_path, cli, fault):
    run = shutil.copytree(runs / "train", tmp_path / "train")
    checkpoint = run / "checkpoint.pt"
    if fault == "truncated":
        _truncate(checkpoint)
    else:
        state = torch.load(checkpoint, weights_only=True)
        _checkpoint_fault(fault)(state)
        torch.save(state, checkpoint)
    result = cli("train", "minimal", "--resume", "-o", run, "--epochs", "2", "--workers", "0", "--device", "cpu")
    assert result.code == 1 and "internal error" not in result.err and "Traceback" not in result.err, result
    assert result.err.startswith(f"error: {checkpoint}: ") and "start again in another folder" in result.err, result


@pytest.fixture(scope="module")
def study(task, tmp_path_factory):
    """A finished one-job cross-validation study (one genotype, fold 0, one step)."""
    from scnas.train import TrainConfig
    from scnas.apps.cv import run_study

    train = TrainConfig(data=str(task), patch=(16, 16, 16), batch_size=1, epochs=1, steps_per_epoch=1, val_patches=1,
                        device="cpu", plots=False, workers=0).model_dump(mode="json",
                                                                         exclude={"data", "fold", "stem", "spacing"})
    out = tmp_path_factory.mktemp("cv") / "study"
    request = {"genotypes": ["minimal"], "data": str(task), "spacing": [1.0, 1.0, 1.0], "folds": [0], "random": 0,
               "random_seed": 0, "stem": 2, "train": train}
    assert run_study(out, request, say=lambda line: None) is not None
    return out


@pytest.mark.parametrize("content", [b"", b'{"genotype": "minimal", "fold": 0, "mea', b'{"genotype": "minimal"}',
                                     b'{"genotype": "minimal", "fold": 0, "model_selection": "last epoch", '
                                     b'"model_epoch": 1, "mean": {"1": "high"}, "mean_over_classes": 0.5, "cases": {}}',
                                     b'{"genotype": "minimal", "fold": 3, "model_selection": "last epoch", "mean": {}}'])
def test_a_damaged_evaluation_json_is_named_and_the_job_done_again(study, tmp_path, cli, content):
    from scnas.apps.cv import run_study, write_report

    out = shutil.copytree(study, tmp_path / "study")
    evaluation = out / "jobs" / "minimal" / "fold_0" / "evaluation.json"
    good = json.loads(evaluation.read_text())
    evaluation.write_bytes(content)
    result = cli("cv", "-o", out, "--report")
    assert result.code == 1 and "internal error" not in result.err, result
    assert "1 of 1 jobs are not done (minimal/fold_0)" in result.err and f"{evaluation}: is damaged" in result.err and \
        "job minimal/fold_0 is done again by 'scnas cv -o" in result.err, result
    said = []
    report = run_study(out, None, say=said.append)
    assert said[0].startswith(f"[1/1] {evaluation}: is damaged") and said[0].endswith("doing it again"), said
    again = json.loads(evaluation.read_text())
    assert report is not None and again["mean"] == good["mean"] and again["cases"] == good["cases"]
    assert write_report(out, say=lambda line: None)["genotypes"][0]["dice"]["mean"]["per_fold"] == \
        [good["mean_over_classes"]]


@pytest.mark.parametrize("content", [b"", b'{"format": "scnas-cv", "version": 1, "req', b'{"format": "scnas-cv"}'])
def test_a_damaged_cv_json_is_named_with_the_way_back(study, tmp_path, cli, content):
    out = shutil.copytree(study, tmp_path / "study")
    (out / "cv.json").write_bytes(content)
    for args in (("cv", "-o", out, "--report"), ("cv", "-o", out)):
        result = cli(*args)
        assert result.code == 1 and "internal error" not in result.err, result
        assert f"{out / 'cv.json'}: is damaged" in result.err and "move cv.json away and run the same 'scnas cv' " \
            "command again" in result.err, result


def test_a_damaged_alpha_track_of_the_search_plots_is_named(tmp_path):
    from scnas.errors import DamagedFileError
    from scnas.search.plots import write_plots

    class Arch:
        def probabilities(self):
            return {"reduction": torch.full((2, 3), 1 / 3)}

    (tmp_path / "plots").mkdir()
    track = tmp_path / "plots" / "alpha.json"
    track.write_text('[{"epoch": 1, "p": {"reduction": [[0.3, 0.3')
    with pytest.raises(DamagedFileError, match="alpha.json: is damaged: not valid JSON .*remove it"):
        write_plots(tmp_path, [{"epoch": 2}], Arch(), config=None, draw=False)
    track.write_text('[{"epoch": 1, "p": {"reduction": [[0.3, 0.3, 0.4], [0.3, 0.3, 0.4]]}}]')
    write_plots(tmp_path, [{"epoch": 2}], Arch(), config=None, draw=False)
    assert [t["epoch"] for t in json.loads(track.read_text())] == [1, 2]
