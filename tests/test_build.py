"""The builder: any valid genotype becomes a working 3D U-Net; stats and model files."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import scnas
from scnas.build import (BuildConfig, BuildError, ModelFileError, OP_BUILDERS, build_network, load_model, load_weights,
                         macro_layout, make_op, network_stats, read_model_info, save_model)
from scnas.build import ops as ops_module
from scnas.build.network import Resample
from scnas.build.ops import AvgPool3x3x3, Conv3d, MaxPool3x3x3
from scnas.genotype import BUILTIN_NAMES, OPS, PAPER_OPS, builtin_genotype, genotype_from_data, random_genotype

def _forward_backward(genotype, config, size=16, batch=2):
    torch.manual_seed(0)
    net = build_network(genotype, config)
    x = torch.randn(batch, config.in_channels, size, size, size)
    y = net(x)
    assert y.shape == (batch, config.num_classes, size, size, size)
    y.square().mean().backward()
    no_grad = [name for name, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a gradient: {no_grad[:5]}"
    return net


def test_macro_layout_is_the_papers_for_depth_3():
    layout = macro_layout(3)
    assert [s.name for s in layout] == [
        "reduction_1", "encoder_normal_1", "reduction_2", "encoder_normal_2", "reduction_3", "inter",
        "expansion_2", "decoder_normal_2", "expansion_1", "decoder_normal_1", "expansion_0", "decoder_normal_0"]
    assert [s.level for s in layout] == [1, 1, 2, 2, 3, 3, 2, 2, 1, 1, 0, 0]


def test_each_decoder_level_adds_the_skip_of_the_encoder_at_its_level(uresnet):
    """What decoder_normal_l reads as its current input is the expansion cell's output plus the
    (projected) output of level l's encoder (encoder_normal_l; the stem at level 0)."""
    torch.manual_seed(0)
    net = build_network(uresnet, BuildConfig(stem_channels=4, in_channels=1, num_classes=2, depth=3)).eval()
    seen = {}
    net.stem.register_forward_hook(lambda module, args, out: seen.__setitem__("encoder_0", out))
    for name, cell in net.cells.items():
        cell.register_forward_hook(lambda module, args, out, name=name: seen.__setitem__(name, out))
        cell.register_forward_pre_hook(lambda module, args, name=name: seen.__setitem__(f"{name} input", args[1]))
    with torch.no_grad():
        net(torch.randn(1, 1, 16, 16, 16))
        for level in (0, 1, 2):
            decoder, skip = f"decoder_normal_{level}", seen[f"encoder_normal_{level}" if level else "encoder_0"]
            projected = net.skips[decoder](skip) if decoder in net.skips else skip
            assert torch.equal(seen[f"{decoder} input"], seen[f"expansion_{level}"] + projected), level


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtins_build_and_train(name):
    _forward_backward(builtin_genotype(name), BuildConfig(stem_channels=8, in_channels=2, num_classes=3))


CASES = list(range(50))


@pytest.mark.parametrize("seed", CASES)
def test_random_genotypes_build_and_train(seed):
    rng = random.Random(seed)
    nodes = 1 + seed % 6
    ops = rng.sample([op for op in PAPER_OPS if op != "zero"], rng.randint(1, 7))
    genotype = random_genotype(seed, nodes=nodes, ops=ops, inputs_per_node=rng.randint(1, 3))
    config = BuildConfig(stem_channels=rng.choice([3, 4, 6]), in_channels=rng.choice([1, 2]), num_classes=rng.choice([1, 2]),
                         depth=rng.choice([2, 3]), upsampling=rng.choice(["trilinear", "transposed"]))
    _forward_backward(genotype, config, size=rng.choice([16, 32]) if seed % 10 == 0 else 16, batch=1 + seed % 2)


def test_cells_with_dead_nodes_unused_inputs_and_parameter_free_ops(small_doc):
    cells = small_doc["cells"]
    cells["encoder_normal"] = {"edges": [{"from": 1, "to": 2, "op": "max_pool_3x3x3"},
                                         {"from": 2, "to": 3, "op": "identity"}], "concat": [2, 3]}   # no c_{k-2}
    cells["reduction"] = {"edges": [{"from": 0, "to": 2, "op": "avg_pool_3x3x3"},
                                    {"from": 1, "to": 3, "op": "identity"}], "concat": [2, 3]}
    cells["decoder_normal"]["concat"] = [2]                                           # node 3 is dead
    genotype = genotype_from_data(small_doc)
    net = _forward_backward(genotype, BuildConfig(stem_channels=4, in_channels=1, num_classes=2))
    encoder = net.cells["encoder_normal_1"]
    assert set(encoder.preprocess) == {"1"}  # unused input: nothing built
    decoder = net.cells["decoder_normal_2"]
    assert not any(key.endswith("_3") for key in decoder.edges)


def test_cells_that_cannot_reach_the_output_are_not_built(small_doc):
    # Decoder cells read only c_{k-2} and expansion cells only c_{k-1}: the expansion cells'
    # outputs feed nothing that reaches the output, and so do the encoder skips.
    cells = small_doc["cells"]
    cells["decoder_normal"] = {"edges": [{"from": 0, "to": 2, "op": "conv_3x3x3"}], "concat": [2]}
    cells["expansion"] = {"edges": [{"from": 1, "to": 2, "op": "conv_3x3x3"}], "concat": [2]}
    genotype = genotype_from_data(small_doc)
    config = BuildConfig(stem_channels=4, in_channels=1, num_classes=2)
    net = _forward_backward(genotype, config)
    assert not any(name.startswith("expansion") for name in net.cells) and not net.skips
    stats = network_stats(genotype, config, (16, 16, 16))
    assert [c.name for c in stats.cells if not c.used] == ["expansion_2", "expansion_1", "expansion_0"]
    assert stats.params == sum(p.numel() for p in net.parameters())


def test_spatial_size_must_be_divisible(uresnet):
    net = build_network(uresnet, BuildConfig(stem_channels=4, in_channels=1, num_classes=1))
    with pytest.raises(BuildError, match=r"H=20 is not a multiple of 2\*\*depth = 8 \(depth 3\); pad or crop"):
        net(torch.zeros(1, 1, 16, 20, 16))
    with pytest.raises(BuildError, match="input has 2 channels; this network was built for 1"):
        net(torch.zeros(1, 2, 16, 16, 16))
    with pytest.raises(BuildError, match="H=20"):
        network_stats(uresnet, BuildConfig(), (16, 20, 16))


def test_a_patch_whose_deepest_level_is_one_voxel_is_refused(uresnet, cli):
    net = build_network(uresnet, BuildConfig(stem_channels=4, in_channels=1, num_classes=2))
    with pytest.raises(BuildError, match=r"deepest level would be a single voxel .* at least 16 on one axis"):
        net(torch.zeros(1, 1, 8, 8, 8))
    assert net(torch.zeros(1, 1, 8, 8, 16)).shape == (1, 2, 8, 8, 16)   # 1x1x2 at the deepest level is fine
    result = cli("build", "minimal", "--stem", "4", "--in-channels", "1", "--classes", "2", "--patch", "8", "8", "8")
    assert result.code == 1 and "spatial size (8, 8, 8): the deepest level would be a single voxel" in result.err


def test_transfer_to_other_input_channels_changes_only_the_stem(uresnet):
    four = build_network(uresnet, BuildConfig(stem_channels=8, in_channels=4)).state_dict()
    one = build_network(uresnet, BuildConfig(stem_channels=8, in_channels=1)).state_dict()
    assert four.keys() == one.keys()
    differing = {k for k in four if four[k].shape != one[k].shape}
    assert differing == {"stem.0.weight"}


def test_deep_supervision_heads_in_training_only(uresnet):
    net = build_network(uresnet, BuildConfig(stem_channels=4, in_channels=1, num_classes=2, deep_supervision=True))
    outputs = net(torch.randn(1, 1, 16, 16, 16))
    assert [tuple(o.shape[2:]) for o in outputs] == [(16, 16, 16), (8, 8, 8), (4, 4, 4)]
    assert net.eval()(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_op_table_covers_the_vocabulary_with_stride_and_width():
    assert set(OP_BUILDERS) == set(OPS)
    x = torch.randn(1, 6, 8, 8, 8)
    for name in OPS:
        for stride in (1, 2):
            for c_out in (6, 4):
                y = make_op(name, 6, c_out, stride=stride)(x)
                assert y.shape == (1, c_out, 8 // stride, 8 // stride, 8 // stride), (name, stride, c_out)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8, 8), (1, 2, 7, 10, 5)])
def test_pooling_ops_equal_torch_3d_pooling(stride, shape, grad):
    torch.manual_seed(1)
    x = torch.randn(*shape, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        assert torch.equal(MaxPool3x3x3(stride)(x), nn.MaxPool3d(3, stride, 1)(x))
        reference = nn.AvgPool3d(3, stride, 1, count_include_pad=False)(x)
        torch.testing.assert_close(AvgPool3x3x3(stride)(x), reference, rtol=1e-5, atol=1e-6)


def test_pooling_gradients_equal_torch_3d_pooling():
    x = torch.randn(1, 2, 6, 6, 6, requires_grad=True)
    for ours, reference in [(MaxPool3x3x3(2), nn.MaxPool3d(3, 2, 1)),
                            (AvgPool3x3x3(1), nn.AvgPool3d(3, 1, 1, count_include_pad=False))]:
        (grad_ours,) = torch.autograd.grad(ours(x).square().sum(), x)
        (grad_reference,) = torch.autograd.grad(reference(x).square().sum(), x)
        torch.testing.assert_close(grad_ours, grad_reference)


@pytest.mark.parametrize("stride", [1, 2])
def test_avg_pool_takes_inputs_smaller_than_the_kernel(stride):
    # torch's avg_pool3d refuses a 2x2x2 input with a 3x3x3 kernel, padding or not.
    x = torch.randn(1, 2, 2, 2, 2)
    y = AvgPool3x3x3(stride)(x)
    if stride == 1:  # every output voxel's box covers the whole 2x2x2 input
        torch.testing.assert_close(y, x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x))
    else:            # one output voxel, centred on voxel (0, 0, 0): it too sees all 8
        torch.testing.assert_close(y, x.mean(dim=(2, 3, 4), keepdim=True))


@pytest.mark.parametrize("shape, kernel, groups, dilation", [
    ((1, 16, 32, 32, 32), 3, 1, 1),   # torch would take its slow path: routed to oneDNN
    ((1, 4, 16, 16, 8), 3, 1, 2),
    ((2, 16, 16, 16, 16), 3, 1, 1),   # batch 2: torch's own dispatch
    ((1, 8, 16, 16, 16), 3, 8, 3),    # depthwise: torch's own dispatch
    ((1, 8, 16, 16, 16), 1, 1, 1),
])
def test_conv3d_routing_equals_torch_conv_with_gradients(monkeypatch, shape, kernel, groups, dilation):
    torch.manual_seed(0)
    conv = Conv3d(shape[1], 8 if groups == 1 else shape[1], kernel, padding=dilation * (kernel // 2), dilation=dilation,
                  groups=groups, bias=True)
    x = torch.randn(*shape, requires_grad=True)
    results = []
    for routed in (True, False):
        monkeypatch.setattr(ops_module, "ROUTE_BATCH1_TO_ONEDNN", routed)
        conv.zero_grad()
        y = conv(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x, retain_graph=True)
        y.square().sum().backward()
        results.append((y.detach(), gx, conv.weight.grad.clone()))
    for routed, plain in zip(*results):
        torch.testing.assert_close(routed, plain, rtol=1e-4, atol=1e-4)


def test_conv3d_is_not_routed_while_exporting(monkeypatch):
    calls = []
    monkeypatch.setattr(ops_module, "_ONEDNN_CONV", lambda *args: calls.append(args))
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    Conv3d(4, 4, 3, padding=1)(torch.randn(1, 4, 8, 8, 8))
    assert not calls


@pytest.mark.parametrize("shape", [(1, 16, 2, 4, 4), (2, 32, 2, 2, 2), (1, 20, 2, 3, 5)])
def test_bf16_cpu_gradients_of_a_shallow_input_are_exact(shape):
    """oneDNN's bfloat16 backward-weights kernel (torch 2.13) reads memory it never wrote for a
    3x3x3 convolution of an input 2 voxels deep: on the same tensors the weight gradient changed
    from call to call, to 1e30 or NaN, and CI's bf16 training skipped its steps. scnas's Conv3d
    computes exactly those in float32: each call, whatever the memory held before, gives the
    float32 gradients of the bfloat16 output, and the output stays bfloat16 as under autocast."""
    torch.manual_seed(0)
    conv = Conv3d(shape[1], shape[1], 3, padding=1, bias=False)
    x, upstream = torch.randn(*shape), torch.randn(shape[0], shape[1], *shape[2:]).bfloat16().float()
    plain = nn.Conv3d(shape[1], shape[1], 3, padding=1, bias=False)
    plain.load_state_dict(conv.state_dict())
    xr = x.clone().requires_grad_()
    (plain(xr) * upstream).sum().backward()
    for _ in range(6):
        stale = [torch.full((n,), float("nan")) for n in (1000, 30000, 100000)]  # freed memory full of NaN
        del stale
        conv.zero_grad()
        xc = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(xc)
        assert out.dtype == torch.bfloat16
        (out.float() * upstream).sum().backward()
        torch.testing.assert_close(conv.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-5, atol=1e-5)


def test_resample_upsamples_after_its_conv_exactly():
    torch.manual_seed(0)
    resample = Resample(6, 4, 1, config=BuildConfig(stem_channels=4))
    x = torch.randn(1, 6, 4, 4, 4)
    upsampled_first = nn.functional.interpolate(resample.act(x), scale_factor=2, mode="trilinear", align_corners=False)
    reference = resample.norm(nn.functional.conv3d(upsampled_first, resample.conv.weight))
    torch.testing.assert_close(resample(x), reference, rtol=1e-4, atol=1e-5)


def _minimal_macs(c, i, k, d, n):
    """Hand formula for the built-in 'minimal' genotype (one 3x3x3 conv per cell, nodes=1)."""
    vox = lambda level: (n // 2 ** level) ** 3  # noqa: E731
    w = lambda level: c * 2 ** level           # noqa: E731
    macs = 27 * i * c * vox(0)                                          # stem
    prev = c
    for level in range(1, d + 1):
        macs += prev * w(level) * vox(level - 1) + 27 * w(level) ** 2 * vox(level)    # reduction: 1x1, strided conv
        macs += w(level) * w(level) * vox(level) + 27 * w(level) ** 2 * vox(level)    # encoder normal / inter
        prev = w(level)
    for level in range(d - 1, -1, -1):
        macs += w(level + 1) * w(level) * vox(level + 1) + 27 * w(level) ** 2 * vox(level)  # expansion: 1x1, upsample, conv
        macs += w(level) ** 2 * vox(level) + 27 * w(level) ** 2 * vox(level)              # decoder normal
    return macs + w(0) * k * vox(0)                                     # out 1x1x1


@pytest.mark.parametrize("c, i, k, d, n", [(8, 4, 3, 3, 32), (5, 1, 2, 2, 16), (68, 4, 3, 3, 128)])
def test_flops_of_single_conv_genotype_match_the_hand_formula(c, i, k, d, n):
    stats = network_stats(builtin_genotype("minimal"), BuildConfig(stem_channels=c, in_channels=i, num_classes=k, depth=d),
                          (n, n, n))
    assert stats.macs == _minimal_macs(c, i, k, d, n) and stats.flops == 2 * stats.macs


def test_stats_parameters_and_levels_add_up(uresnet):
    config = BuildConfig(stem_channels=8)
    stats = network_stats(uresnet, config, (32, 32, 32), batch=2)
    assert stats.params == sum(p.numel() for p in build_network(uresnet, config).parameters())
    assert sum(level.params for level in stats.levels) == stats.params
    assert sum(level.macs for level in stats.levels) == stats.macs
    assert stats.inference_activation_bytes < stats.train_activation_bytes
    double = network_stats(uresnet, config, (32, 32, 32), batch=4)
    assert double.train_activation_bytes == 2 * stats.train_activation_bytes and double.macs == 2 * stats.macs


def test_model_file_round_trip_gives_identical_outputs(tmp_path):
    genotype = random_genotype(5, nodes=3)
    config = BuildConfig(stem_channels=4, in_channels=2, num_classes=2, upsampling="transposed")
    net = build_network(genotype, config).eval()
    path = tmp_path / "net.safetensors"
    save_model(net, path, preprocessing={"spacing": [0.7, 0.7, 0.7]})
    info = read_model_info(path)
    assert info.config == config and info.preprocessing == {"spacing": [0.7, 0.7, 0.7]}
    loaded = scnas.load_model(path)
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))


def test_loading_into_a_mismatching_build_is_a_clear_error(tmp_path, uresnet):
    path = tmp_path / "net.safetensors"
    save_model(build_network(uresnet, BuildConfig(stem_channels=4)), path)
    with pytest.raises(ModelFileError, match="weights do not fit this network: stem_channels: file 4, network 8"):
        load_weights(build_network(uresnet, BuildConfig(stem_channels=8)), path)
    with pytest.raises(ModelFileError, match="genotype differs"):
        load_weights(build_network(builtin_genotype("minimal"), BuildConfig(stem_channels=4)), path)


def test_model_files_without_metadata_or_garbage(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(ModelFileError, match="has no scnas metadata"):
        load_model(plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a model" * 10)
    with pytest.raises(ModelFileError, match="not a safetensors model file"):
        load_model(garbage)
    with pytest.raises(ModelFileError, match="no such file"):
        load_model(tmp_path / "missing.safetensors")


def test_build_command_prints_all_figures(cli):
    result = cli("build", "uresnet", "--stem", "8", "--in-channels", "4", "--classes", "3", "--patch", "32", "32", "32")
    assert result.code == 0, result
    for words in ("parameters:", "MACs:", "FLOPs:", "activation memory: training", "decoder_normal_0"):
        assert words in result.out


def test_build_command_json_and_model_file(cli, tmp_path):
    path = tmp_path / "net.safetensors"
    result = cli("build", "minimal", "--stem", "4", "--patch", "16", "16", "16", "--json", "-o", path)
    figures = json.loads(result.out)
    assert figures["macs"] == _minimal_macs(4, 4, 3, 3, 16) and figures["config"]["stem_channels"] == 4
    assert read_model_info(path).config.stem_channels == 4


def test_build_command_seed_fixes_the_weights_and_leaves_the_global_rng_alone(cli, tmp_path):
    from safetensors.torch import load_file

    def weights(name: str, *seed: str) -> dict[str, torch.Tensor]:
        path = tmp_path / f"{name}.safetensors"
        result = cli("build", "uresnet", "--stem", "4", "--patch", "16", "16", "16", "-o", path, *seed)
        assert result.code == 0, result
        return load_file(path)

    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    default, again, explicit, other = weights("a"), weights("b"), weights("c", "--seed", "0"), weights("d", "--seed", "1")
    assert torch.equal(torch.rand(3), expected_next)   # the command drew from a forked RNG, not the caller's
    assert default.keys() == other.keys() and any(v.numel() > 1 and v.std() > 0 for v in default.values())
    for same in (again, explicit):
        assert all(torch.equal(default[k], same[k]) for k in default)
    assert not all(torch.equal(default[k], other[k]) for k in default)


def test_build_command_bad_patch_is_one_line(cli, tmp_path):
    result = cli("build", "uresnet", "--patch", "100", "128", "128", "-o", tmp_path / "n.safetensors")
    assert result.code == 1 and result.err.count("\n") == 1 and "D=100 is not a multiple of 2**depth = 8" in result.err
    assert not list(tmp_path.iterdir())


def test_gradients_of_a_batch_are_the_sum_of_its_samples():
    # Nothing in these networks mixes the samples of a batch, so the gradient of a batch is the
    # sum of the per-sample gradients. (scnas 0.1 broke this at batch 1: its channels-last max
    # pooling handed back a gradient layout that torch's CPU instance norm mishandled.)
    import torch

    from scnas.genotype import PAPER_OPS, random_genotype

    torch.manual_seed(0)
    genotype = random_genotype(seed=1, nodes=2, ops=list(PAPER_OPS))
    assert "max_pool_3x3x3" in {edge.op for name in ("encoder_normal", "reduction", "decoder_normal", "expansion")
                                for edge in genotype.cell(name).edges}
    net = build_network(genotype, BuildConfig(stem_channels=4, in_channels=2, num_classes=3)).double()
    x, weights = torch.randn(2, 2, 32, 32, 32).double(), torch.randn(2, 3, 32, 32, 32).double()
    (net(x) * weights).sum().backward()
    whole = {name: p.grad.clone() for name, p in net.named_parameters()}
    net.zero_grad()
    for i in range(2):
        (net(x[i:i + 1]) * weights[i:i + 1]).sum().backward()
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, whole[name], rtol=1e-9, atol=1e-12, msg=name)


def test_op_modules_are_derived_from_the_vocabulary_row():
    # A new row of a known kind needs no code in scnas.build.ops: its facts make the module.
    from scnas.build.ops import op_builder
    from scnas.genotype.ops import OpSpec

    dense = op_builder(OpSpec("conv_5x5x5_dil2", "conv", True, description="", kernel=5, dilation=2))(2, 3, 2, 0.01)
    assert (dense[1].kernel_size, dense[1].dilation, dense[1].padding) == ((5,) * 3, (2,) * 3, (4,) * 3)
    separable = op_builder(OpSpec("sep_dil5", "conv", True, description="", kernel=3, dilation=5, separable=True))(2,
                                                                                                                   3,
                                                                                                                   1,
                                                                                                                   0.01)
    assert (separable[1].groups, separable[1].dilation, separable[2].kernel_size) == (2, (5,) * 3, (1,) * 3)
    assert separable(torch.randn(1, 2, 12, 12, 12)).shape == (1, 3, 12, 12, 12)
    with pytest.raises(ValueError, match="no module"):
        op_builder(OpSpec("lp_pool", "pool", False, description="", kernel=3, pooling="lp"))
