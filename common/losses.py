"""Generic losses: class-imbalance losses for semantic segmentation and the extra-channel label convention.

Losses that need more than ``(pred, target)``: MONAI's ``SupervisedTrainer`` calls
``loss_function(pred, label)``. The zoo's one mechanism for a loss that needs more (a foreground
mask, a weight map, a distance map) is to **carry the extra maps as additional channels of the
label** and let the loss split them: build them with a transform (e.g.
:class:`common.transforms.ForegroundMaskd`) and stack them onto the label with MONAI's
``ConcatItemsd(keys=["label", "fg"], name="label")`` in the *training* pipeline only (validation
metrics keep comparing ``pred`` with the plain 1-channel label). The loss documents its label
layout (:class:`common.spotlight.SpotlightLoss`: ``[targets..., masks...]``;
:class:`common.isl.DistanceMaskLoss`: ``[distance, mask]``).

Method losses live in their packages; the soft Jaccard of ``isl_nucleus_seg`` is MONAI's
``DiceLoss(jaccard=True)``.

Tensors are batch-first, ``(B, C, Z, Y, X)`` or ``(B, C, Y, X)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = []


def _spatial(t: torch.Tensor) -> tuple:
    if t.ndim < 3:
        raise ValueError(f"expected batch-first tensors (B, C, ...spatial), got shape {tuple(t.shape)}")
    return tuple(range(2, t.ndim))



# ----------------------------------------------------------------------------- class-imbalance
# losses for semantic segmentation (unet3d_fucci: background 0 / edge 1 / nucleus 2)
#
# Logits ``(B, C, ...)``; label ``(B, 1, ...)`` class indices (as MONAI's ``SupervisedTrainer``
# passes it, float or int) or ``(B, ...)``.

__all__ += ["WeightedCrossEntropyLoss", "SoftmaxFocalLoss", "WeightedSoftIoULoss", "make_class_loss"]



def _class_index(label: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """``(B, ...)`` int64 class indices from a ``(B, 1, ...)`` or ``(B, ...)`` label, checked."""
    lab = torch.as_tensor(label)
    if lab.ndim == pred.ndim and lab.shape[1] == 1:
        lab = lab[:, 0]
    if lab.shape != pred.shape[:1] + pred.shape[2:]:
        raise ValueError(f"label {tuple(torch.as_tensor(label).shape)} does not match logits {tuple(pred.shape)}: "
                         "expected (B, 1, ...) or (B, ...) class indices")
    lab = lab.round().long() if lab.is_floating_point() else lab.long()
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= pred.shape[1]):
        raise ValueError(f"label values must be class indices 0..{pred.shape[1] - 1}, got "
                         f"{int(lab.min())}..{int(lab.max())} (an instance map? make the semantic map first)")
    return lab


class WeightedCrossEntropyLoss(nn.Module):
    """Class-weighted cross-entropy ``sum_i w[y_i] (-log p_i[y_i]) / sum_i w[y_i]``.

    ``torch.nn.CrossEntropyLoss(weight=w)`` (weighted mean over voxels) taking MONAI-style
    ``(B, 1, ...)`` labels. The thesis' best setting weights ``[background, edge, nucleus]`` as
    ``[1, 3, 2]``.

    Args:
        weight: one weight per class, or ``None`` for plain cross-entropy.
    """

    def __init__(self, weight: Sequence[float] | None = (1.0, 3.0, 2.0)):
        super().__init__()
        w = None if weight is None else torch.as_tensor([float(v) for v in weight])
        if w is not None and (w < 0).any():
            raise ValueError(f"class weights must be >= 0, got {weight}")
        self.register_buffer("weight", w)

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        lab = _class_index(label, pred)
        if self.weight is not None and self.weight.numel() != pred.shape[1]:
            raise ValueError(f"{self.weight.numel()} class weights for {pred.shape[1]} classes")
        w = None if self.weight is None else self.weight.to(pred.device, pred.dtype)
        return nn.functional.cross_entropy(torch.as_tensor(pred), lab.to(pred.device), weight=w)


class SoftmaxFocalLoss(nn.Module):
    """Softmax focal loss ``mean_i w[y_i] (1 - p_i[y_i])^gamma (-log p_i[y_i])`` (Lin et al. 2017).

    MONAI's ``FocalLoss(use_softmax=True, to_onehot_y=True, weight=w, reduction="none")`` summed over
    the class axis (only the true class is non-zero) and averaged over voxels, so that with
    ``gamma=0`` and no weights it equals the plain cross-entropy (MONAI's ``"mean"`` reduction would
    also divide by the number of classes).

    Args:
        gamma: focusing exponent (2 in Lin et al.).
        weight: one weight per class (``[background, edge, nucleus]``), or ``None``.
    """

    def __init__(self, gamma: float = 2.0, weight: Sequence[float] | None = None):
        super().__init__()
        from monai.losses import FocalLoss

        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.focal = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=self.gamma,
                               weight=None if weight is None else [float(v) for v in weight], reduction="none")

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        lab = _class_index(label, pred)[:, None]
        return self.focal(torch.as_tensor(pred), lab.to(pred.device)).sum(1).mean()


class WeightedSoftIoULoss(nn.Module):
    """Class-weighted soft IoU (Jaccard) loss, the thesis' eq. 8 as we implement it:

    ``L = sum_c w_c (1 - IoU_c) / sum_c w_c`` with
    ``IoU_c = sum_i p_ic y_ic / sum_i (p_ic + y_ic - p_ic y_ic)`` over all voxels of the batch
    (softmax probabilities ``p``, one-hot labels ``y``).

    MONAI's ``DiceLoss(jaccard=True, softmax=True, to_onehot_y=True, batch=True)`` with class
    weights ``w_c C / sum(w)`` (its mean over classes then equals the normalised weighted sum);
    ``smooth_nr = smooth_dr = 1e-5`` keep an absent class finite (IoU 1 when absent from both).

    Args:
        weight: one weight per class, or ``None`` for equal weights.
    """

    def __init__(self, weight: Sequence[float] | None = (1.0, 3.0, 2.0), smooth: float = 1e-5):
        super().__init__()
        from monai.losses import DiceLoss

        self.class_weight = None if weight is None else [float(v) for v in weight]
        if self.class_weight is not None and (min(self.class_weight) < 0 or sum(self.class_weight) <= 0):
            raise ValueError(f"class weights must be >= 0 with a positive sum, got {weight}")
        w = None
        if self.class_weight is not None:
            n = len(self.class_weight)
            w = [v * n / sum(self.class_weight) for v in self.class_weight]
        self.iou = DiceLoss(jaccard=True, softmax=True, to_onehot_y=True, batch=True, weight=w,
                            smooth_nr=smooth, smooth_dr=smooth)

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if self.class_weight is not None and len(self.class_weight) != pred.shape[1]:
            raise ValueError(f"{len(self.class_weight)} class weights for {pred.shape[1]} classes")
        lab = _class_index(label, pred)[:, None]
        return self.iou(torch.as_tensor(pred), lab.to(pred.device))


def make_class_loss(name: str = "weighted_ce", weight: Sequence[float] | None = (1.0, 3.0, 2.0),
                    gamma: float = 2.0) -> nn.Module:
    """The loss named in a config: ``"weighted_ce"``, ``"focal"`` or ``"soft_iou"``."""
    name = str(name).lower()
    if name in ("weighted_ce", "ce", "cross_entropy"):
        return WeightedCrossEntropyLoss(weight)
    if name == "focal":
        return SoftmaxFocalLoss(gamma, weight)
    if name in ("soft_iou", "iou", "jaccard"):
        return WeightedSoftIoULoss(weight)
    raise ValueError(f"unknown loss {name!r}: use 'weighted_ce', 'focal' or 'soft_iou'")


