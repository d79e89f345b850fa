"""The operations of the vocabulary as 3D modules, keyed by their vocabulary name.

Each constructor takes (c_in, c_out, stride, negative_slope) and returns a module mapping
(B, c_in, D, H, W) to (B, c_out, D/stride, H/stride, W/stride). Convolutions are
LeakyReLU-Conv-InstanceNorm as in the paper.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from scnas.genotype.ops import OPS, OpSpec


ROUTE_BATCH1_TO_ONEDNN = True
"""Send the batch-1 convolutions that torch would run on its slow fallback to oneDNN (see
:class:`Conv3d`). A switch so that benchmarks can measure what it buys."""

_ONEDNN_CONV = getattr(torch.ops.aten, "mkldnn_convolution", None) if torch.backends.mkldnn.is_available() else None


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling() \
        or torch.onnx.is_in_onnx_export()


def _bf16_on_the_cpu(x: torch.Tensor) -> bool:
    """Whether a CPU convolution of ``x`` would run in bfloat16 (the input's or autocast's dtype)."""
    return x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                         and torch.get_autocast_dtype("cpu") == torch.bfloat16)


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that works around a CPU dispatch heuristic and a CPU bfloat16 bug of torch.

    Float32 CPU convolutions that torch's heuristic (batch 1 and N*C*D*H <= 20480) leaves to
    its slow ``slow_conv3d`` go to oneDNN directly: same arithmetic up to rounding. In bfloat16
    on the CPU, oneDNN's weight gradient is garbage when the input is shallower than the kernel
    along depth, so exactly those convolutions are computed in float32 while gradients are
    recorded. Neither applies on other devices, while exporting, tracing or compiling, or
    where the oneDNN op is missing (figures: docs/benchmarks.md "Builder", docs/training.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dim() != 5 or self.groups != 1 or self.padding_mode != "zeros"
                or _tracing()):
            return super().forward(x)
        if x.shape[2] < self.kernel_size[0] and torch.is_grad_enabled() and _bf16_on_the_cpu(x):
            with torch.autocast("cpu", enabled=False):
                return F.conv3d(x.float(), self.weight.float(), None if self.bias is None else self.bias.float(),
                                self.stride, self.padding, self.dilation, self.groups).to(torch.bfloat16)
        if (ROUTE_BATCH1_TO_ONEDNN and _ONEDNN_CONV is not None and x.shape[0] == 1
                and self.kernel_size != (1, 1, 1) and x.dtype == torch.float32
                and x.shape[1] * x.shape[2] * x.shape[3] <= 20480):
            return _ONEDNN_CONV(x, self.weight, self.bias, list(self.padding), list(self.stride),
                                list(self.dilation), self.groups)
        return super().forward(x)


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm3d(channels, affine=True)


class ActivationFirst(nn.Sequential):
    """An ``nn.Sequential`` whose module 0 is a ``nn.LeakyReLU``, whose activation can be shared
    by every module reading the same tensor (see ``scnas.build.network.CellModule``). The
    modules stay where they are: state-dict keys do not change."""

    shares_activation = True
    """Takes ``activated=`` (see :meth:`forward`)."""

    def forward(self, x: torch.Tensor, activated: Callable[[float], torch.Tensor] | None = None) -> torch.Tensor:
        """Modules 0, 1, 2, ... on ``x``; with ``activated``, LeakyReLU(x) (module 0) is taken
        from ``activated(negative_slope)`` (computed once by the caller for every module that
        reads ``x``) instead of being computed again."""
        if activated is None:
            return super().forward(x)
        out = activated(self[0].negative_slope)
        for index, module in enumerate(self):
            if index:
                out = module(out)
        return out


class ActConvNorm(ActivationFirst):
    """LeakyReLU, Conv3d (no bias: the norm follows), InstanceNorm.

    Args:
        c_in: input channels.
        c_out: output channels.
        kernel: the convolution's kernel size.
        stride: the convolution's stride.
        negative_slope: the LeakyReLU's slope.
        dilation: the convolution's dilation.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, *, stride: int, negative_slope: float, dilation: int = 1):
        super().__init__(
            nn.LeakyReLU(negative_slope),
            Conv3d(c_in, c_out, kernel, stride=stride, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
            _norm(c_out),
        )


class SeparableDilatedConv(ActivationFirst):
    """LeakyReLU, depthwise dilated kxkxk conv (3x3x3 by default), pointwise 1x1x1 conv, InstanceNorm.

    Args:
        c_in: input channels.
        c_out: output channels.
        stride: the depthwise convolution's stride.
        negative_slope: the LeakyReLU's slope.
        dilation: the depthwise convolution's dilation.
        kernel: the depthwise convolution's kernel size.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, *, negative_slope: float, dilation: int, kernel: int = 3):
        super().__init__(
            nn.LeakyReLU(negative_slope),
            Conv3d(c_in, c_in, kernel, stride=stride, padding=dilation * (kernel // 2), dilation=dilation, groups=c_in,
                   bias=False),
            Conv3d(c_in, c_out, 1, bias=False),
            _norm(c_out),
        )


class MaxPool3x3x3(nn.Module):
    """3x3x3 max pooling, padding 1; exactly ``nn.MaxPool3d(3, stride, 1)``.

    On the CPU without gradients (inference) it is computed in the channels-last-3d layout,
    where torch's CPU kernel is faster (docs/benchmarks.md, "Builder"), and returned
    contiguous. Not on other devices (on CUDA the two layout copies are pure cost), not while
    exporting, tracing or compiling, and never with gradients: the channels-last gradient makes
    torch's CPU instance norm compute wrong weight gradients at batch 1
    (tests/test_build.py::test_gradients_of_a_batch_are_the_sum_of_its_samples)."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not torch.is_grad_enabled() and not _tracing():
            pooled = F.max_pool3d(x.contiguous(memory_format=torch.channels_last_3d), 3, self.stride, 1)
            return pooled.contiguous()
        return F.max_pool3d(x, 3, self.stride, 1)


TORCH_AVG_POOL = True
"""Let :class:`AvgPool3x3x3` use torch's avg_pool3d where torch takes the input (else always the
explicit form): a switch for benchmarks that compare the two."""


class AvgPool3x3x3(nn.Module):
    """3x3x3 average pooling, padding 1, padding not counted; equal (to float rounding) to
    ``nn.AvgPool3d(3, stride, 1, count_include_pad=False)``.

    torch's avg_pool3d refuses inputs with a spatial axis shorter than the kernel (1 or 2
    voxels, e.g. the deepest level of a 16^3 patch) even where the padding would cover them.
    Only for those inputs, and always while exporting, tracing or compiling (an exported graph
    has dynamic spatial sizes, which may be 1 or 2 at the deepest level), it pads with zeros
    explicitly and divides by the share of real voxels; otherwise it is torch's op."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not TORCH_AVG_POOL or _tracing() or x.dim() != 5 or min(x.shape[2:]) < 3:
            return self.explicit(x, self.stride)
        return F.avg_pool3d(x, 3, self.stride, 1, count_include_pad=False)

    @staticmethod
    def explicit(x: torch.Tensor, stride: int) -> torch.Tensor:
        """The form valid for every size: zero padding, box mean, divided by the real share."""
        box_mean = F.avg_pool3d(F.pad(x, (1, 1, 1, 1, 1, 1)), 3, stride)
        real = F.avg_pool3d(F.pad(torch.ones_like(x[:1, :1]), (1, 1, 1, 1, 1, 1)), 3, stride)
        return box_mean / real


class Zero(nn.Module):
    """No connection: zeros of the output shape (used only by search supernets)."""

    def __init__(self, c_out: int, stride: int):
        super().__init__()
        self.c_out, self.stride = c_out, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        x = x[:, :1, ::s, ::s, ::s] * 0.0
        return x.expand(-1, self.c_out, -1, -1, -1)


def _with_width(module: nn.Module, c_in: int, c_out: int, negative_slope: float) -> nn.Module:
    # Parameter-free ops keep the width; a 1x1x1 projection follows where the edge changes it.
    if c_in == c_out:
        return module
    return nn.Sequential(module, ActConvNorm(c_in, c_out, 1, stride=1, negative_slope=negative_slope))


def _identity(c_in: int, c_out: int, stride: int, slope: float) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return ActConvNorm(c_in, c_out, 1, stride=stride,
                       negative_slope=slope)  # strided/projected skip, as DARTS's FactorizedReduce


OpBuilder = Callable[[int, int, int, float], nn.Module]

_POOLS = {"max": MaxPool3x3x3, "avg": AvgPool3x3x3}
"""Pool modules by ``OpSpec.pooling``; both are 3x3x3."""


def op_builder(spec: OpSpec) -> OpBuilder:
    """The module constructor of a vocabulary row, from its facts (family, kernel, dilation,
    separable, pooling): nothing about an op is typed here a second time."""
    if spec.family == "zero":
        return lambda c_in, c_out, stride, slope: Zero(c_out, stride)
    if spec.family == "identity":
        return _identity
    if spec.family == "conv" and spec.separable:
        return lambda c_in, c_out, stride, slope: SeparableDilatedConv(c_in, c_out, stride, negative_slope=slope,
                                                                       dilation=spec.dilation,
                                                                       kernel=spec.kernel)
    if spec.family == "conv":
        return lambda c_in, c_out, stride, slope: ActConvNorm(c_in, c_out, spec.kernel, stride=stride,
                                                              negative_slope=slope, dilation=spec.dilation)
    if spec.family == "pool" and spec.pooling in _POOLS and spec.kernel == 3:
        pool = _POOLS[spec.pooling]
        return lambda c_in, c_out, stride, slope: _with_width(pool(stride), c_in, c_out, slope)
    raise ValueError(f"scnas.build.ops has no module for op {spec.name!r} ({spec.family}, kernel {spec.kernel}, "
                     f"pooling {spec.pooling!r})")


OP_BUILDERS: dict[str, OpBuilder] = {name: op_builder(spec) for name, spec in OPS.items()}
"""Vocabulary name -> module constructor, derived from ``scnas.genotype.ops.OPS``."""


def make_op(name: str, c_in: int, c_out: int, *, stride: int = 1, negative_slope: float = 0.01) -> nn.Module:
    """The module for vocabulary op ``name``.

    Args:
        name: an op of the vocabulary (:data:`scnas.genotype.OPS`); not ``zero``.
        c_in: input channels.
        c_out: output channels.
        stride: 2 on edges that reduce, else 1.
        negative_slope: the LeakyReLU's slope.
    """
    return OP_BUILDERS[name](c_in, c_out, stride, negative_slope)
