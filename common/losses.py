"""Losses shared by the zoo's bundles.

Losses that need more than ``(pred, target)``
---------------------------------------------
MONAI's ``SupervisedTrainer`` calls ``loss_function(pred, label)``. The zoo's one mechanism for a
loss that needs more (a foreground mask, a weight map, a distance map) is to **carry the extra
maps as additional channels of the label** and let the loss split them: build them with a
transform (e.g. :class:`common.transforms.ForegroundMaskd`) and stack them onto the label with
MONAI's ``ConcatItemsd(keys=["label", "fg"], name="label")`` in the *training* pipeline only
(validation metrics keep comparing ``pred`` with the plain 1-channel label). The loss documents
its label layout; for :class:`SpotlightLoss` it is ``[targets..., masks...]``.

Contents
--------
* :func:`soft_threshold` - the normalised tunable sigmoid ``sigma_k`` of Spotlight.
* :func:`masked_mse` - ``sum(M (Y - Yhat)^2) / sum(M)`` per sample and channel.
* :func:`soft_dice_loss` - ``1 - 2 sum(S M) / (sum S + sum M + eps)`` per sample and channel.
* :class:`SpotlightLoss` - ``lambda * MMSE + (1 - lambda) * Dice(sigma_k(pred), M)``
  (Kalinin et al., "Foreground-aware Virtual Staining for Accurate 3D Cell Morphological
  Profiling", 2025, section 2 and appendix A.4).

Tensors are batch-first, ``(B, C, Z, Y, X)`` or ``(B, C, Y, X)``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["soft_threshold", "masked_mse", "soft_dice_loss", "SpotlightLoss"]


_CLAMPS = {"min": (0.0, None), "both": (0.0, 1.0), "none": (None, None), "rescaled": (-1.0, 1.0), True: (0.0, 1.0),
           False: (None, None)}


def soft_threshold(x: torch.Tensor, k: float = -0.95, clamp: str | bool = "min") -> torch.Tensor:
    """Normalised tunable sigmoid ``sigma_k(x) = (x - k x) / (k - 2 k |x| + 1)`` (Emery 2022).

    For ``k`` in ``(-1, 0)`` the denominator ``1 + k (1 - 2|x|)`` is at least ``1 + k > 0``, so the
    function is finite, odd and increasing. Known points: ``sigma(0) = 0``, ``sigma(+-1) = +-1``;
    with ``k = -0.95``, ``sigma(0.5) = 0.975`` and ``sigma'(0) = (1 - k) / (1 + k) = 39``: a sharp
    soft step at 0, which after Otsu standardisation (:class:`common.transforms.OtsuStandardize`)
    is the foreground threshold. For ``|x| > 1`` the value exceeds 1 in magnitude slightly and
    tends to ``(1 - k) / (-2 k)`` (1.026 for ``k = -0.95``); the slope there,
    ``(1 - k)(1 + k) / (1 + k - 2 k |x|)^2``, is small (0.026 at ``|x| = 1``) but not zero.

    Args:
        x: any shape.
        k: sharpness in ``(-1, 0)``; closer to -1 is sharper. The paper uses -0.95.
        clamp: ``"min"`` (default, the zoo's choice): ``max(sigma, 0)``. A lower clamp is needed
            because negative values (background, ``x < 0``) would enter the Dice denominator
            ``sum S + sum M`` with a minus sign and can drive it through zero (a pole). No upper
            clamp: with ``"both"`` (``[0, 1]``, VisCy's ``SpotlightLoss``) a background voxel
            predicted above 1 gets exactly zero gradient from the Dice term and none from the
            masked MSE, so nothing ever pulls it down (measured: a short training run then predicts
            everything as foreground, see ``bundles/spotlight_dna/docs/README.md``). ``"none"``
            (or ``False``): the raw formula as written in the paper. ``True`` means ``"both"``.
            ``"rescaled"``: ``(clamp(sigma, -1, 1) + 1) / 2``, which maps ``[-1, 1]`` onto ``[0, 1]``
            and keeps a gradient on background voxels down to ``x = -1`` (so the Dice term pulls
            the background towards one low level), none below -1 or above 1.

    Returns:
        tensor of the shape of ``x``.
    """
    if not -1.0 < k < 0.0:
        raise ValueError(f"k must be in (-1, 0), got {k}")
    if clamp not in _CLAMPS:
        raise ValueError(f"clamp must be 'min', 'both', 'none' or 'rescaled', got {clamp!r}")
    raw = (x - k * x) / (k - 2.0 * k * x.abs() + 1.0)
    if clamp == "rescaled":
        return (raw.clamp(-1.0, 1.0) + 1.0) / 2.0
    lo, hi = _CLAMPS[clamp]
    return raw if lo is None and hi is None else raw.clamp(lo, hi)


def _spatial(t: torch.Tensor) -> tuple:
    if t.ndim < 3:
        raise ValueError(f"expected batch-first tensors (B, C, ...spatial), got shape {tuple(t.shape)}")
    return tuple(range(2, t.ndim))


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean squared error per sample and channel: ``sum(M (Y - Yhat)^2) / sum(M)``.

    Empty mask: a sample/channel whose mask has no voxel falls back to the plain MSE over all its
    voxels (defined, finite, still supervised), as VisCy does.

    Args:
        pred, target: ``(B, C, ...)``.
        mask: ``(B, C, ...)`` with values in ``[0, 1]`` (binary foreground, or weights).

    Returns:
        ``(B, C)`` tensor.
    """
    dims = _spatial(pred)
    if pred.shape != target.shape or mask.shape != pred.shape:
        raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask {tuple(mask.shape)} "
                         "must have the same shape")
    mask = mask.to(pred.dtype)
    sq = (pred - target) ** 2
    n = mask.sum(dims)
    masked = (sq * mask).sum(dims) / torch.where(n > 0, n, torch.ones_like(n))
    return torch.where(n > 0, masked, sq.mean(dims))


def soft_dice_loss(soft: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Soft Dice loss per sample and channel: ``1 - 2 sum(S M) / (sum S + sum M + eps)``.

    Args:
        soft: ``(B, C, ...)`` soft foreground, >= 0 (e.g. :func:`soft_threshold` of a prediction).
        mask: ``(B, C, ...)`` binary foreground.
        eps: keeps the ratio finite when both sums are 0 (the loss is then 1).

    Returns:
        ``(B, C)`` tensor, in ``[0, 1]`` for inputs in ``[0, 1]``.
    """
    dims = _spatial(soft)
    if soft.shape != mask.shape:
        raise ValueError(f"soft {tuple(soft.shape)} and mask {tuple(mask.shape)} must have the same shape")
    mask = mask.to(soft.dtype)
    inter = (soft * mask).sum(dims)
    return 1.0 - 2.0 * inter / (soft.sum(dims) + mask.sum(dims) + eps)


class SpotlightLoss(nn.Module):
    """Foreground-aware loss of Spotlight: ``lambda * MMSE + (1 - lambda) * Dice(sigma_k(pred), M)``.

    ``MMSE`` is :func:`masked_mse`, ``Dice`` is :func:`soft_dice_loss` of :func:`soft_threshold`
    of the prediction against the binary foreground ``M``. Both are computed per sample and channel
    and averaged, so every patch counts equally whatever its foreground fraction.

    Label layout (the zoo's mechanism for extra loss inputs, see the module docstring): ``label``
    has ``2 C`` channels for a ``C``-channel prediction, the targets first and their foreground
    masks after (``ConcatItemsd(keys=["label", "fg"], name="label")``). A label with only ``C``
    channels is accepted too: the mask is then ``target >= fg_threshold`` (0.0 by default, which
    is the Otsu threshold of an Otsu-standardised target), e.g. for validation losses.

    Empty masks: a sample/channel without foreground contributes the plain MSE to the MMSE term
    and is left out of the Dice average (its Dice would be the constant 1, no gradient); when no
    sample of the batch has foreground the Dice term is 0. So the loss is never NaN.

    Args:
        lambda_mse: weight of the MMSE term, ``[0, 1]`` (paper 0.5).
        k: sharpness of :func:`soft_threshold`, ``(-1, 0)`` (paper -0.95).
        eps: Dice denominator epsilon.
        clamp: ``"min"`` (default), ``"both"`` (VisCy), ``"none"`` (the paper's formula) or
            ``"rescaled"`` (see :func:`soft_threshold`).
        fg_threshold: threshold for labels that carry no mask channel.
    """

    def __init__(self, lambda_mse: float = 0.5, k: float = -0.95, eps: float = 1e-6, clamp: str | bool = "min",
                 fg_threshold: float = 0.0):
        super().__init__()
        if not 0.0 <= lambda_mse <= 1.0:
            raise ValueError(f"lambda_mse must be in [0, 1], got {lambda_mse}")
        if not -1.0 < k < 0.0:
            raise ValueError(f"k must be in (-1, 0), got {k}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.lambda_mse = float(lambda_mse)
        self.k = float(k)
        self.eps = float(eps)
        if clamp not in _CLAMPS:
            raise ValueError(f"clamp must be 'min', 'both', 'none' or 'rescaled', got {clamp!r}")
        self.clamp = clamp
        self.fg_threshold = float(fg_threshold)

    def split_label(self, pred: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(target, mask)`` from a label of ``2 C`` (targets, masks) or ``C`` channels."""
        c = pred.shape[1]
        if label.shape[0] != pred.shape[0] or label.shape[2:] != pred.shape[2:]:
            raise ValueError(f"label {tuple(label.shape)} does not match pred {tuple(pred.shape)}")
        if label.shape[1] == 2 * c:
            return label[:, :c], (label[:, c:] > 0.5).to(pred.dtype)
        if label.shape[1] == c:
            return label, (label >= self.fg_threshold).to(pred.dtype)
        raise ValueError(f"label has {label.shape[1]} channels; expected {2 * c} (targets + foreground masks) "
                         f"or {c} (targets only) for a {c}-channel prediction")

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        target, mask = self.split_label(pred, label)
        target = target.to(pred.dtype)
        mmse = masked_mse(pred, target, mask).mean()
        dims = _spatial(pred)
        has_fg = mask.sum(dims) > 0
        if self.lambda_mse == 1.0:
            return mmse
        if has_fg.any():
            dice = soft_dice_loss(soft_threshold(pred, self.k, self.clamp), mask, self.eps)
            dice = (dice * has_fg).sum() / has_fg.sum()
        else:
            dice = pred.sum() * 0.0  # keeps the graph; no foreground anywhere in the batch
        return self.lambda_mse * mmse + (1.0 - self.lambda_mse) * dice


# ----------------------------------------------------------------------------- class-imbalance
# losses for semantic segmentation (unet3d_fucci: background 0 / edge 1 / nucleus 2)
#
# Logits ``(B, C, ...)``; label ``(B, 1, ...)`` class indices (as MONAI's ``SupervisedTrainer``
# passes it, float or int) or ``(B, ...)``.

__all__ += ["WeightedCrossEntropyLoss", "SoftmaxFocalLoss", "WeightedSoftIoULoss", "make_class_loss"]

from collections.abc import Sequence  # noqa: E402  (this section's own import)


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


