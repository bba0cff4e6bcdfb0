"""Spotlight's foreground-aware loss: lambda masked MSE + (1 - lambda) soft Dice of a tunable sigmoid (Kalinin et al. 2025).

* :func:`soft_threshold` - the normalised tunable sigmoid ``sigma_k`` of Spotlight.
* :func:`masked_mse` - ``sum(M (Y - Yhat)^2) / sum(M)`` per sample and channel.
* :func:`soft_dice_loss` - ``1 - 2 sum(S M) / (sum S + sum M + eps)`` per sample and channel.
* :class:`SpotlightLoss` - ``lambda * MMSE + (1 - lambda) * Dice(sigma_k(pred), M)``
  ("Foreground-aware Virtual Staining for Accurate 3D Cell Morphological Profiling", 2025,
  section 2 and appendix A.4). Its label is ``[targets..., masks...]`` (see :mod:`common.losses`).

Tensors are batch-first, ``(B, C, Z, Y, X)`` or ``(B, C, Y, X)``.
"""

from __future__ import annotations

import torch
from torch import nn

from common.losses import _spatial

__all__ = ["soft_threshold", "masked_mse", "soft_dice_loss", "SpotlightLoss"]


_CLAMPS = {"min": (0.0, None), "both": (0.0, 1.0), "none": (None, None), "rescaled": (-1.0, 1.0), True: (0.0, 1.0),
           False: (None, None)}


def soft_threshold(x: torch.Tensor, k: float = -0.95, clamp: str | bool = "min") -> torch.Tensor:
    """Normalised tunable sigmoid ``sigma_k(x) = (x - k x) / (k - 2 k |x| + 1)`` (Emery 2022).

    For ``k`` in ``(-1, 0)`` the denominator ``1 + k (1 - 2|x|)`` is at least ``1 + k > 0``, so the
    function is finite, odd and increasing. Known points: ``sigma(0) = 0``, ``sigma(+-1) = +-1``;
    with ``k = -0.95``, ``sigma(0.5) = 0.975`` and ``sigma'(0) = (1 - k) / (1 + k) = 39``: a sharp
    soft step at 0, which after Otsu standardisation (:class:`common.spotlight.OtsuStandardize`)
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
