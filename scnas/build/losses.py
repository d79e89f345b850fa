"""Compatibility: the losses and Dice live in :mod:`scnas.metrics` (shared by search, training
and evaluation, not part of building networks)."""

from scnas.metrics import (LOSSES, dice, dice_per_class, jaccard_from_statistics, jaccard_statistics,
                           soft_jaccard_loss)

__all__ = ["LOSSES", "dice", "dice_per_class", "jaccard_from_statistics", "jaccard_statistics", "soft_jaccard_loss"]
