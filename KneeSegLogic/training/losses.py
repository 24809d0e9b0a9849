"""Segmentation losses: Dice + cross-entropy, Wang et al.'s dual-level weighted CE, boundary loss.

All take logits ``(B, C, *spatial)`` and integer targets ``(B, *spatial)``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, include_background: bool = False, eps: float = 1e-5
) -> torch.Tensor:
    """1 - mean soft Dice over classes present in the batch (absent classes are skipped)."""
    probabilities = logits.softmax(1)
    one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).float()
    dims = (0, *range(2, logits.ndim))
    intersection = (probabilities * one_hot).sum(dims)
    denominator = probabilities.sum(dims) + one_hot.sum(dims)
    dice = (2 * intersection + eps) / (denominator + eps)
    present = one_hot.sum(dims) > 0
    if not include_background:
        dice, present = dice[1:], present[1:]
    return 1 - dice[present].mean() if present.any() else logits.sum() * 0


def area_ratio_weights(class_voxel_counts: Sequence[float]) -> torch.Tensor:
    """Wang et al.'s external class weights: inverse region-area ratios, normalised to sum 1.

    ``w_c = (1 / r_c) / sum_k (1 / r_k)`` with ``r_c`` the fraction of training voxels in class c
    (classes never seen get the largest weight of the seen ones).
    """
    counts = np.asarray(class_voxel_counts, dtype=float)
    ratios = counts / counts.sum()
    inverse = np.where(ratios > 0, 1 / np.maximum(ratios, 1e-12), 0.0)
    inverse[ratios == 0] = inverse.max() if inverse.max() > 0 else 1.0
    return torch.as_tensor(inverse / inverse.sum(), dtype=torch.float32)


def dual_level_weighted_ce(logits: torch.Tensor, target: torch.Tensor, external_weights: torch.Tensor) -> torch.Tensor:
    """Dual-level weighted cross-entropy (Wang et al.).

    Level 1 (external): fixed per-class weights from the training set's inverse area ratios
    (:func:`area_ratio_weights`). Level 2 (internal): per-batch weights from the batch's own
    inverse area ratios, so a class that is rare *in this batch* is not drowned out. The voxel
    weight is the normalised product of both levels.
    """
    classes = logits.shape[1]
    counts = torch.bincount(target.reshape(-1), minlength=classes).float()
    internal = torch.where(counts > 0, counts.sum() / counts.clamp(min=1), torch.zeros_like(counts))
    internal = internal / internal.sum()
    weights = external_weights.to(logits.device) * internal.to(logits.device)
    weights = weights / weights.sum().clamp(min=1e-12) * classes
    return F.cross_entropy(logits, target, weight=weights)


def signed_distance_maps(target: torch.Tensor, classes: int) -> torch.Tensor:
    """Per-class signed distance (voxels; negative inside) of each target, for the boundary loss."""
    array = target.cpu().numpy()
    maps = np.zeros((array.shape[0], classes, *array.shape[1:]), np.float32)
    for b in range(array.shape[0]):
        for c in range(1, classes):
            mask = array[b] == c
            if mask.any() and not mask.all():
                maps[b, c] = ndimage.distance_transform_edt(~mask) - ndimage.distance_transform_edt(mask)
    return torch.from_numpy(maps).to(target.device)


def boundary_loss(logits: torch.Tensor, distance_maps: torch.Tensor) -> torch.Tensor:
    """Kervadec et al.'s boundary loss: mean of foreground probabilities times signed distance."""
    probabilities = logits.softmax(1)[:, 1:]
    return (probabilities * distance_maps[:, 1:]).mean()


class MixedLoss(torch.nn.Module):
    """``tau_dice * Dice + tau_ce * CE + tau_boundary * boundary`` (Wang et al.'s mixed loss).

    ``external_weights`` switches the CE term to the dual-level weighted CE.
    """

    def __init__(
        self,
        tau_dice: float = 1.0,
        tau_ce: float = 1.0,
        tau_boundary: float = 0.0,
        external_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.tau_dice, self.tau_ce, self.tau_boundary = tau_dice, tau_ce, tau_boundary
        self.external_weights = external_weights

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.tau_dice * soft_dice_loss(logits, target)
        if self.external_weights is not None:
            loss = loss + self.tau_ce * dual_level_weighted_ce(logits, target, self.external_weights)
        else:
            loss = loss + self.tau_ce * F.cross_entropy(logits, target)
        if self.tau_boundary > 0:
            loss = loss + self.tau_boundary * boundary_loss(logits, signed_distance_maps(target, logits.shape[1]))
        return loss


#: The training losses ``kneeseg train --loss`` offers (Wang et al.'s mixed loss and its parts).
LOSSES = {
    "dice-ce": "soft Dice + cross-entropy",
    "dice-wce": "soft Dice + dual-level weighted cross-entropy (class weights from the training labels' area ratios)",
    "dice-ce-boundary": "soft Dice + cross-entropy + 0.1 x boundary loss (Kervadec et al.)",
}


def make_loss(name: str, class_voxel_counts: Sequence[float]) -> MixedLoss:
    """The loss called ``name`` (a key of :data:`LOSSES`); ``class_voxel_counts`` per label value
    over the training label maps give the dual-level CE's external weights."""
    if name == "dice-ce":
        return MixedLoss(tau_dice=1.0, tau_ce=1.0)
    if name == "dice-wce":
        return MixedLoss(tau_dice=1.0, tau_ce=1.0, external_weights=area_ratio_weights(class_voxel_counts))
    if name == "dice-ce-boundary":
        return MixedLoss(tau_dice=1.0, tau_ce=1.0, tau_boundary=0.1)
    raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
