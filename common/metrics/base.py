"""Shared pieces of the metrics: the IoU thresholds, the named error for undefined inputs, input checks."""

from __future__ import annotations

import numpy as np

from common.errors import ZooError

__all__ = ["DEFAULT_IOU_THRESHOLDS", "DegenerateInputError"]


#: IoU thresholds 0.50, 0.55, ..., 0.95 (rounded, so that 0.55 is exactly 0.55).
DEFAULT_IOU_THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)


class DegenerateInputError(ZooError):
    """A metric is undefined on this input (constant image, empty mask, image smaller than the
    metric's window); the message says which input, what is wrong and what to do."""


# ----------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------
def _pair(pred, target, mask=None, name="pred"):
    """Validate shapes; return float64 arrays restricted to ``mask`` (flattened) or whole."""
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape:
        raise ValueError(f"{name} and target must have the same shape, got {pred.shape} and {target.shape}")
    if mask is not None:
        mask = _as_mask(mask, target.shape)
        if not mask.any():
            raise DegenerateInputError("mask is empty: no voxel to evaluate; give a mask with foreground, or "
                                       "evaluate the whole image (mask=None)")
        return pred[mask], target[mask]
    return pred, target


def _as_mask(mask, shape):
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"mask shape {mask.shape} does not match image shape {tuple(shape)}")
    return mask.astype(bool, copy=False)


def _safe_ratio(num, den, empty_value):
    """num / den elementwise, ``empty_value`` where den == 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, empty_value, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _spacing_tuple(spacing, ndim):
    if np.isscalar(spacing):
        return (float(spacing),) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise ValueError(f"spacing has {len(spacing)} entries for a {ndim}D image")
    return spacing


def _images_2d3d(a, b, names=("pred", "target"), what="the metric"):
    """``a``, ``b`` as float64 arrays of one shape, 2D (YX) or 3D (ZYX); a ``ValueError`` otherwise."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim not in (2, 3):
        raise ValueError(f"{what} expects a 2D (YX) or 3D (ZYX) image, got ndim={a.ndim}")
    return a, b
