"""ONNX export: parity in onnxruntime, metadata, fp16, and bad inputs that lose nothing."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from scnas.build import (BuildConfig, BuildError, ModelFileError, build_network, read_any_model_info, read_onnx_info,
                         save_model)
from scnas.errors import OutputError
from scnas.export import ExportError, export_onnx
from scnas.export import onnx_export
from scnas.genotype import OPS, builtin_genotype, genotype_hash, random_genotype

PREPROCESSING = {"spacing": [0.7, 0.7, 0.7], "normalization": "zscore-nonzero", "patch_size": [32, 32, 32],
                 "labels": {"background": 0, "tumour": 1}, "channel_names": ["T1", "T2"]}


@pytest.fixture(scope="module")
def exported_uresnet(tmp_path_factory):
    """uresnet, stem 4, exported once for the module (an export takes ~10 s)."""
    folder = tmp_path_factory.mktemp("onnx")
    net = build_network(builtin_genotype("uresnet"), BuildConfig(stem_channels=4, in_channels=2, num_classes=2))
    save_model(net, folder / "net.safetensors", preprocessing=PREPROCESSING)
    report = export_onnx(net, folder / "net.onnx", preprocessing=PREPROCESSING)
    return net.eval(), report, folder


def test_export_passes_parity_at_two_shapes(exported_uresnet):
    _, report, _ = exported_uresnet
    assert report.passed and len(report.checks) == 2
    assert len({check.shape for check in report.checks}) == 2
    assert all(check.max_rel <= 1e-3 and check.label_agreement >= 0.999 for check in report.checks)  # near-ties may flip


def test_onnx_file_has_dynamic_batch_and_spatial_axes(exported_uresnet):
    net, _, folder = exported_uresnet
    session = ort.InferenceSession(str(folder / "net.onnx"), providers=["CPUExecutionProvider"])
    dims = session.get_inputs()[0].shape
    assert dims[1] == 2 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3], dims[4]))
    x = torch.randn(3, 2, 8, 40, 16)  # a third shape, never seen during export or verification
    with torch.inference_mode():
        expected = net(x).numpy()
    got = session.run(None, {"image": x.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-4 + 1e-3 * np.abs(expected).max()


def test_metadata_round_trip(exported_uresnet):
    net, _, folder = exported_uresnet
    info = read_onnx_info(folder / "net.onnx")
    assert genotype_hash(info.genotype) == genotype_hash(net.genotype)
    assert info.config == net.config and info.preprocessing == PREPROCESSING
    assert info.metadata["dtype"] == "float32" and info.metadata["spatial_multiple"] == "8"
    assert read_any_model_info(folder / "net.safetensors").preprocessing == PREPROCESSING
    onnx.checker.check_model(str(folder / "net.onnx"))


def test_info_command_reads_both_kinds(cli, exported_uresnet):
    _, _, folder = exported_uresnet
    for name in ("net.onnx", "net.safetensors"):
        result = cli("info", folder / name)
        assert result.code == 0 and "genotype_hash: 90297dcb2a15" in result.out and '"patch_size": [32, 32, 32]' in result.out


@pytest.mark.slow
def test_random_genotype_with_every_op_exports_with_parity(tmp_path):
    genotype = random_genotype(11, nodes=4, ops=[op for op in OPS if op != "zero"])
    used = {e.op for name in ("encoder_normal", "reduction", "decoder_normal", "expansion")
            for e in genotype.cell(name).edges}
    assert used == set(OPS) - {"zero"}
    net = build_network(genotype, BuildConfig(stem_channels=3, in_channels=1, num_classes=2, upsampling="transposed"))
    report = export_onnx(net, tmp_path / "r.onnx")
    assert report.passed and (tmp_path / "r.onnx").stat().st_size == report.file_bytes


@pytest.mark.slow
def test_fp16_export_converts_the_verified_graph(tmp_path, cli):
    net = build_network(builtin_genotype("minimal"), BuildConfig(stem_channels=4, in_channels=1, num_classes=2))
    save_model(net, tmp_path / "m.safetensors")
    result = cli("export-onnx", tmp_path / "m.safetensors", "-o", tmp_path / "m.onnx", "--fp16")
    assert result.code == 0, result
    assert result.out.count("float32 vs torch") == 2 and result.out.count("float16 vs torch") == 2
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # io stays float32
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    assert read_onnx_info(tmp_path / "m.onnx").metadata["dtype"] == "float16"


def test_parity_check_fails_beyond_tolerance():
    net = build_network(builtin_genotype("minimal"), BuildConfig(stem_channels=2, in_channels=1, num_classes=2)).eval()

    class Shifted:  # an "onnxruntime session" whose output is off by 1% of the range
        def run(self, _, feeds):
            with torch.inference_mode():
                out = net(torch.from_numpy(feeds["image"])).numpy()
            return [out + 0.01 * np.abs(out).max()]
    check = onnx_export._parity(Shifted(), net, (1, 1, 16, 16, 16), "float32")
    assert not check.passed and check.max_rel == pytest.approx(0.01, rel=1e-3)
    assert onnx_export._parity(Shifted(), net, (1, 1, 16, 16, 16), "float16").passed


def test_missing_model_file_and_onnx_as_source(cli, tmp_path):
    result = cli("export-onnx", tmp_path / "nope.safetensors", "-o", tmp_path / "x.onnx")
    assert result.code == 1 and "nope.safetensors: no such file" in result.err
    (tmp_path / "a.onnx").write_bytes(b"x")
    result = cli("export-onnx", tmp_path / "a.onnx", "-o", tmp_path / "x.onnx")
    assert result.code == 1 and "already an ONNX file" in result.err
    assert not (tmp_path / "x.onnx").exists()


def test_model_whose_patch_size_is_not_divisible_is_refused_before_export(tmp_path):
    net = build_network(builtin_genotype("minimal"), BuildConfig(stem_channels=2, in_channels=1, num_classes=2))
    with pytest.raises(BuildError, match="D=30 is not a multiple of 2\\*\\*depth = 8"):
        export_onnx(net, tmp_path / "x.onnx", preprocessing={"patch_size": [30, 32, 32]})
    with pytest.raises(BuildError, match="check shape"):
        export_onnx(net, tmp_path / "x.onnx", check_shapes=[(1, 3, 16, 16, 16)])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("target", ["/proc/scnas-test.onnx", "missing-folder/x.onnx"])
def test_unwritable_output_fails_before_exporting(tmp_path, target, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = build_network(builtin_genotype("minimal"), BuildConfig(stem_channels=2, in_channels=1, num_classes=2))
    monkeypatch.setattr(onnx_export, "_onnx_model", lambda *a: pytest.fail("exported although the output is unwritable"))
    with pytest.raises(OutputError):
        export_onnx(net, target)
    assert not list(tmp_path.iterdir())


def test_unavailable_provider_and_missing_onnxruntime(tmp_path, monkeypatch):
    net = build_network(builtin_genotype("minimal"), BuildConfig(stem_channels=2, in_channels=1, num_classes=2))
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ExportError, match="has no CUDAExecutionProvider .*pip install 'scnas\\[gpu\\]'"):
            export_onnx(net, tmp_path / "x.onnx", provider="cuda")
    with pytest.raises(ExportError, match="--provider must be cpu, cuda or tensorrt, not 'tpu'"):
        export_onnx(net, tmp_path / "x.onnx", provider="tpu")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ExportError, match="needs onnxruntime, which is not installed"):
        export_onnx(net, tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())


def test_reading_metadata_of_foreign_or_broken_onnx(tmp_path):
    plain = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(ModelFileError, match="has no scnas metadata"):
        read_onnx_info(tmp_path / "plain.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\xff\x00junk" * 20)
    with pytest.raises(ModelFileError, match="not an ONNX file"):
        read_onnx_info(tmp_path / "junk.onnx")


CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not CUDA_EP, reason="needs onnxruntime-gpu (scnas's gpu extra) and a CUDA device; the cpu extra "
                                        "is installed here")
def test_cuda_execution_provider_agrees_with_torch_in_float32_and_float16(exported_uresnet, tmp_path):
    net, _, _ = exported_uresnet
    for fp16 in (False, True):
        report = export_onnx(net, tmp_path / f"cuda-{fp16}.onnx", preprocessing=PREPROCESSING, provider="cuda", fp16=fp16)
        assert report.passed and report.provider == "cuda"
        session = ort.InferenceSession(str(tmp_path / f"cuda-{fp16}.onnx"), providers=["CUDAExecutionProvider"])
        assert session.get_providers()[0] == "CUDAExecutionProvider"
        x = torch.randn(2, 2, 32, 24, 16)
        with torch.inference_mode():
            expected = net(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.dtype == np.float32 and (got.argmax(1) == expected.argmax(1)).mean() >= (0.95 if fp16 else 0.999)
