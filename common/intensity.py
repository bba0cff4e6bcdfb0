"""Robust per-image intensity normalisation for label-free microscopy inputs.

Why not MONAI's ``ScaleIntensityRangePercentiles``: it takes the percentiles over every pixel, so
zero padding (stitched or registered fields) and saturated pixels move the low / high percentiles;
here they are left out of the statistics (and zero padding can be filled), and a smooth
illumination gradient can be divided out first.

Two transforms, each as an array transform (``CYX`` / ``CZYX`` arrays or tensors, channel first)
and a dictionary twin:

* :class:`RobustScaleIntensity` / :class:`RobustScaleIntensityd`: per channel, map the ``lower`` /
  ``upper`` percentiles of the *valid* pixels (not exactly 0 when ``ignore_zeros``, below the
  channel maximum when ``ignore_saturated``) to ``b_min`` / ``b_max``;
* :class:`DivideBackground` / :class:`DivideBackgroundd`: per channel, divide by a Gaussian-blurred
  copy (standard deviation ``sigma`` pixels) computed from the valid pixels only (normalised
  convolution), a flat-field correction for smooth vignetting.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from common.errors import ZooError

__all__ = ["valid_mask", "robust_percentiles", "RobustScaleIntensity", "RobustScaleIntensityd", "DivideBackground",
           "DivideBackgroundd", "NormalisationError"]


class NormalisationError(ZooError, ValueError):
    """Bad normalisation parameters (percentiles out of order or out of ``[0, 100]``, ``sigma <= 0``)."""


def _as_numpy(img) -> tuple[np.ndarray, bool]:
    if isinstance(img, torch.Tensor):
        return img.detach().cpu().numpy(), True
    return np.asarray(img), False


def _like(out: np.ndarray, img):
    if isinstance(img, torch.Tensor):
        t = torch.as_tensor(out, device=img.device)
        if hasattr(img, "copy_meta_from"):  # MetaTensor: keep the metadata
            from monai.data import MetaTensor

            return MetaTensor(t, meta=img.meta, applied_operations=list(getattr(img, "applied_operations", [])))
        return t
    return out


def valid_mask(channel: np.ndarray, ignore_zeros: bool = True, ignore_saturated: bool = True) -> np.ndarray:
    """Pixels used for the statistics of one channel (any shape): not exactly 0, not at the channel maximum.

    A pixel at the maximum counts as saturated only when at least two pixels share that value
    (an unsaturated image has one brightest pixel, which is kept). When nothing is left, every
    pixel is valid.

    Returns:
        boolean array of ``channel``'s shape.
    """
    ok = np.isfinite(channel)
    if ignore_zeros:
        ok &= channel != 0
    if ignore_saturated and ok.any():
        top = channel[ok].max()
        at_top = ok & (channel == top)
        if at_top.sum() > 1:
            ok &= ~at_top
    return ok if ok.any() else np.ones_like(ok)


def robust_percentiles(img, lower: float, upper: float, ignore_zeros: bool = True,
                       ignore_saturated: bool = True) -> np.ndarray:
    """Per-channel ``lower`` and ``upper`` percentiles of the valid pixels (see :func:`valid_mask`).

    Args:
        img: ``C...`` array or tensor, channel first.

    Returns:
        ``(C, 2)`` float64 array of ``(low, high)`` per channel.
    """
    arr, _ = _as_numpy(img)
    out = np.empty((arr.shape[0], 2), np.float64)
    for c in range(arr.shape[0]):
        ch = arr[c]
        vals = ch[valid_mask(ch, ignore_zeros, ignore_saturated)].astype(np.float64)
        out[c] = np.percentile(vals, [lower, upper])
    return out


class RobustScaleIntensity(Transform):
    """Per channel, map the valid pixels' ``lower`` / ``upper`` percentiles to ``b_min`` / ``b_max``.

    ``y = b_min + (x - p_low) / (p_high - p_low) * (b_max - b_min)`` (a constant channel, where
    ``p_high == p_low``, becomes ``b_min``). Zero pixels are left out of the percentiles when
    ``ignore_zeros`` and, when ``fill_zeros``, set to the channel's median valid value after
    scaling (zero padding then looks like background, not like a black object). Saturated pixels
    (the channel maximum, shared by at least two pixels) are left out when ``ignore_saturated``.

    Args:
        lower, upper: percentiles in ``[0, 100]``, ``lower < upper``.
        b_min, b_max: output values of the two percentiles.
        clip: clip the output to ``[b_min, b_max]``.
        ignore_zeros, ignore_saturated, fill_zeros: see above.

    Input and output: ``C...`` array or tensor (channel first, any spatial rank), float32 out.
    """

    def __init__(self, lower: float = 1.0, upper: float = 99.0, b_min: float = 0.0, b_max: float = 1.0,
                 clip: bool = False, ignore_zeros: bool = True, ignore_saturated: bool = True,
                 fill_zeros: bool = True) -> None:
        if not (0.0 <= float(lower) < float(upper) <= 100.0):
            raise NormalisationError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower, self.upper = float(lower), float(upper)
        self.b_min, self.b_max = float(b_min), float(b_max)
        self.clip, self.ignore_zeros, self.ignore_saturated = bool(clip), bool(ignore_zeros), bool(ignore_saturated)
        self.fill_zeros = bool(fill_zeros)

    def __call__(self, img):
        arr, _ = _as_numpy(img)
        arr = arr.astype(np.float32, copy=False)
        out = np.empty_like(arr)
        for c in range(arr.shape[0]):
            ch = arr[c]
            ok = valid_mask(ch, self.ignore_zeros, self.ignore_saturated)
            vals = ch[ok].astype(np.float64)
            lo, hi = np.percentile(vals, [self.lower, self.upper])
            if hi > lo:
                y = self.b_min + (ch - lo) / (hi - lo) * (self.b_max - self.b_min)
            else:
                y = np.full_like(ch, self.b_min)
            if self.clip:
                y = np.clip(y, self.b_min, self.b_max)
            if self.ignore_zeros and self.fill_zeros:
                zeros = ch == 0
                if zeros.any() and not zeros.all():
                    y[zeros] = np.median(y[~zeros & ok]) if (~zeros & ok).any() else self.b_min
            out[c] = y
        return _like(out, img)


class RobustScaleIntensityd(MapTransform):
    """Dictionary twin of :class:`RobustScaleIntensity` (same arguments, applied to each of ``keys``)."""

    def __init__(self, keys: KeysCollection, lower: float = 1.0, upper: float = 99.0, b_min: float = 0.0,
                 b_max: float = 1.0, clip: bool = False, ignore_zeros: bool = True, ignore_saturated: bool = True,
                 fill_zeros: bool = True, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.t = RobustScaleIntensity(lower, upper, b_min, b_max, clip, ignore_zeros, ignore_saturated, fill_zeros)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.t(d[key])
        return d


class DivideBackground(Transform):
    """Per channel, divide by the Gaussian-blurred valid pixels (flat-field correction).

    ``background = G_sigma(x * m) / G_sigma(m)`` with ``m`` the valid pixels (:func:`valid_mask`,
    zeros ignored), so zero padding does not darken the background near it; output
    ``x / max(background, eps * median(background))``, and 0 where the input is 0. A smooth
    multiplicative gradient (vignetting) becomes flat around 1; structures much smaller than
    ``sigma`` keep their contrast. ``sigma`` is in pixels of the array (after any downsampling);
    ``sigma=None`` or ``0`` returns the input unchanged (float32).

    Input and output: ``C...`` array or tensor (channel first), float32 out.
    """

    def __init__(self, sigma: float | Sequence[float] | None = 50.0, eps: float = 0.05) -> None:
        if sigma is not None and np.any(np.asarray(sigma, float) < 0):
            raise NormalisationError(f"sigma must be >= 0, got {sigma}")
        self.sigma, self.eps = sigma, float(eps)

    def __call__(self, img):
        from scipy.ndimage import gaussian_filter

        arr, _ = _as_numpy(img)
        arr = arr.astype(np.float32, copy=False)
        if self.sigma is None or not np.any(np.asarray(self.sigma, float) > 0):
            return _like(arr.copy(), img)
        out = np.empty_like(arr)
        for c in range(arr.shape[0]):
            ch = arr[c]
            m = valid_mask(ch, ignore_zeros=True, ignore_saturated=False).astype(np.float32)
            num = gaussian_filter(ch * m, self.sigma, mode="reflect")
            den = gaussian_filter(m, self.sigma, mode="reflect")
            bg = num / np.maximum(den, 1e-6)
            floor = self.eps * float(np.median(bg[m > 0])) if (m > 0).any() else 1e-6
            y = ch / np.maximum(bg, max(floor, 1e-12))
            y[ch == 0] = 0.0
            out[c] = y
        return _like(out, img)


class DivideBackgroundd(MapTransform):
    """Dictionary twin of :class:`DivideBackground`."""

    def __init__(self, keys: KeysCollection, sigma: float | Sequence[float] | None = 50.0, eps: float = 0.05,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.t = DivideBackground(sigma, eps)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.t(d[key])
        return d
