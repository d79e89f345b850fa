"""Build settings: everything besides the genotype that fixes a network's shape."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from scnas import defaults as D
from scnas.errors import ScnasError


class BuildError(ScnasError, ValueError):
    """A network that cannot be built or run as asked (bad settings, input of the wrong shape)."""


class BuildConfig(BaseModel):
    """How to turn a genotype into a network. Saved beside the weights in every model file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stem_channels: int = Field(D.STEM_TRAIN, ge=1, description="channels of the stem output (level 0); level l cells are "
                                                     "stem_channels * 2**l wide")
    in_channels: int = Field(D.IN_CHANNELS, ge=1, description="input image channels (MRI sequences, CT: 1)")
    num_classes: int = Field(D.NUM_CLASSES, ge=1, description="classes including background: output channels "
                                                            "(logits), one per class the loss sees")
    depth: int = Field(D.DEPTH, ge=1, le=8, description="number of down-samplings (reduction cells); inputs must be "
                                                   "divisible by 2**depth")
    upsampling: Literal[D.UPSAMPLING_CHOICES] = Field(
        D.UPSAMPLING, description="how expansion cells and coarser inputs are brought up a level: trilinear "
                                 "interpolation then 1x1x1 conv, or a transposed conv (kernel = stride = 2)")
    negative_slope: float = Field(0.01, ge=0.0, description="LeakyReLU slope")
    deep_supervision: bool = Field(D.DEEP_SUPERVISION, description="extra 1x1x1 heads on the decoder cells above "
                                                                  "level 0; in training mode forward() then returns "
                                                                  "[main, coarser...] (eval mode: the main output only)")

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this."""
        return 2 ** self.depth
