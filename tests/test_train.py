"""Training, sliding-window prediction, evaluation: tiny end-to-end runs on phantoms."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from scnas.build import BuildConfig, ModelFileError, build_network, read_model_info, save_model
from scnas.data import DatasetError, write_phantom_dataset
from scnas.genotype import builtin_genotype
from scnas.train import (TrainConfig, evaluate_folders, gaussian_importance, load_predictor, predict_folder,
                         run_training, sliding_window, window_starts)

from conftest import ROOT


def _config(data, **changes) -> TrainConfig:
    values = dict(data=str(data), spacing=(1.0, 1.0, 1.0), stem=4, patch=(16, 16, 16), batch_size=2, epochs=2,
                  steps_per_epoch=3, val_patches=2, device="cpu", seed=1)
    return TrainConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A phantom task at 1 mm (the model's spacing: no resampling) and a model trained on it briefly."""
    root = tmp_path_factory.mktemp("train")
    task = write_phantom_dataset(root / "task", cases=6, channels=2, foreground_classes=2, shape=(24, 24, 16),
                                 spacing=(1.0, 1.0, 1.0), seed=4)
    run_training(builtin_genotype("minimal"), _config(task), root / "run", progress=False)
    return task, root / "run"


def test_training_writes_models_metrics_and_plot(trained):
    _, run = trained
    for name in ("model.safetensors", "model_best.safetensors", "metrics.jsonl", "training.png", "config.json"):
        assert (run / name).exists(), name
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    info = read_model_info(run / "model.safetensors")
    assert info.preprocessing["target_spacing"] == [1.0, 1.0, 1.0] and info.preprocessing["patch_size"] == [16, 16, 16]
    assert info.preprocessing["channel_names"] == ["FLAIR", "T1w"] and info.config.num_classes == 3
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["betas"] == [0.9, 0.999] and not set(config["cases"]["train"]) & set(config["cases"]["validation"])


def test_prediction_keeps_the_input_grid(trained, tmp_path):
    task, run = trained
    written = predict_folder(run / "model.safetensors", task / "imagesTr", tmp_path / "pred", progress=False)
    assert len(written) == 6
    for path in written:
        image = nib.load(str(task / "imagesTr" / path.name))
        label = nib.load(str(path))
        assert label.shape == image.shape[:3] and np.array_equal(label.affine, image.affine)
        assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2}
    result = evaluate_folders(tmp_path / "pred", task / "labelsTr")
    assert result.labels == [1, 2] and len(result.cases) == 6 and 0.0 <= result.overall() <= 1.0


def test_prediction_of_a_folds_validation_cases(trained, tmp_path, cli):
    task, run = trained
    result = cli("predict", run / "model.safetensors", "-i", task / "imagesTr", "-o", tmp_path / "cv",
                 "--validation-of", run)
    assert result.code == 0, result
    expected = json.loads((run / "config.json").read_text())["cases"]["validation"]
    assert sorted(p.name for p in (tmp_path / "cv").iterdir()) == sorted(f"{c}.nii.gz" for c in expected)


def test_sliding_window_equals_one_pass_when_the_volume_fits_one_window():
    net = build_network(builtin_genotype("minimal"), BuildConfig(stem_channels=4, in_channels=1, num_classes=2)).eval()

    def predict(batch):
        with torch.inference_mode():
            return net(torch.from_numpy(batch)).numpy()
    image = np.random.default_rng(0).normal(size=(1, 16, 16, 16)).astype(np.float32)
    whole = predict(image[None])[0]
    windowed = sliding_window(image, predict, (16, 16, 16), num_classes=2)
    np.testing.assert_allclose(windowed, whole, rtol=1e-5, atol=1e-5)
    smaller = sliding_window(image[:, :12, :16, :10], predict, (16, 16, 16), num_classes=2)   # padded, cropped back
    assert smaller.shape == (2, 12, 16, 10)
    # mirroring: tests/test_predict.py (exact equality for a mirror-equivariant predictor)


def test_windows_cover_the_volume_with_the_requested_overlap():
    assert window_starts(16, 16, 0.5) == [0] and window_starts(10, 16, 0.5) == [0]
    starts = window_starts(100, 32, 0.5)
    assert starts[0] == 0 and starts[-1] == 68 and max(np.diff(starts)) <= 16
    weights = gaussian_importance((8, 8, 8))
    assert weights.max() == 1.0 and weights.min() > 0 and weights[3, 3, 3] > weights[0, 0, 0]


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A model trained for 90 steps on 1 mm phantoms, with a folder of its
    validation cases only (images and labels)."""
    root = tmp_path_factory.mktemp("learned")
    task = write_phantom_dataset(root / "task", cases=6, channels=2, foreground_classes=2, shape=(24, 24, 16),
                                 spacing=(1.0, 1.0, 1.0), seed=4)
    run_training(builtin_genotype("minimal"), _config(task, epochs=6, steps_per_epoch=15, lr=3e-3),
                 root / "run", progress=False)
    validation = json.loads((root / "run" / "config.json").read_text())["cases"]["validation"]
    for folder in ("imagesTr", "labelsTr"):
        (root / "validation" / folder).mkdir(parents=True)
        for case in validation:
            for path in (task / folder).glob(f"{case}*"):
                (root / "validation" / folder / path.name).symlink_to(path)
    return root / "run" / "model.safetensors", root / "validation", validation


def test_training_learns_the_phantoms_far_beyond_a_constant_prediction(learned, tmp_path):
    """The validation cases' mean Dice is far above that of the best constant label map (every
    voxel one foreground class), which is what an untrained or broken optimiser, loss or label
    pipeline gets at most."""
    model, validation, cases = learned
    predict_folder(model, validation / "imagesTr", tmp_path / "pred", progress=False)
    result = evaluate_folders(tmp_path / "pred", validation / "labelsTr")
    assert sorted(result.cases) == sorted(cases)
    constant = 0.0
    for case in cases:
        truth = np.asarray(nib.load(str(validation / "labelsTr" / f"{case}.nii.gz")).dataobj)
        for label in (1, 2):
            constant = max(constant, 2 * (truth == label).sum() / (truth.size + (truth == label).sum()))
    assert constant < 0.3 and result.overall() > constant + 0.4, (result.cases, constant)


def test_a_case_at_another_spacing_is_predicted_on_its_own_grid(learned, tmp_path):
    """The validation cases with every other z slice (2 mm where the model has 1 mm): the labels
    come back on the 2 mm grid with its affine, and agree with the 1 mm prediction's slices."""
    model, validation, cases = learned
    for folder in ("images", "labels", "pred_1mm"):
        (tmp_path / folder).mkdir()
    predict_folder(model, validation / "imagesTr", tmp_path / "pred_1mm", progress=False)
    for case in cases:
        for source, target in ((validation / "imagesTr", "images"), (validation / "labelsTr", "labels")):
            image = nib.load(str(source / f"{case}.nii.gz"))
            affine = image.affine @ np.diag([1.0, 1.0, 2.0, 1.0])
            nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:, :, ::2], affine), str(tmp_path / target / f"{case}.nii.gz"))
    written = predict_folder(model, tmp_path / "images", tmp_path / "pred_2mm", progress=False)
    assert sorted(p.name for p in written) == sorted(f"{c}.nii.gz" for c in cases)
    for case in cases:
        image = nib.load(str(tmp_path / "images" / f"{case}.nii.gz"))
        label = nib.load(str(tmp_path / "pred_2mm" / f"{case}.nii.gz"))
        assert label.shape == image.shape[:3] == (24, 24, 8) and np.array_equal(label.affine, image.affine)
        assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2}
        at_1mm = np.asarray(nib.load(str(tmp_path / "pred_1mm" / f"{case}.nii.gz")).dataobj)[:, :, ::2]
        assert (np.asarray(label.dataobj) == at_1mm).mean() > 0.9
    assert evaluate_folders(tmp_path / "pred_2mm", tmp_path / "labels").overall() > 0.5


@pytest.mark.slow
def test_onnx_backend_and_the_onnx_only_example_agree_with_torch(trained, tmp_path, cli):
    task, run = trained
    assert cli("export-onnx", run / "model.safetensors", "-o", tmp_path / "m.onnx").code == 0
    predict_folder(run / "model.safetensors", task / "imagesTr", tmp_path / "torch", progress=False)
    result = cli("predict", tmp_path / "m.onnx", "--backend", "onnxruntime", "-i", task / "imagesTr", "-o", tmp_path / "ort")
    assert result.code == 0, result
    for case in ("phantom_000", "phantom_003"):
        by_torch = np.asarray(nib.load(str(tmp_path / "torch" / f"{case}.nii.gz")).dataobj)
        by_ort = np.asarray(nib.load(str(tmp_path / "ort" / f"{case}.nii.gz")).dataobj)
        assert (by_torch == by_ort).mean() >= 0.999      # float32 near-ties may flip a voxel
        example = subprocess.run([sys.executable, str(ROOT / "examples" / "predict_onnx_only.py"), str(tmp_path / "m.onnx"),
                                  str(task / "imagesTr" / f"{case}.nii.gz"), str(tmp_path / f"{case}-example.nii.gz")],
                                 capture_output=True, text=True)
        assert example.returncode == 0, example.stderr
        assert np.array_equal(np.asarray(nib.load(str(tmp_path / f"{case}-example.nii.gz")).dataobj), by_ort)
    source = (ROOT / "examples" / "predict_onnx_only.py").read_text()
    assert {line.split()[1] for line in source.splitlines() if line.startswith("import ")} <= {
        "itertools", "json", "sys", "nibabel", "numpy", "onnxruntime"} and "from scnas" not in source


def test_training_stopped_inside_an_epoch_or_at_its_end_resumes_exactly(trained, tmp_path):
    # The shared run loop checkpoints inside an epoch (--checkpoint-every-steps, or a stop) for
    # training as for search: a run stopped after step 3 of 4, resumed to the end of that epoch
    # (stop_after_epochs), and resumed again ends with the weights, history and counts of an
    # uninterrupted one.
    task, _ = trained
    config = _config(task, epochs=2, steps_per_epoch=4, checkpoint_every_steps=2)
    run_training(builtin_genotype("minimal"), config, tmp_path / "whole", progress=False)
    run_training(builtin_genotype("minimal"), config, tmp_path / "parts", progress=False, stop_after_steps=3)
    stopped = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    assert (stopped["epoch"], stopped["step"], stopped["history"]) == (0, 3, [])
    run_training(builtin_genotype("minimal"), config, tmp_path / "parts", resume=True, progress=False,
                 stop_after_epochs=1)
    stopped = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    assert (stopped["epoch"], stopped["step"], len(stopped["history"])) == (1, 0, 1)
    run_training(builtin_genotype("minimal"), config, tmp_path / "parts", resume=True, progress=False)
    from safetensors.torch import load_file

    whole, parts = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "parts" / "model.safetensors")
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)
    records = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("whole", "parts")]
    assert len(records[0]) == len(records[1]) == 2
    for a, b in zip(*records):
        assert a.pop("seconds") > 0 and b.pop("seconds") > 0
        assert a == b


def test_a_genotype_transfers_to_a_task_with_other_channels_and_classes(tmp_path):
    task = write_phantom_dataset(tmp_path / "ct", cases=5, channels=1, foreground_classes=1, shape=(16, 16, 16), seed=2,
                                 spacing=(1.0, 1.0, 1.0))
    run_training(builtin_genotype("uresnet"), _config(task, epochs=1, steps_per_epoch=1), tmp_path / "run", progress=False)
    info = read_model_info(tmp_path / "run" / "model.safetensors")
    assert info.config.in_channels == 1 and info.config.num_classes == 2


def test_bad_prediction_inputs(trained, tmp_path, cli):
    task, run = trained
    one_channel = tmp_path / "one.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16), np.float32), np.eye(4)), str(one_channel))
    result = cli("predict", run / "model.safetensors", "-i", one_channel, "-o", tmp_path / "out")
    assert result.code == 1 and "image has 1 channel(s), expected 2 (FLAIR, T1w)" in result.err
    (tmp_path / "bad.nii.gz").write_bytes(b"garbage" * 20)
    result = cli("predict", run / "model.safetensors", "-i", tmp_path / "bad.nii.gz", "-o", tmp_path / "out")
    assert result.code == 1 and "cannot read" in result.err and "Traceback" not in result.err
    result = cli("predict", run / "model.safetensors", "-i", task / "imagesTr", "-o", "/proc/scnas-out")
    assert result.code == 1 and "error:" in result.err
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, plain)
    with pytest.raises(ModelFileError, match="has no scnas metadata"):
        load_predictor(plain)
    untrained = tmp_path / "untrained.safetensors"
    save_model(build_network(builtin_genotype("minimal"), BuildConfig(stem_channels=2, in_channels=2)), untrained)
    with pytest.raises(ModelFileError, match="has no preprocessing settings"):
        load_predictor(untrained)
    assert not list((tmp_path / "out").glob("*.nii.gz")) if (tmp_path / "out").exists() else True


def test_evaluation_conventions_and_files(tmp_path, cli):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    truth = np.zeros((8, 8, 8), np.uint8)
    truth[2:6, 2:6, 2:6] = 1
    prediction = np.zeros_like(truth)
    prediction[2:6, 2:6, 3:6] = 1
    for folder, array in (("gt", truth), ("pred", prediction)):
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(tmp_path / folder / "a.nii.gz"))
        nib.save(nib.Nifti1Image(np.zeros_like(truth), np.eye(4)), str(tmp_path / folder / "empty.nii.gz"))
    result = evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    assert result.cases["a"][1] == pytest.approx(2 * 48 / (48 + 64))
    assert np.isnan(result.cases["empty"][1]) and result.mean()[1] == pytest.approx(2 * 48 / 112)  # NaN left out
    out = cli("evaluate", tmp_path / "pred", tmp_path / "gt", "-o", tmp_path / "d.csv", "-o", tmp_path / "d.json")
    assert out.code == 0 and "mean Dice over classes: 0.8571" in out.out
    assert json.loads((tmp_path / "d.json").read_text())["mean"]["1"] == pytest.approx(0.857142857)
    assert (tmp_path / "d.csv").read_text().splitlines()[0] == "case,dice_1"
    (tmp_path / "pred" / "a.nii.gz").unlink()
    with pytest.raises(DatasetError, match="no prediction for 1 ground-truth case"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt")


def test_train_command_end_to_end(cli, tmp_path):
    task = write_phantom_dataset(tmp_path / "task", cases=5, channels=1, foreground_classes=1, shape=(16, 16, 16), seed=3,
                                 spacing=(1.0, 1.0, 1.0))
    result = cli("train", "minimal", "--data", task, "-o", tmp_path / "run", "--stem", "2", "--patch", "16", "16", "16",
                 "--batch-size", "1", "--epochs", "1", "--steps-per-epoch", "2", "--spacing", "1", "1", "1",
                 "--device", "cpu")
    assert result.code == 0, result
    assert "epoch 1: training loss" in result.out and (tmp_path / "run" / "model_best.safetensors").exists()
    again = cli("train", "minimal", "--data", task, "-o", tmp_path / "run", "--epochs", "1")
    assert again.code == 1 and "already holds a training run" in again.err


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_mixed_precision_training_and_prediction_run_on_the_cpu(trained, tmp_path, amp):
    task, run = trained
    result = run_training(builtin_genotype("minimal"), _config(task, amp=amp, epochs=1, steps_per_epoch=2,
                                                                micro_batch=1, checkpoint="cells"),
                          tmp_path / amp, progress=False)
    assert result.plan.checkpoint == "cells" and result.plan.micro_batch == 1
    # fp16's gradient scaler may skip its first steps while it finds its scale; bf16 has none and
    # must skip none (it did where oneDNN's bf16 kernel returned garbage: see scnas.build.ops.Conv3d).
    assert np.isfinite(result.history[0]["train_loss"])
    assert result.history[0]["skipped_steps"] <= (2 if amp == "fp16" else 0)
    recorded = json.loads((tmp_path / amp / "config.json").read_text())
    assert recorded["amp"] == amp and recorded["memory_plan"]["checkpoint"] == "cells"
    exact = predict_folder(run / "model.safetensors", task / "imagesTr", tmp_path / "exact", progress=False, amp="off")
    mixed = predict_folder(run / "model.safetensors", task / "imagesTr", tmp_path / "mixed", progress=False, amp=amp)
    agree = [np.mean(np.asarray(nib.load(str(a)).dataobj) == np.asarray(nib.load(str(b)).dataobj))
             for a, b in zip(exact, mixed)]
    assert min(agree) > 0.95


def test_a_setting_that_cannot_fit_is_refused_before_the_first_step(trained, tmp_path, cli):
    task, _ = trained
    result = cli("train", "minimal", "--data", task, "--stem", "4", "--patch", "16", "16", "16", "--spacing", "1", "1",
                 "1", "--epochs", "1", "--device", "cpu", "--gpu-memory", "520MiB", "--checkpoint", "off",
                 "-o", tmp_path / "big")
    assert result.code == 1 and "does not fit" in result.err and "needs about" in result.err, result
    assert not (tmp_path / "big" / "checkpoint.pt").exists()
    fits = cli("train", "minimal", "--data", task, "--stem", "4", "--patch", "16", "16", "16", "--spacing", "1", "1",
               "1", "--epochs", "1", "--steps-per-epoch", "1", "--device", "cpu", "--gpu-memory", "4GiB",
               "-o", tmp_path / "small")
    assert fits.code == 0 and "checkpointing off, micro-batch 8; predicted peak" in fits.out, fits


def test_resume_may_change_how_a_step_fits_but_not_the_precision_or_an_old_format(trained, tmp_path, cli):
    import torch

    task, _ = trained
    args = ["--data", task, "--stem", "2", "--patch", "16", "16", "16", "--spacing", "1", "1", "1", "--batch-size", "2",
            "--steps-per-epoch", "1", "--device", "cpu", "-o", tmp_path / "run"]
    assert cli("train", "minimal", *args, "--epochs", "1").code == 0
    resumed = cli("train", "minimal", "--resume", "-o", tmp_path / "run", "--epochs", "2", "--checkpoint", "cells",
                  "--micro-batch", "1")
    assert resumed.code == 0 and "checkpointing cells, micro-batch 1" in resumed.out, resumed
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] == 2 and state["amp"] == "off"
    torch.save({**state, "amp": "fp16"}, checkpoint)
    other = cli("train", "minimal", "--resume", "-o", tmp_path / "run", "--epochs", "3")
    assert other.code == 1 and "computed with amp fp16; here it would compute with amp off" in other.err
    torch.save({**state, "version": 1}, checkpoint)
    old = cli("train", "minimal", "--resume", "-o", tmp_path / "run", "--epochs", "3")
    assert old.code == 1 and "from an older scnas" in old.err and "per process" in old.err


@pytest.mark.parametrize("placement", ["below", "upper right (before)"])
def test_the_legend_of_a_two_axis_plot_covers_neither_axis(placement):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scnas.figures import legend_below

    figure, left = plt.subplots(figsize=(7, 4))
    left.plot([1, 2, 3], [0.83, 0.75, 0.65], label="Theta loss (weight set)")
    left.plot([1, 2, 3], [0.82, 0.74, 0.65], label="alpha loss (architecture set)")
    right = left.twinx()
    right.plot([1, 2, 3], [0.24, 0.32, 0.29], "k--", label="Dice of derived cells")
    right.set_ylabel("Dice")
    if placement == "below":
        legend_below(figure, left, right)
    else:
        figure.legend(loc="upper right")
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    box = figure.legends[0].get_window_extent(renderer)
    covers = any(box.overlaps(axis.get_tightbbox(renderer)) for axis in (left, right))
    plt.close(figure)
    assert covers == (placement != "below")   # the old placement did cover the right axis: the test can tell
    if placement == "below":
        assert [t.get_text() for t in figure.legends[0].get_texts()] == [
            "Theta loss (weight set)", "alpha loss (architecture set)", "Dice of derived cells"]


def test_a_prepared_cache_trains_at_its_own_spacing_and_records_it(trained, tmp_path, cli):
    from scnas.data import PrepareSettings, prepare_dataset

    task, _ = trained
    cache = prepare_dataset(task, tmp_path / "cache2", PrepareSettings(target_spacing=(2.0, 2.0, 2.0)),
                            progress=False).cache
    result = cli("--threads", "1", "train", "minimal", "--data", cache, "--stem", "4", "--patch", "8", "8", "16",
                 "--batch-size", "2", "--epochs", "1", "--steps-per-epoch", "1", "--device", "cpu", "-o", tmp_path / "run")
    assert result.code == 0, result
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["train"]["spacing"] == [2.0, 2.0, 2.0]   # the cache's, not the 0.7 mm default
    assert recorded["preprocessing"]["target_spacing"] == [2.0, 2.0, 2.0]
    resumed = cli("--threads", "1", "train", "minimal", "--resume", "--epochs", "2", "-o", tmp_path / "run")
    assert resumed.code == 0, resumed
    refused = cli("--threads", "1", "train", "minimal", "--data", cache, "--spacing", "0.7", "0.7", "0.7",
                  "--stem", "4", "--patch", "8", "8", "16", "--epochs", "1", "--device", "cpu", "-o", tmp_path / "run2")
    assert refused.code == 1
    assert "was prepared at spacing [2.0, 2.0, 2.0], not the --spacing [0.7, 0.7, 0.7] asked for" in refused.err
