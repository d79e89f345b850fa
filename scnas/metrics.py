"""Losses and overlap measures shared by search, training and evaluation (the one Dice).

The paper trains with the Jaccard distance (Kayalibay et al.): one minus the soft
intersection-over-union of the softmax probabilities and the one-hot labels. With deep
supervision (``--deep-supervision``) the loss is nnU-Net's weighted sum of that loss over the
main output and the coarser heads, each against the labels downsampled to its shape.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from scnas.defaults import LOSS_CHOICES


def jaccard_statistics(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The sums the soft Jaccard loss is made of, per class: row 0 the soft intersection
    sum(p * g), row 1 sum(p) + sum(g), over the batch and all voxels (float32, shape (2, K)).
    Sums over several micro-batches or processes add up to the whole batch's."""
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).float()
    dims = (0, 2, 3, 4)
    intersection = (probs * onehot).sum(dims)
    return torch.stack([intersection, probs.sum(dims) + onehot.sum(dims)])


LOSSES = {name: name.endswith("-fg") for name in LOSS_CHOICES}
"""The loss settings (``--loss``) and whether each leaves the background class (0) out."""


def jaccard_from_statistics(statistics: torch.Tensor, eps: float = 1e-5, foreground_only: bool = False) -> torch.Tensor:
    """Mean over classes of 1 - soft IoU, from :func:`jaccard_statistics`: over all classes
    (background included), or with ``foreground_only`` over classes 1 .. K-1."""
    intersection, total = statistics[0], statistics[1]
    distance = 1.0 - (intersection + eps) / (total - intersection + eps)
    return distance[1:].mean() if foreground_only else distance.mean()


def soft_jaccard_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5,
                      *, foreground_only: bool = False) -> torch.Tensor:
    """Mean over classes (background included unless ``foreground_only``) of 1 - soft IoU, over
    the whole batch (the intersections and unions are sums over all patches and voxels).

    logits (B, K, D, H, W), target (B, D, H, W) integer labels in [0, K).

    Args:
        logits: (B, K, D, H, W).
        target: (B, D, H, W) integer labels.
        eps: smoothing of each class's ratio.
        foreground_only: leave the background class (0) out.
    """
    return jaccard_from_statistics(jaccard_statistics(logits, target), eps, foreground_only)


def dice(prediction, truth, label: int) -> float:
    """Hard Dice of one class between two label maps (numpy arrays or torch tensors of the same
    shape): 2|P & G| / (|P| + |G|); NaN where the class is absent from both (nnU-Net's convention)."""
    p, g = prediction == label, truth == label
    denominator = int(p.sum()) + int(g.sum())
    return float("nan") if denominator == 0 else 2.0 * int((p & g).sum()) / denominator


def dice_per_class(prediction: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[float]:
    """Hard Dice (:func:`dice`) of each foreground class (1 .. K-1) over a batch of label maps;
    NaN where a class is absent from both prediction and target."""
    return [dice(prediction, target, cls) for cls in range(1, num_classes)]


# ---- deep supervision (nnU-Net's weighted loss over the decoder's outputs) ---------------------------

def deep_supervision_weights(outputs: int) -> list[float]:
    """nnU-Net's weights of a network's ``outputs`` (the main one first, then coarser and
    coarser heads): 1/2**i for output i, the coarsest set to 0, normalised to sum 1 (nnU-Net
    v2's ``nnUNetTrainer._build_loss``). Three outputs (depth 3): 2/3, 1/3, 0. A single
    output keeps weight 1."""
    if outputs < 1:
        raise ValueError(f"deep supervision needs at least one output, not {outputs}")
    if outputs == 1:
        return [1.0]
    weights = [1 / 2**i for i in range(outputs)]
    weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def downsampled_target(target: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The integer label map ``target`` (B, D, H, W) at the spatial ``shape`` of a coarser
    output, by nearest-neighbour sampling ('nearest-exact', as nnU-Net v2's
    ``DownsampleSegForDSTransform``): for a factor 2 each output voxel takes the label of the
    voxel at index 2i + 1 of its 2x2x2 block. The same tensor when ``shape`` is its own."""
    if tuple(target.shape[-3:]) == tuple(shape):
        return target
    resized = F.interpolate(target[:, None].float(), size=tuple(shape), mode="nearest-exact")
    return resized[:, 0].to(target.dtype)


def outputs_list(outputs: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A network's output as a list: [main, coarser heads...] in training mode with deep
    supervision, [logits] otherwise."""
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def supervised_statistics(outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """:func:`jaccard_statistics` of every output against ``target`` downsampled to its shape,
    stacked: (outputs, 2, K). Sums over micro-batches and processes add up like those."""
    return torch.stack([jaccard_statistics(out, downsampled_target(target, out.shape[2:]))
                        for out in outputs_list(outputs)])


def supervised_from_statistics(statistics: torch.Tensor, weights: Sequence[float], eps: float = 1e-5,
                               *, foreground_only: bool = False) -> torch.Tensor:
    """The deep-supervision loss from :func:`supervised_statistics`: the ``weights``-weighted sum
    of each output's soft Jaccard loss (an output of weight 0 still takes part, with a zero
    gradient, so that every head's weights are used, as DistributedDataParallel requires).

    Args:
        statistics: from :func:`supervised_statistics`.
        weights: the outputs' weights.
        eps: smoothing of each class's ratio.
        foreground_only: leave the background class out.
    """
    if len(weights) != statistics.shape[0]:
        raise ValueError(f"{len(weights)} deep-supervision weights for {statistics.shape[0]} outputs")
    # Python floats, not a tensor of weights: building one on the GPU each step would wait for it
    losses = [jaccard_from_statistics(s, eps, foreground_only) * float(w) for s, w in zip(statistics, weights)]
    return torch.stack(losses).sum()


def supervised_loss(outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor, weights: Sequence[float],
                    *, eps: float = 1e-5, foreground_only: bool = False) -> torch.Tensor:
    """nnU-Net's deep-supervision loss of one batch: the ``weights``-weighted sum of the soft
    Jaccard loss of each output ([main, coarser heads...]) against the target downsampled to
    that output's shape (:func:`downsampled_target`).

    Args:
        outputs: the main logits, or [main, coarser heads...].
        target: (B, D, H, W) integer labels.
        weights: the outputs' weights.
        eps: smoothing of each class's ratio.
        foreground_only: leave the background class out.
    """
    return supervised_from_statistics(supervised_statistics(outputs, target), weights, eps,
                                      foreground_only=foreground_only)
