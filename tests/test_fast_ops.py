"""Cheaper formulations that must compute what the plain ones compute: torch's average pooling
where it takes the input, LeakyReLU shared by the edges leaving one cell state, max pooling's
layout trick on the CPU only."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from scnas.build import BuildConfig, build_network
from scnas.build import network as network_module
from scnas.build import ops as ops_module
from scnas.build.ops import AvgPool3x3x3, MaxPool3x3x3
from scnas.genotype import PAPER_OPS, builtin_genotype, load_genotype, random_genotype
from scnas.search import Architecture, SuperNet, sample_choices

SIZES = list(itertools.product((1, 2, 3, 4, 5), repeat=3))


def torch_refuses(shape: tuple[int, ...]) -> bool:
    try:
        nn.functional.avg_pool3d(torch.zeros(1, 1, *shape), 3, 1, 1, count_include_pad=False)
    except RuntimeError:
        return True
    return False


def test_torch_avg_pool_refuses_exactly_the_axes_shorter_than_the_kernel():
    # The condition AvgPool3x3x3 branches on; if torch ever takes these, the branch is moot, not wrong.
    assert [s for s in SIZES if torch_refuses(s)] == [s for s in SIZES if min(s) < 3]


@pytest.mark.parametrize("stride", [1, 2])
def test_avg_pool_equals_the_explicit_form_and_torch_at_every_small_size(stride, monkeypatch):
    torch.manual_seed(0)
    used = []
    explicit = AvgPool3x3x3.explicit
    monkeypatch.setattr(AvgPool3x3x3, "explicit", staticmethod(lambda x, s: used.append(1) or explicit(x, s)))
    pool = AvgPool3x3x3(stride)
    for size in SIZES:
        x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
        used.clear()
        y = pool(x)
        assert bool(used) == (min(size) < 3), size  # torch's op wherever it takes the input
        reference = explicit(x, stride)
        torch.testing.assert_close(y, reference, rtol=1e-12, atol=1e-12, msg=str(size))
        weights = torch.randn_like(y)
        (grad,) = torch.autograd.grad((y * weights).sum(), x)
        (grad_reference,) = torch.autograd.grad((reference * weights).sum(), x)
        torch.testing.assert_close(grad, grad_reference, rtol=1e-12, atol=1e-12, msg=str(size))
        if min(size) >= 3:
            plain = nn.functional.avg_pool3d(x, 3, stride, 1, count_include_pad=False)
            torch.testing.assert_close(y, plain, rtol=1e-12, atol=1e-12)
        # float32 too, to float rounding
        x32 = x.detach().float()
        torch.testing.assert_close(pool(x32), explicit(x32, stride), rtol=1e-5, atol=1e-6)


def test_avg_pool_takes_the_form_valid_for_every_size_while_exporting(monkeypatch):
    used = []
    explicit = AvgPool3x3x3.explicit
    monkeypatch.setattr(AvgPool3x3x3, "explicit", staticmethod(lambda x, s: used.append(1) or explicit(x, s)))
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    AvgPool3x3x3(1)(torch.randn(1, 2, 8, 8, 8))
    assert used


def test_max_pool_layout_trick_only_on_the_cpu_without_gradients(monkeypatch):
    calls = []
    real = torch.Tensor.contiguous

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("memory_format", args[0] if args else torch.contiguous_format))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "contiguous", spy)
    x = torch.randn(1, 2, 6, 6, 6)
    with torch.inference_mode():
        y = MaxPool3x3x3(2)(x)
    assert torch.channels_last_3d in calls and torch.equal(y, nn.functional.max_pool3d(x, 3, 2, 1))
    calls.clear()
    MaxPool3x3x3(2)(x.requires_grad_(True))
    assert not calls
    meta = torch.randn(1, 2, 6, 6, 6, device="meta")  # any non-CPU device takes the plain op
    with torch.inference_mode():
        assert MaxPool3x3x3(2)(meta).shape == (1, 2, 3, 3, 3)
    assert torch.channels_last_3d not in calls


class CountLeakyReLU(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.leaky_relu, torch.ops.aten.leaky_relu_):
            self.count += 1
        return func(*args, **(kwargs or {}))


def genotypes():
    return {"uresnet": builtin_genotype("uresnet"), "found": load_genotype("docs/images/found-genotype.yaml"),
            **{f"random-{seed}": random_genotype(seed) for seed in (0, 3, 7)}}


def run(net, x, weights, share: bool, monkeypatch):
    monkeypatch.setattr(network_module, "SHARE_PREACTIVATION", share)
    net.zero_grad()
    with CountLeakyReLU() as counter:
        y = net(x)
    (y * weights).sum().backward()
    return y.detach(), {name: p.grad.clone() for name, p in net.named_parameters()}, counter.count


def assert_same(shared, full, rtol, atol):
    torch.testing.assert_close(shared[0], full[0], rtol=rtol, atol=atol)
    assert shared[1].keys() == full[1].keys()
    for name in full[1]:
        torch.testing.assert_close(shared[1][name], full[1][name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("name", list(genotypes()))
def test_shared_activation_computes_what_every_edge_computing_its_own_does(name, monkeypatch):
    # Double precision: float32 gradients of these InstanceNorm-heavy nets at 16^3 (2^3 at the
    # deepest level) differ by up to a few % of a parameter's largest gradient between two
    # summation orders; double shows whether the two forms are the same function.
    torch.manual_seed(0)
    net = build_network(genotypes()[name], BuildConfig(stem_channels=4, in_channels=2, num_classes=3)).double()
    state = {key: value.clone() for key, value in net.state_dict().items()}
    x, weights = torch.randn(1, 2, 16, 16, 16).double(), torch.randn(1, 3, 16, 16, 16).double()
    full = run(net, x, weights, False, monkeypatch)
    shared = run(net, x, weights, True, monkeypatch)
    assert shared[2] < full[2], "nothing was shared"
    assert_same(shared, full, 1e-9, 1e-11)
    assert net.state_dict().keys() == state.keys()
    for mode in ("cells", "edges"):
        net.set_checkpointing(mode)
        assert_same(run(net, x, weights, True, monkeypatch), full, 1e-9, 1e-11)
    net.set_checkpointing("off")
    with torch.no_grad():  # float32 inference: the same operations in the same order
        net32 = net.float()
        monkeypatch.setattr(network_module, "SHARE_PREACTIVATION", False)
        plain = net32(x.float())
        monkeypatch.setattr(network_module, "SHARE_PREACTIVATION", True)
        torch.testing.assert_close(net32(x.float()), plain, rtol=1e-6, atol=1e-6)


def test_model_files_from_before_still_load():
    # ActConvNorm and SeparableDilatedConv keep their Sequential indices (0 = LeakyReLU, 1 = conv, ...).
    net = build_network(load_genotype("docs/images/found-genotype.yaml"), BuildConfig(stem_channels=4))
    keys = set(net.state_dict())
    assert any(key.endswith(".1.weight") for key in keys) and any(key.endswith(".3.weight") for key in keys)
    assert not any(".0.weight" in key and ".edges." in key for key in keys)  # LeakyReLU has no parameters


def test_supernet_shares_and_computes_the_same(monkeypatch):
    torch.manual_seed(0)
    config = BuildConfig(stem_channels=4, in_channels=2, num_classes=2)
    net = SuperNet(config, 2, list(PAPER_OPS)).double()
    arch = Architecture(2, list(PAPER_OPS), torch.Generator().manual_seed(0)).double()
    x, weights = torch.randn(1, 2, 16, 16, 16).double(), torch.randn(1, 2, 16, 16, 16).double()
    for mode in ("pair", "full"):
        results = []
        for share in (False, True):
            choices = sample_choices(dict(arch.alphas), mode, 1.0, generator=torch.Generator().manual_seed(1))
            monkeypatch.setattr(network_module, "SHARE_PREACTIVATION", share)
            net.zero_grad()
            arch.zero_grad()
            with CountLeakyReLU() as counter:
                y = net(x, choices)
            (y * weights).sum().backward()
            results.append((y.detach(), {n: p.grad.clone() for n, p in [*net.named_parameters(),
                                                                          *arch.named_parameters()]
                                         if p.grad is not None}, counter.count))
        full, shared = results
        assert shared[2] < full[2]
        assert_same(shared, full, 1e-9, 1e-11)
