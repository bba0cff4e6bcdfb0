"""Resolution: Fourier ring / shell correlation curves and the resolution at a threshold (1/7)."""

from __future__ import annotations

import numpy as np

from common.metrics.base import DegenerateInputError, _images_2d3d, _safe_ratio, _spacing_tuple

__all__ = ["fourier_ring_correlation", "frc_resolution"]


def fourier_ring_correlation(a, b, spacing=1.0, n_bins=None, window="hann"):
    """Fourier ring (2D) / shell (3D) correlation between two images.

    ``FRC(k) = Re sum_{|f| in bin k} A(f) B*(f) / sqrt(sum |A|^2 sum |B|^2)``

    Args:
        a, b (ndarray, shape (Y, X) or (Z, Y, X)): Two images of the same field (e.g. two independent acquisitions, or
            prediction vs target).
        spacing (float or sequence of float): Voxel size in micrometres (per axis, ZYX order).
        n_bins (int, optional): Number of rings/shells. Bins are isotropic in *physical* frequency: equal
            width intervals of ``|f| = sqrt(sum_i f_i^2)`` (cycles/um) from 0 up to
            ``f_max = min_i 1 / (2 spacing_i)`` (the smallest Nyquist frequency, so every
            shell is fully sampled along every axis). Default:
            ``floor(f_max / df)`` with ``df = max_i 1 / (n_i spacing_i)``, the coarsest
            frequency step, so that no bin is empty. Frequencies above ``f_max`` (the
            corners) are ignored.
        window ({"hann", "tukey", None} or str): Apodisation applied to both images before the FFT
            (:func:`skimage.filters.window`) to suppress the edge cross in the spectrum,
            which would otherwise correlate between ``a`` and ``b``.

    Returns:
        freqs (ndarray, shape (n_bins,)): Bin centres in 1/um.
        frc (ndarray, shape (n_bins,)): Correlation in [-1, 1]; 0 where a bin has no energy in ``a`` or ``b``.

    Raises:
        DegenerateInputError: ``a`` or ``b`` is constant (all zero included): it has no structure to correlate,
            and after apodisation its spectrum is the window's, so any curve would be an
            artefact. A constant *prediction* has resolved nothing; callers that compare
            models report that as an infinitely coarse resolution (see
            :func:`common.spotlight.evaluation.pixel_metrics`).
        ValueError: Shape mismatch, ndim not 2 or 3.
    """
    a, b = _images_2d3d(a, b, ("a", "b"), "FRC")
    for name, x in (("a", a), ("b", b)):
        if x.size == 0 or x.max() == x.min():
            value = f" (every value {x.flat[0]:g})" if x.size else ""
            raise DegenerateInputError(f"Fourier ring correlation: image {name} is constant{value}, so there is no "
                                       "structure to correlate; check the image (a blank or failed acquisition or "
                                       "prediction)")
    sp = _spacing_tuple(spacing, a.ndim)
    if window is not None:
        from skimage.filters import window as _window

        w = _window(window, a.shape)
        a = a * w
        b = b * w
    # real FFT: the last axis holds non-negative frequencies only; every other
    # coefficient stands for a Hermitian pair, hence weight 2 (0 and Nyquist: weight 1)
    fa = np.fft.rfftn(a)
    fb = np.fft.rfftn(b)
    grids = [np.fft.fftfreq(n, d=d) for n, d in zip(a.shape[:-1], sp[:-1])]
    grids.append(np.fft.rfftfreq(a.shape[-1], d=sp[-1]))
    r2 = np.zeros(fa.shape)
    for ax, g in enumerate(grids):
        shape = [1] * a.ndim
        shape[ax] = g.size
        r2 = r2 + g.reshape(shape) ** 2
    radius = np.sqrt(r2)
    weight = np.full(fa.shape[-1], 2.0)
    weight[0] = 1.0
    if a.shape[-1] % 2 == 0:
        weight[-1] = 1.0
    weight = np.broadcast_to(weight, fa.shape)

    f_max = min(1.0 / (2.0 * d) for d in sp)
    if n_bins is None:
        df = max(1.0 / (n * d) for n, d in zip(a.shape, sp))
        n_bins = max(int(np.floor(f_max / df + 1e-9)), 1)
    edges = np.linspace(0.0, f_max, n_bins + 1)
    idx = np.digitize(radius.ravel(), edges) - 1  # bin k: edges[k] <= r < edges[k+1]
    idx[radius.ravel() == f_max] = n_bins - 1
    keep = (idx >= 0) & (idx < n_bins)
    idx = idx[keep]
    w = weight.ravel()[keep]
    fa_ = fa.ravel()[keep]
    fb_ = fb.ravel()[keep]
    num = np.bincount(idx, weights=w * np.real(fa_ * np.conj(fb_)), minlength=n_bins)
    pa = np.bincount(idx, weights=w * np.abs(fa_) ** 2, minlength=n_bins)
    pb = np.bincount(idx, weights=w * np.abs(fb_) ** 2, minlength=n_bins)
    frc = _safe_ratio(num, np.sqrt(pa * pb), 0.0)
    freqs = 0.5 * (edges[:-1] + edges[1:])
    return freqs, np.clip(frc, -1.0, 1.0)


def frc_resolution(freqs, curve, threshold=1.0 / 7.0):
    """Resolution (um) where an FRC/FSC curve first drops below ``threshold``.

    Args:
        freqs (ndarray, shape (n,)): Increasing frequencies in 1/um (from :func:`fourier_ring_correlation`).
        curve (ndarray, shape (n,)): FRC values.
        threshold (float): Fixed threshold (1/7 ~ 0.143 by default).

    Returns:
        float: ``1 / f_c`` in um, where ``f_c`` is the first crossing, linearly interpolated
            between the last bin above and the first bin below the threshold. The first
            bin (which holds the zero frequency) is skipped. If the curve never drops
            below the threshold the resolution is limited by sampling and
            ``1 / freqs[-1]`` is returned; if it is already below at the second bin,
            ``1 / freqs[1]``.

    Raises:
        DegenerateInputError: The curve has NaN/inf values, or is 0 in every bin (no energy anywhere: the
            curve of two blank images), or the frequencies are not positive and increasing.
        ValueError: Shapes.
    """
    freqs = np.asarray(freqs, dtype=np.float64)
    curve = np.asarray(curve, dtype=np.float64)
    if freqs.shape != curve.shape or freqs.ndim != 1 or freqs.size < 2:
        raise ValueError("freqs and curve must be 1D arrays of equal length >= 2")
    if not (np.isfinite(curve).all() and np.isfinite(freqs).all()):
        raise DegenerateInputError("FRC curve or frequencies contain NaN/inf: no resolution can be read; "
                                   "compute the curve with fourier_ring_correlation on non-constant images")
    if not np.any(curve):
        raise DegenerateInputError("FRC curve is 0 in every bin (neither image has energy: blank images?); "
                                   "no resolution can be read")
    if freqs[1] <= 0 or np.any(np.diff(freqs) <= 0):
        raise DegenerateInputError("FRC frequencies must be positive (after the first bin) and increasing; "
                                   "pass the freqs returned by fourier_ring_correlation")
    below = np.nonzero(curve[1:] < threshold)[0]
    if below.size == 0:
        return float(1.0 / freqs[-1])
    k = int(below[0]) + 1
    if k == 1:
        return float(1.0 / freqs[1])
    f0, f1 = freqs[k - 1], freqs[k]
    c0, c1 = curve[k - 1], curve[k]
    fc = f0 + (c0 - threshold) * (f1 - f0) / (c0 - c1)
    return float(1.0 / fc)
