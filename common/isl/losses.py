"""ISL losses: distance map + mask loss of the cell-instance stage (the soft Jaccard is MONAI's DiceLoss(jaccard=True))."""

from __future__ import annotations

import torch
from torch import nn

from common.losses import _spatial

__all__ = ["DistanceMaskLoss"]


class DistanceMaskLoss(nn.Module):
    """``MSE(distance) + alpha * BCEWithLogits(mask)`` for a 2-channel prediction (Bonte et al.).

    Layout: ``pred`` is ``(B, 2, ...)`` = ``[distance, mask logit]`` (raw network output), ``label``
    ``(B, 2, ...)`` = ``[normalised distance, binary mask]`` as built by
    :class:`common.isl.DistanceMaskTargetd`. Both terms are means over all pixels of the
    batch, so the loss is finite for empty masks (an all-background patch is a valid target: zero
    distance, mask 0).

    Args:
        alpha: weight of the mask term (paper 2000).
        pos_weight: optional weight of foreground pixels in the BCE (``BCEWithLogitsLoss``'s).
        distance_channel, mask_channel: channel indices in both tensors.
    """

    def __init__(self, alpha: float = 2000.0, pos_weight: float | None = None, distance_channel: int = 0,
                 mask_channel: int = 1):
        super().__init__()
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.distance_channel = int(distance_channel)
        self.mask_channel = int(mask_channel)
        self.pos_weight = None if pos_weight is None else float(pos_weight)

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        _spatial(pred)
        if pred.shape != label.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and label {tuple(label.shape)} must have the same shape "
                             "([distance, mask] channels each)")
        c = max(self.distance_channel, self.mask_channel)
        if pred.shape[1] <= c:
            raise ValueError(f"pred has {pred.shape[1]} channels; needs channels {self.distance_channel} (distance) "
                             f"and {self.mask_channel} (mask)")
        label = label.to(pred.dtype)
        dc, mc = self.distance_channel, self.mask_channel
        mse = torch.mean((pred[:, dc] - label[:, dc]) ** 2)
        pw = None if self.pos_weight is None else torch.tensor(self.pos_weight, dtype=pred.dtype, device=pred.device)
        bce = nn.functional.binary_cross_entropy_with_logits(pred[:, mc], label[:, mc], pos_weight=pw)
        return mse + self.alpha * bce
