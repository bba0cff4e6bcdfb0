"""FUCCI spheroid preprocessing (after Tiling 2024): optional per-channel steps on intensities scaled to [0, 1].

Each step is optional (``enabled=False`` makes it the identity) and works per channel on ``CZYX``
(or ``CYX``) intensities already scaled to [0, 1] (MONAI ``ScaleIntensityRangePercentilesd(...,
clip=True)``); every step returns values in [0, 1] and the input's shape and type (MetaTensor meta
kept). The steps are the libraries' (MONAI ``ThresholdIntensity`` and ``MedianSmooth``,
scikit-image ``adjust_gamma`` and ``equalize_adapthist``, SciPy ``white_tophat``) with the range
check and the switch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MedianSmooth, ThresholdIntensity, Transform

from common.transforms import DictTwin, _channels_np, _like

__all__ = ["BackgroundThreshold", "BackgroundThresholdd", "GammaCorrection", "GammaCorrectiond", "CLAHE", "CLAHEd",
           "MedianFilter", "MedianFilterd", "TopHatRemoval", "TopHatRemovald"]


def _check_unit_range(x: np.ndarray, name: str) -> None:
    lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"{name} expects intensities in [0, 1], got {lo:.4g}..{hi:.4g}: put "
                         "ScaleIntensityRangePercentilesd(..., b_min=0, b_max=1, clip=True) before it")


def _per_channel(img, fn, name: str, check_range: bool = True):
    """Apply ``fn`` (numpy ``ZYX``/``YX`` -> same shape) to every channel of ``img``."""
    x = _channels_np(img).astype(np.float32, copy=False)
    if check_range:
        _check_unit_range(x, name)
    out = np.stack([np.asarray(fn(c), dtype=np.float32) for c in x]) if x.shape[0] else x
    return _like(img, np.clip(out, 0.0, 1.0).astype(np.float32, copy=False))


class _PerChannelDict(DictTwin):
    """Dictionary twin of a per-channel array transform (``array_cls(**kwargs)`` applied to every key)."""

    array_cls: type = Transform

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs):
        super().__init__(keys, allow_missing_keys)
        self.t = self.array_cls(**kwargs)


class BackgroundThreshold(Transform):
    """Set every value up to ``threshold`` to 0 (dark background and camera offset to exactly 0).

    MONAI's ``ThresholdIntensity(threshold, above=True, cval=0)`` with the [0, 1] range check and
    the ``enabled`` switch. Input/output: ``CZYX``/``CYX`` in [0, 1]; values ``> threshold`` are unchanged.
    """

    def __init__(self, threshold: float = 0.05, enabled: bool = True):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] (scaled intensities), got {threshold}")
        self.threshold = float(threshold)
        self.enabled = enabled

    def __call__(self, img):
        if not self.enabled:
            return img
        t = ThresholdIntensity(self.threshold, above=True, cval=0.0)
        return _per_channel(img, lambda c: t(c), "BackgroundThreshold")


class GammaCorrection(Transform):
    """``x ** gamma`` (:func:`skimage.exposure.adjust_gamma`): ``gamma < 1`` brightens dim nuclei.

    Not MONAI's ``AdjustContrast``: that one rescales by the image's own min and max (over all
    channels) before the power, which differs from ``x ** gamma`` unless every channel spans [0, 1].

    Input/output: ``CZYX``/``CYX`` in [0, 1] (0 and 1 are fixed points).
    """

    def __init__(self, gamma: float = 1.0, enabled: bool = True):
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.gamma = float(gamma)
        self.enabled = enabled

    def __call__(self, img):
        if not self.enabled or self.gamma == 1.0:
            return img
        from skimage.exposure import adjust_gamma

        return _per_channel(img, lambda c: adjust_gamma(c, self.gamma), "GammaCorrection")


class CLAHE(Transform):
    """Contrast-limited adaptive histogram equalisation (:func:`skimage.exposure.equalize_adapthist`).

    ``tile_grid`` is the number of contextual regions per axis, as OpenCV's ``tileGridSize``:
    ``(ty, tx)`` gives per-z-slice regions of ``ceil(Y / ty) x ceil(X / tx)`` pixels (the histogram
    of each region is built in its own slice, as slice-wise OpenCV CLAHE, but with one intensity
    scale for the whole stack, so nearly empty slices are not stretched to full range);
    ``(tz, ty, tx)`` gives 3D regions. ``clip_limit`` is scikit-image's normalised limit (0..1).

    Input/output: ``CZYX``/``CYX`` in [0, 1]; a constant channel is returned unchanged.
    """

    def __init__(self, clip_limit: float = 0.01, tile_grid: Sequence[int] = (8, 8), nbins: int = 256,
                 enabled: bool = True):
        if not 0.0 < clip_limit <= 1.0:
            raise ValueError(f"clip_limit must be in (0, 1], got {clip_limit}")
        self.tile_grid = tuple(int(t) for t in tile_grid)
        if len(self.tile_grid) not in (2, 3) or min(self.tile_grid) < 1:
            raise ValueError(f"tile_grid must be 2 (YX) or 3 (ZYX) positive ints, got {tile_grid}")
        self.clip_limit = float(clip_limit)
        self.nbins = int(nbins)
        self.enabled = enabled

    def kernel_size(self, shape: Sequence[int]) -> tuple:
        """Contextual-region size in voxels for a ``ZYX`` or ``YX`` channel of ``shape``."""
        shape = tuple(int(s) for s in shape)
        grid = self.tile_grid
        if len(grid) == 2 and len(shape) == 3:
            grid = (shape[0],) + grid  # one region per z-slice
        if len(grid) != len(shape):
            raise ValueError(f"tile_grid {self.tile_grid} does not fit a channel of shape {shape}")
        return tuple(max(1, -(-s // g)) for s, g in zip(shape, grid))

    def _one(self, c: np.ndarray) -> np.ndarray:
        from skimage.exposure import equalize_adapthist

        lo, hi = float(c.min()), float(c.max())
        if hi == lo:
            return c
        out = equalize_adapthist(c, kernel_size=self.kernel_size(c.shape), clip_limit=self.clip_limit,
                                 nbins=self.nbins)
        return out * (hi - lo) + lo  # scikit-image rescales to [0, 1]; keep the channel's range

    def __call__(self, img):
        if not self.enabled:
            return img
        return _per_channel(img, self._one, "CLAHE")


class MedianFilter(Transform):
    """Median filter against shot noise: MONAI's ``MedianSmooth`` (replicated borders).

    ``size``: odd window per axis, e.g. ``(1, 3, 3)`` = 3x3 within each z-slice (anisotropic
    stacks), or one odd int; MONAI's radius is ``(size - 1) / 2``. Same values as
    :func:`scipy.ndimage.median_filter` with ``mode="nearest"`` (checked in tests/test_fucci.py).
    Input/output: ``CZYX``/``CYX`` in [0, 1].
    """

    def __init__(self, size: int | Sequence[int] = (1, 3, 3), enabled: bool = True):
        self.size = size if isinstance(size, int) else tuple(int(s) for s in size)
        if min(np.atleast_1d(self.size)) < 1 or any(s % 2 == 0 for s in np.atleast_1d(self.size)):
            raise ValueError(f"size must be odd and >= 1, got {size}")
        self.enabled = enabled

    def __call__(self, img):
        if not self.enabled:
            return img

        def one(c):
            size = (self.size,) * c.ndim if isinstance(self.size, int) else self.size
            if len(size) != c.ndim:
                raise ValueError(f"median size {self.size} does not fit a channel of shape {c.shape}")
            return np.asarray(MedianSmooth(radius=tuple((s - 1) // 2 for s in size))(c[None]))[0]

        return _per_channel(img, one, "MedianFilter")


class TopHatRemoval(Transform):
    """Remove small bright artefacts: ``x - white_tophat(x)`` (= grey opening, :func:`scipy.ndimage.white_tophat`).

    Bright structures that fit nowhere inside the footprint (an ellipsoid of semi-axes ``radius``
    voxels per axis; radius 0 along z = within each slice) are flattened to their surroundings;
    nuclei larger than the footprint are kept. Choose ``radius`` below the nucleus radius and
    above the debris radius. Input/output: ``CZYX``/``CYX`` in [0, 1], never brighter than the input.
    """

    def __init__(self, radius: float | Sequence[float] = (0, 2, 2), enabled: bool = True):
        self.radius = radius
        self.enabled = enabled

    def __call__(self, img):
        if not self.enabled:
            return img
        import scipy.ndimage as ndi

        from common.segmentation import _ellipsoid_footprint

        def one(c):
            radii = [float(self.radius)] * c.ndim if np.isscalar(self.radius) else [float(r) for r in self.radius]
            if len(radii) != c.ndim or min(radii) < 0:
                raise ValueError(f"radius {self.radius} does not fit a channel of shape {c.shape}")
            return c - ndi.white_tophat(c, footprint=_ellipsoid_footprint(radii), mode="nearest")

        return _per_channel(img, one, "TopHatRemoval")


class BackgroundThresholdd(_PerChannelDict):
    """Dictionary version of :class:`BackgroundThreshold`."""

    array_cls = BackgroundThreshold


class GammaCorrectiond(_PerChannelDict):
    """Dictionary version of :class:`GammaCorrection`."""

    array_cls = GammaCorrection


class CLAHEd(_PerChannelDict):
    """Dictionary version of :class:`CLAHE`."""

    array_cls = CLAHE


class MedianFilterd(_PerChannelDict):
    """Dictionary version of :class:`MedianFilter`."""

    array_cls = MedianFilter


class TopHatRemovald(_PerChannelDict):
    """Dictionary version of :class:`TopHatRemoval`."""

    array_cls = TopHatRemoval
