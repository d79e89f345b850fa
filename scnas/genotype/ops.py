"""The operation vocabulary: the one place that names the candidate operations.

The genotype validates edges against this table, the builder derives each op's module from
its row (family, kernel, dilation, separable, pooling), the drawings colour by family. Adding
an operation of a known kind (another kernel, dilation or separable conv) is one row here;
a new kind also needs its module in ``scnas.build.ops``.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass


@dataclass(frozen=True)
class OpSpec:
    """What the rest of scnas needs to know about an operation without building it."""

    name: str
    family: str          # "conv", "pool", "identity" or "zero"
    parametric: bool     # has learnable weights
    _: KW_ONLY
    description: str
    kernel: int = 0      # spatial kernel size (0: none)
    dilation: int = 1
    separable: bool = False  # depthwise-separable (depthwise kxkxk, then pointwise 1x1x1)
    pooling: str = ""        # "max" or "avg" for the pool family


_TABLE = (
    OpSpec("zero", "zero", False, description="no connection (learned connectivity); never written as an edge"),
    OpSpec("identity", "identity", False, description="skip connection (strided 1x1x1 conv when the edge reduces)"),
    OpSpec("conv_3x3x3", "conv", True, description="LeakyReLU-Conv3x3x3-InstanceNorm", kernel=3),
    OpSpec("sep_dil2_conv_3x3x3", "conv", True,
           description="LeakyReLU-depthwise-separable 3x3x3 conv, dilation 2-InstanceNorm", kernel=3, dilation=2,
           separable=True),
    OpSpec("sep_dil3_conv_3x3x3", "conv", True,
           description="LeakyReLU-depthwise-separable 3x3x3 conv, dilation 3-InstanceNorm", kernel=3, dilation=3,
           separable=True),
    OpSpec("sep_dil4_conv_3x3x3", "conv", True,
           description="LeakyReLU-depthwise-separable 3x3x3 conv, dilation 4-InstanceNorm", kernel=3, dilation=4,
           separable=True),
    OpSpec("max_pool_3x3x3", "pool", False, description="3x3x3 max pooling", kernel=3, pooling="max"),
    OpSpec("avg_pool_3x3x3", "pool", False, description="3x3x3 average pooling (padding not counted)", kernel=3,
           pooling="avg"),
)

OPS: dict[str, OpSpec] = {spec.name: spec for spec in _TABLE}
"""Every operation scnas knows, by name."""

PAPER_OPS: tuple[str, ...] = tuple(spec.name for spec in _TABLE)
"""The search space of the paper (Section 3): all eight operations, ``zero`` included."""

ZERO = "zero"


def known_ops_text() -> str:
    """The known names, for error messages."""
    return ", ".join(OPS)
