"""Prediction on the device: sliding window in torch, mirroring, blending where the network
runs, the CPU fallback when a volume does not fit, background reading and writing of a folder,
cases that cannot be read, --compile, and device/precision choices that cannot be honoured."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import scnas.train.predict as predict_module
from scnas.build import BuildConfig, build_network, save_model
from scnas.data import write_phantom_dataset
from scnas.genotype import builtin_genotype
from scnas.train import load_predictor, predict_folder, sliding_window
from scnas.train.inference import sliding_window_logits
from scnas.train.predict import PredictError, accumulation_bytes

PATCH = (16, 16, 16)


@pytest.fixture(scope="module")
def model_and_task(tmp_path_factory):
    """An untrained (seeded) stem-4 network with preprocessing metadata, and a phantom task at
    the model's spacing: prediction needs no training to be compared with itself."""
    root = tmp_path_factory.mktemp("predict")
    task = write_phantom_dataset(root / "task", cases=4, channels=2, foreground_classes=2, shape=(28, 24, 20),
                                 spacing=(1.0, 1.0, 1.0), seed=7)
    torch.manual_seed(0)
    net = build_network(builtin_genotype("uresnet"), BuildConfig(stem_channels=4, in_channels=2, num_classes=3, depth=2))
    preprocessing = {"target_spacing": [1.0, 1.0, 1.0], "patch_size": list(PATCH), "normalization": "zscore-nonzero",
                     "channel_names": ["FLAIR", "T1w"], "labels": {"background": 0, "a": 1, "b": 2}}
    save_model(net, root / "model.safetensors", preprocessing)
    return root / "model.safetensors", task


def _labels(folder):
    return {path.name: np.asarray(nib.load(str(path)).dataobj) for path in sorted(folder.glob("*.nii.gz"))}


def test_mirroring_flips_back_exactly():
    """A mirror-equivariant predictor (voxel-wise) gives the same logits with and without the 8
    mirrorings, exactly; leaving out the flip back would average mirrored images instead."""
    # Values with few significant bits, so that summing 8 equal predictions is exact.
    image = (np.round(np.random.default_rng(0).normal(size=(2, 20, 18, 17)) * 16) / 16).astype(np.float32)

    def voxelwise(batch):
        return np.concatenate([batch * 2.0, -batch[:, :1]], axis=1)

    plain = sliding_window(image, voxelwise, PATCH, num_classes=3)
    mirrored = sliding_window(image, voxelwise, PATCH, num_classes=3, mirror=True)
    assert np.array_equal(plain, mirrored)
    np.testing.assert_allclose(plain[:2], image * 2.0, rtol=1e-6, atol=1e-6)   # weights normalise to 1


def test_overlapping_windows_are_blended_by_their_gaussian_weights():
    """Four windows overlap on a 24 x 24 x 16 volume (corners 0 and 8 along x and y); each
    predicts a constant of its own. Every voxel gets the windows that cover it, weighted by a
    Gaussian (sigma = patch / 8) around each window's centre, divided by the sum of weights."""
    x, y, _ = np.indices((24, 24, 16))
    image = np.stack([x, y]).astype(np.float32)             # the window's corner can be read off its first voxel

    def constant_per_window(batch):
        value = 1.0 + batch[:, 0, 0, 0, 0] + 100.0 * batch[:, 1, 0, 0, 0]
        return np.broadcast_to(value[:, None, None, None, None], (len(batch), 1, *PATCH)).copy()

    blended = sliding_window(image, constant_per_window, PATCH, num_classes=1, overlap=0.5, batch_size=3)[0]

    def g(offset):                                          # the 1D Gaussian, centre 7.5, sigma 2
        return np.exp(-0.5 * ((offset - 7.5) / 2.0) ** 2)
    numerator, denominator = np.zeros((24, 24)), np.zeros((24, 24))
    for cx in (0, 8):
        for cy in (0, 8):
            inside = (x[..., 0] >= cx) & (x[..., 0] < cx + 16) & (y[..., 0] >= cy) & (y[..., 0] < cy + 16)
            weight = np.where(inside, g(x[..., 0] - cx) * g(y[..., 0] - cy), 0.0)
            numerator += weight * (1.0 + cx + 100.0 * cy)
            denominator += weight
    expected = numerator / denominator
    assert blended.shape == (24, 24, 16)
    np.testing.assert_allclose(blended, np.repeat(expected[..., None], 16, axis=2), rtol=1e-5)
    assert blended[0, 0, 0] == 1.0 and blended[23, 23, 0] == 809.0       # only one window covers a corner
    assert 1.0 < blended[12, 0, 0] < 9.0                                 # two windows share the middle


def test_host_and_device_accumulation_agree_and_the_torch_path_matches_one_pass():
    torch.manual_seed(0)
    net = build_network(builtin_genotype("minimal"), BuildConfig(stem_channels=4, in_channels=1, num_classes=2)).eval()
    image = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 30, 16, 20)).astype(np.float32))
    on_device = sliding_window_logits(image, net, PATCH, num_classes=2, batch_size=3, mirror=True)
    on_host = sliding_window_logits(image, net, PATCH, num_classes=2, batch_size=3, mirror=True, accumulate="host")
    assert on_device.shape == (2, 30, 16, 20) and on_device.dtype == torch.float32
    torch.testing.assert_close(on_device, on_host, rtol=0, atol=0)
    window = image[:, :16, :, :16]
    with torch.inference_mode():
        whole = net(window[None])[0]
    torch.testing.assert_close(sliding_window_logits(window, net, PATCH, num_classes=2), whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="accumulate must be one of"):
        sliding_window_logits(image, net, PATCH, num_classes=2, accumulate="gpu")


def test_a_volume_that_does_not_fit_is_blended_in_cpu_memory(model_and_task, monkeypatch):
    model, _ = model_and_task
    notices = []
    predictor = load_predictor(model, device="cpu", say=notices.append)
    image = np.random.default_rng(2).normal(size=(2, 24, 20, 18)).astype(np.float32)
    expected = predictor.segment(image)
    real = predict_module.Predictor.logits
    calls = []

    def out_of_memory_on_the_device(self, image, overlap=0.5, batch_size=2, *, mirror=False, accumulate="device"):
        calls.append(accumulate)
        if accumulate == "device":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, image, overlap, batch_size, mirror=mirror, accumulate=accumulate)

    monkeypatch.setattr(predict_module.Predictor, "logits", out_of_memory_on_the_device)
    assert np.array_equal(predictor.segment(image), expected)
    assert calls == ["device", "host"] and len(notices) == 1 and "blending in CPU memory" in notices[0]

    def never_fits(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(predict_module.Predictor, "logits", never_fits)
    with pytest.raises(PredictError, match="out of cpu memory .* use a smaller --batch-size"):
        predictor.segment(image, batch_size=4)
    assert accumulation_bytes((4, 100, 100, 50), 3) == 100 * 100 * 50 * (4 * 8 + 8)


def test_background_reading_and_writing_give_the_same_files(model_and_task, tmp_path):
    model, task = model_and_task
    inline = predict_folder(model, task / "imagesTr", tmp_path / "inline", progress=False, prefetch=False)
    threaded = predict_folder(model, task / "imagesTr", tmp_path / "threaded", progress=False, prefetch=True, tta=True)
    mirrored = predict_folder(model, task / "imagesTr", tmp_path / "mirrored", progress=False, prefetch=False, tta=True)
    assert [p.name for p in inline] == [p.name for p in threaded] == [f"phantom_{i:03d}.nii.gz" for i in range(4)]
    by_thread, by_inline = _labels(tmp_path / "threaded"), _labels(tmp_path / "mirrored")
    assert by_thread.keys() == by_inline.keys()
    assert all(np.array_equal(by_thread[name], by_inline[name]) for name in by_thread)
    assert not list(tmp_path.glob("*/.*.nii.gz"))    # no temporary files left behind


@pytest.mark.parametrize("prefetch", [False, True])
def test_unreadable_cases_are_listed_after_the_others_are_written(model_and_task, tmp_path, prefetch, cli):
    model, task = model_and_task
    images = tmp_path / "images"
    shutil.copytree(task / "imagesTr", images)
    data = (images / "phantom_001.nii.gz").read_bytes()
    (images / "phantom_001.nii.gz").write_bytes(data[: len(data) // 3])      # truncated
    with pytest.raises(PredictError) as raised:
        predict_folder(model, images, tmp_path / "out", progress=False, prefetch=prefetch)
    lines = raised.value.lines()
    assert "wrote 3 of 4 segmentation(s)" in lines[0] and "1 case(s) could not be read" in lines[0]
    assert len(lines) == 2 and "phantom_001" in lines[1] and "cannot read" in lines[1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"phantom_{i:03d}.nii.gz" for i in (0, 2, 3)]
    result = cli("predict", model, "-i", images, "-o", tmp_path / "cli")
    assert result.code == 1 and "wrote 3 of 4" in result.err and "Traceback" not in result.err, result


def test_device_precision_and_compile_choices_that_cannot_be_honoured(model_and_task, tmp_path, cli, monkeypatch):
    model, task = model_and_task
    if not torch.cuda.is_available():
        result = cli("predict", model, "-i", task / "imagesTr", "-o", tmp_path / "o", "--device", "cuda")
        assert result.code == 1 and "no CUDA device is available here (use --device cpu or auto)" in result.err
    result = cli("predict", model, "-i", task / "imagesTr", "-o", tmp_path / "o", "--device", "tpu")
    assert result.code == 1 and "--device must be auto, cpu or cuda, not 'tpu'" in result.err
    result = cli("predict", model, "-i", task / "imagesTr", "-o", tmp_path / "o", "--amp", "fp8")
    assert result.code == 1 and "--amp must be auto, off, fp16 or bf16" in result.err
    assert not list((tmp_path / "o").glob("*.nii.gz"))

    def broken_compile(module, *args, **kwargs):
        def fails(*inputs):
            raise RuntimeError("no C++ compiler found (simulated)")
        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    notices = []
    written = predict_folder(model, task / "imagesTr", tmp_path / "eager", progress=False, compile=True,
                             say=notices.append)
    assert len(written) == 4 and len(notices) == 1
    assert "--compile failed (RuntimeError: no C++ compiler found (simulated)); running uncompiled" in notices[0]
    expected = predict_folder(model, task / "imagesTr", tmp_path / "plain", progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(_labels(tmp_path / "eager").values(),
                                                    _labels(tmp_path / "plain").values()))
    assert len(expected) == 4


@pytest.mark.slow
def test_compiled_prediction_equals_eager(model_and_task, tmp_path):
    """torch.compile for real (inductor needs a C compiler; CI's Debian image has one), on the
    smallest network and one case: compilation time grows with the graph."""
    _, task = model_and_task
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: inductor cannot compile here")
    torch.manual_seed(0)
    net = build_network(builtin_genotype("minimal"), BuildConfig(stem_channels=2, in_channels=2, num_classes=3, depth=1))
    save_model(net, tmp_path / "small.safetensors", {"target_spacing": [1.0, 1.0, 1.0], "patch_size": list(PATCH),
                                                     "channel_names": ["FLAIR", "T1w"]})
    notices = []
    predict_folder(tmp_path / "small.safetensors", task / "imagesTr", tmp_path / "compiled", progress=False,
                   compile=True, batch_size=1, only=["phantom_000"], say=notices.append)
    predict_folder(tmp_path / "small.safetensors", task / "imagesTr", tmp_path / "eager", progress=False,
                   batch_size=1, only=["phantom_000"])
    assert len(notices) == 1 and notices[0].startswith("compiled the network in "), notices
    compiled, eager = _labels(tmp_path / "compiled"), _labels(tmp_path / "eager")
    assert np.mean(compiled["phantom_000.nii.gz"] == eager["phantom_000.nii.gz"]) >= 0.999   # fused float32 may flip a tie


def test_training_compiles_before_the_first_step_or_says_why_not(tmp_path, monkeypatch):
    """A compiler failure is caught before the first step: one notice, then eager training whose
    results equal a run without --compile (so nothing was left behind, gradients included)."""
    from scnas.train import TrainConfig, run_training

    task = write_phantom_dataset(tmp_path / "task", cases=5, channels=1, foreground_classes=1, shape=(16, 16, 16),
                                 spacing=(1.0, 1.0, 1.0), seed=3)
    settings = dict(data=str(task), spacing=(1.0, 1.0, 1.0), stem=2, depth=1, patch=(16, 16, 16), batch_size=2,
                    epochs=1, steps_per_epoch=2, val_patches=1, device="cpu", seed=0, plots=False)

    def compile_that_fails(self, *args, **kwargs):
        def broken(*inputs, **named):
            raise RuntimeError("inductor: no C++ compiler (simulated)")
        self._compiled_call_impl = broken

    monkeypatch.setattr(torch.nn.Module, "compile", compile_that_fails)
    notices = []
    compiled = run_training(builtin_genotype("minimal"), TrainConfig(**settings, compile=True), tmp_path / "c",
                            progress=False, say=notices.append)
    eager = run_training(builtin_genotype("minimal"), TrainConfig(**settings), tmp_path / "e", progress=False)
    assert [n for n in notices if not n.startswith("preparing ")] == [
        "note: --compile failed (RuntimeError: inductor: no C++ compiler (simulated)); training uncompiled"]
    assert compiled.history[0]["train_loss"] == eager.history[0]["train_loss"]


@pytest.mark.slow   # the default run's ONNX export is test_export's
def test_a_float16_onnx_export_predicts_with_float32_inputs(tmp_path, model_and_task):
    """The fp16 ONNX graph keeps float32 inputs and outputs, so the predictor feeds it as any other."""
    from scnas.export import export_onnx

    _, task = model_and_task
    torch.manual_seed(1)
    net = build_network(builtin_genotype("minimal"), BuildConfig(stem_channels=4, in_channels=2, num_classes=3, depth=1))
    preprocessing = {"target_spacing": [1.0, 1.0, 1.0], "patch_size": list(PATCH), "channel_names": ["FLAIR", "T1w"]}
    save_model(net, tmp_path / "m.safetensors", preprocessing)
    export_onnx(net, tmp_path / "m16.onnx", preprocessing=preprocessing, fp16=True)
    half = predict_folder(tmp_path / "m16.onnx", task / "imagesTr", tmp_path / "half", backend="onnxruntime",
                          progress=False, only=["phantom_000", "phantom_001"])
    exact = predict_folder(tmp_path / "m.safetensors", task / "imagesTr", tmp_path / "exact", progress=False,
                           only=["phantom_000", "phantom_001"])
    assert [p.name for p in half] == [p.name for p in exact]
    agree = [np.mean(a == b) for a, b in zip(_labels(tmp_path / "half").values(), _labels(tmp_path / "exact").values())]
    assert min(agree) >= 0.95, agree
    with pytest.raises(PredictError, match="--amp fp16 applies to the torch backend"):
        load_predictor(tmp_path / "m16.onnx", backend="onnxruntime", amp="fp16")
    with pytest.raises(PredictError, match="--compile applies to the torch backend only"):
        load_predictor(tmp_path / "m16.onnx", backend="onnxruntime", compile=True)
