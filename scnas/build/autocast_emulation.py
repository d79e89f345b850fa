"""CUDA autocast's precision on the CPU, for memory simulations: convolutions keep the tensors
a half-precision convolution keeps (so the allocation tracker counts them), computed in float32.
Not for training or inference.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scnas.build.allocations import Untracked, counted
from scnas.defaults import PRECISIONS

AMP_DTYPES = dict(zip(PRECISIONS, (None, torch.float16, torch.bfloat16)))


def emulate_autocast(model: nn.Module, amp: str) -> None:
    """Make ``model``'s convolutions behave as under CUDA autocast with ``amp`` (fp16/bf16),
    on the CPU: input, weight and bias are cast to the low precision above autograd, so
    backward keeps the low-precision copies, as with autocast. Every other operation of
    these networks follows its inputs under autocast (instance norm, activations, pooling,
    additions; scnas keeps its trilinear upsampling in the input's precision), so nothing else
    changes, except that average pooling, which the CPU lacks in half precision, is computed
    as a depthwise convolution that keeps the same tensors. For simulations only: it rebinds
    ``forward`` of modules of ``model``."""
    from scnas.build.ops import AvgPool3x3x3

    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return
    for module in model.modules():
        if isinstance(module, nn.Conv3d):
            module.forward = _low_precision_conv(module, dtype)
        elif isinstance(module, nn.ConvTranspose3d):
            module.forward = _low_precision_transposed(module, dtype)
        elif isinstance(module, AvgPool3x3x3):
            module.forward = _box_mean_as_conv(module)


class _LowPrecisionConv(torch.autograd.Function):
    """A convolution with the tensors of a half-precision one (inputs and weights kept for
    backward in ``x.dtype``, outputs and input gradients in ``x.dtype``), computed in float32:
    CPUs without half-precision units run 3D convolutions far slower in half precision."""

    @staticmethod
    def forward(ctx, x, weight, bias, transposed, stride, padding, dilation, output_padding, groups):
        with Untracked():
            y = torch.ops.aten.convolution(x.float(), weight.float(), None if bias is None else bias.float(), stride,
                                           padding, dilation, transposed, output_padding, groups).to(x.dtype)
        counted(y)
        ctx.save_for_backward(x, weight)
        ctx.settings = (bias is not None, stride, padding, dilation, transposed, output_padding, groups)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        has_bias, stride, padding, dilation, transposed, output_padding, groups = ctx.settings
        with Untracked():
            bias_sizes = [weight.shape[1] * groups if transposed else weight.shape[0]] if has_bias else None
            grads = torch.ops.aten.convolution_backward(
                grad.float(), x.float(), weight.float(), bias_sizes, stride, padding, dilation, transposed,
                output_padding, groups, [True, True, has_bias])
            grad_x, grad_w, grad_b = (None if g is None else g.to(x.dtype) for g in grads)
        counted(grad_x, grad_w, grad_b)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _low_precision_conv(module: nn.Conv3d, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        bias = None if module.bias is None else module.bias.to(dtype)
        return _LowPrecisionConv.apply(x.to(dtype), module.weight.to(dtype), bias, False, list(module.stride),
                                       list(module.padding), list(module.dilation), [0, 0, 0], module.groups)
    return forward


def _low_precision_transposed(module: nn.ConvTranspose3d, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        bias = None if module.bias is None else module.bias.to(dtype)
        return _LowPrecisionConv.apply(x.to(dtype), module.weight.to(dtype), bias, True, list(module.stride),
                                       list(module.padding), list(module.dilation), list(module.output_padding),
                                       module.groups)
    return forward


def _box_mean_as_conv(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    from scnas.build import ops

    # Same tensors as AvgPool3x3x3.forward: torch's avg_pool3d where every axis has >= 3 voxels
    # (it keeps its input, alive anyway, and makes the output); otherwise the explicit form's
    # padded input (kept for backward), output, and one-channel count of real voxels.
    def forward(x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        kernel = torch.full((channels, 1, 3, 3, 3), 1 / 27, dtype=x.dtype, device=x.device)
        stride = [module.stride] * 3
        if ops.TORCH_AVG_POOL and min(x.shape[2:]) >= 3:
            return _LowPrecisionConv.apply(x, kernel, None, False, stride, [1, 1, 1], [1, 1, 1], [0, 0, 0], channels)
        box_mean = _LowPrecisionConv.apply(F.pad(x, (1, 1, 1, 1, 1, 1)), kernel, None, False, stride, [0, 0, 0],
                                           [1, 1, 1], [0, 0, 0], channels)
        ones = F.pad(torch.ones_like(x[:1, :1]), (1, 1, 1, 1, 1, 1))
        real = _LowPrecisionConv.apply(ones, kernel[:1], None, False, stride, [0, 0, 0], [1, 1, 1], [0, 0, 0], 1)
        return box_mean / real
    return forward
