"""Losses and overlap measures shared by search, training and evaluation (the one Dice).

The paper trains with the Jaccard distance (Kayalibay et al.): one minus the soft
intersection-over-union of the softmax probabilities and the one-hot labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def jaccard_statistics(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The sums the soft Jaccard loss is made of, per class: row 0 the soft intersection
    sum(p * g), row 1 sum(p) + sum(g), over the batch and all voxels (float32, shape (2, K)).
    Sums over several micro-batches or processes add up to the whole batch's."""
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).float()
    dims = (0, 2, 3, 4)
    intersection = (probs * onehot).sum(dims)
    return torch.stack([intersection, probs.sum(dims) + onehot.sum(dims)])


LOSSES = {"jaccard": False, "jaccard-fg": True}
"""The loss settings (``--loss``) and whether each leaves the background class (0) out."""


def jaccard_from_statistics(statistics: torch.Tensor, eps: float = 1e-5, foreground_only: bool = False) -> torch.Tensor:
    """Mean over classes of 1 - soft IoU, from :func:`jaccard_statistics`: over all classes
    (background included), or with ``foreground_only`` over classes 1 .. K-1."""
    intersection, total = statistics[0], statistics[1]
    distance = 1.0 - (intersection + eps) / (total - intersection + eps)
    return distance[1:].mean() if foreground_only else distance.mean()


def soft_jaccard_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5,
                      foreground_only: bool = False) -> torch.Tensor:
    """Mean over classes (background included unless ``foreground_only``) of 1 - soft IoU, over
    the whole batch (the intersections and unions are sums over all patches and voxels).

    logits (B, K, D, H, W), target (B, D, H, W) integer labels in [0, K)."""
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
