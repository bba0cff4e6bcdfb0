"""Evaluation metrics shared by the zoo's bundles.

Pure functions, numpy in / numpy out (scikit-image style), plus a MONAI
``CumulativeIterationMetric`` / ignite handler for Pearson's r during validation.

Groups
------
* Image similarity for virtual staining (Ounkomol et al. 2018; Kalinin et al.,
  "Spotlight"): :func:`pearson_r`, :func:`psnr`, :func:`ssim`, :func:`rescale_to_range`,
  :func:`microssim_3d`, :func:`background_variability`,
  :func:`fourier_ring_correlation`, :func:`frc_resolution`, :class:`PearsonMetric`,
  :class:`PearsonR`.
* Instance segmentation (definitions of StarDist / Cellpose):
  :func:`match_instances`, :func:`matching`, :func:`average_precision`,
  :func:`dataset_average_precision`, :func:`aggregated_jaccard_index`.
* Semantic segmentation: :func:`per_class_scores`.
* Per-object morphology: :func:`object_features`, :func:`feature_profile_distance`,
  :func:`matched_feature_correlation`.

Conventions
-----------
Arrays are ``YX`` (2D) or ``ZYX`` (3D); ``spacing`` is the voxel size in micrometres
in the same axis order. Label images use 0 for background and positive integers for
objects (labels need not be consecutive).

Degenerate inputs
-----------------
A metric that is undefined on its input (constant reference image, empty mask, image
smaller than the metric's window, all-constant validation set) raises
:class:`DegenerateInputError` (a ``ValueError``) saying what is wrong and what to do.
Where a value is meaningful it is returned and documented instead: Pearson's r of a
constant image is 0.0, instance scores of two empty label images are 1.0, PSNR of
identical images is ``inf``. No function returns NaN unless its docstring says so.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse
import torch
from monai.handlers import IgniteMetricHandler
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components as _graph_components

from common.errors import ZooError

__all__ = [
    "DegenerateInputError",
    "pearson_r",
    "psnr",
    "ssim",
    "rescale_to_range",
    "microssim_3d",
    "background_variability",
    "fourier_ring_correlation",
    "frc_resolution",
    "PearsonMetric",
    "PearsonR",
    "match_instances",
    "matching",
    "average_precision",
    "dataset_average_precision",
    "aggregated_jaccard_index",
    "per_class_scores",
    "object_features",
    "feature_profile_distance",
    "matched_feature_correlation",
    "DEFAULT_IOU_THRESHOLDS",
]

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


# ----------------------------------------------------------------------------------
# image similarity
# ----------------------------------------------------------------------------------
def pearson_r(pred, target, mask=None):
    """Pearson correlation coefficient between two images.

    Parameters
    ----------
    pred, target : ndarray, shape (...)
        Images of identical shape (any dimensionality).
    mask : ndarray of bool, same shape, optional
        Only voxels where ``mask`` is True are used (e.g. the foreground).

    Returns
    -------
    r : float
        Pearson's r in [-1, 1]. If either input is constant over the evaluated
        voxels, r is defined as 0.0 (not NaN): a constant prediction carries no
        linear information about the target.

    Raises
    ------
    DegenerateInputError
        Empty mask.
    ValueError
        Shape mismatch.
    """
    x, y = _pair(pred, target, mask)
    x = x.ravel()
    y = y.ravel()
    # exact test: the mean of a constant float array is not always bit-equal to it
    if x.size < 2 or x.max() == x.min() or y.max() == y.min():
        return 0.0
    dx = x - x.mean()
    dy = y - y.mean()
    den = np.sqrt(np.dot(dx, dx) * np.dot(dy, dy))
    if den == 0:
        return 0.0
    return float(np.clip(np.dot(dx, dy) / den, -1.0, 1.0))


def psnr(pred, target, data_range=None, mask=None):
    """Peak signal-to-noise ratio ``10 log10(data_range**2 / MSE)`` in dB.

    Parameters
    ----------
    pred, target : ndarray, shape (...)
        Prediction and reference of identical shape.
    data_range : float, optional
        Dynamic range of the reference. Default: ``target.max() - target.min()``
        over the whole image, also when a mask is given (so that whole-image and
        foreground PSNR share one peak value). The Spotlight paper first maps the
        prediction onto the target range, see :func:`rescale_to_range`.
    mask : ndarray of bool, same shape, optional
        MSE over the masked voxels only, i.e. ``psnr(p, t, mask=m) ==
        skimage psnr(t[m], p[m], data_range=ptp(t))``.

    Returns
    -------
    float
        PSNR in dB; ``inf`` when the images are identical.

    Raises
    ------
    DegenerateInputError
        Empty mask, or a zero data range (constant target and no explicit
        ``data_range``).
    ValueError
        Shape mismatch.
    """
    if data_range is None:
        t = np.asarray(target)
        data_range = float(t.max()) - float(t.min()) if t.size else 0.0
    x, y = _pair(pred, target, mask)
    if not data_range > 0:
        raise DegenerateInputError(f"data_range is {data_range} (constant target): PSNR is undefined; pass "
                                   "data_range explicitly (e.g. the range of the training targets)")
    mse = float(np.mean((x - y) ** 2))
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def ssim(pred, target, data_range=None, mask=None, win_size=None, gaussian_weights=False, **kwargs):
    """Structural similarity (Wang et al. 2004) for 2D or 3D images.

    Wraps :func:`skimage.metrics.structural_similarity` with ``full=True`` and
    averages the local SSIM map.

    Parameters
    ----------
    pred, target : ndarray, shape (Y, X) or (Z, Y, X)
        Prediction and reference (single channel). Every axis must be at least
        ``win_size`` long.
    data_range : float, optional
        Default: ``target.max() - target.min()`` over the whole image (the SSIM
        constants C1, C2 are global, so the mask does not change them).
    mask : ndarray of bool, same shape, optional
        Average the SSIM map over ``mask`` instead of the whole image.
    win_size : int, optional
        Side of the sliding window (odd). Default as scikit-image: 7, or
        ``2 int(3.5 sigma + 0.5) + 1`` (11 for sigma 1.5) with ``gaussian_weights``.
    gaussian_weights : bool
        Gaussian-weighted window (sigma 1.5), as Wang et al.
    **kwargs
        Passed to :func:`skimage.metrics.structural_similarity` (e.g. ``K1``, ``K2``).

    Returns
    -------
    float
        Mean SSIM. As in scikit-image, the map is averaged only over voxels at least
        ``(win_size - 1) // 2`` from every border (where the window fits); with a
        mask, over the mask intersected with that interior. Hence a mask of all True
        reproduces scikit-image's value exactly.

    Raises
    ------
    DegenerateInputError
        Constant target without ``data_range``, an axis shorter than ``win_size``, or
        a mask with no voxel inside the interior.
    ValueError
        Shape mismatch, ndim not 2 or 3.
    """
    from skimage.metrics import structural_similarity

    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {pred.shape} and {target.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"ssim expects a 2D (YX) or 3D (ZYX) image, got ndim={pred.ndim}")
    if data_range is None:
        data_range = float(target.max() - target.min())
    if not data_range > 0:
        raise DegenerateInputError(f"data_range is {data_range} (constant target): SSIM is undefined; pass "
                                   "data_range explicitly (e.g. the range of the training targets)")
    if win_size is None:  # scikit-image's rule, needed here to know its border crop
        win_size = 2 * int(3.5 * kwargs.get("sigma", 1.5) + 0.5) + 1 if gaussian_weights else 7
    if min(pred.shape) < win_size:
        raise DegenerateInputError(
            f"every axis must be >= win_size={win_size}, got shape {pred.shape}; pass a smaller odd win_size"
        )
    mssim, smap = structural_similarity(
        target,
        pred,
        data_range=data_range,
        win_size=win_size,
        gaussian_weights=gaussian_weights,
        full=True,
        **kwargs,
    )
    if mask is None:
        return float(mssim)
    mask = _as_mask(mask, target.shape)
    pad = (win_size - 1) // 2
    inner = np.zeros_like(mask)
    inner[tuple(slice(pad, s - pad) for s in mask.shape)] = True
    sel = mask & inner
    if not sel.any():
        raise DegenerateInputError(f"mask has no voxel at least {pad} (= (win_size-1)//2) voxels from the border; "
                                   "pass a smaller odd win_size or a larger mask")
    return float(smap[sel].mean(dtype=np.float64))


def rescale_to_range(pred, lo, hi):
    """Min-max rescale ``pred`` linearly onto ``[lo, hi]``.

    Used before PSNR as in the Spotlight paper: the prediction is mapped onto the
    target's range (``lo=target.min(), hi=target.max()``).

    Parameters
    ----------
    pred : ndarray, shape (...)
    lo, hi : float
        Output range.

    Returns
    -------
    ndarray, float64, same shape
        ``lo + (pred - pred.min()) * (hi - lo) / (pred.max() - pred.min())``. A
        constant ``pred`` maps to ``lo`` everywhere.
    """
    pred = np.asarray(pred, dtype=np.float64)
    pmin, pmax = pred.min(), pred.max()
    if pmax == pmin:
        return np.full(pred.shape, float(lo))
    return lo + (pred - pmin) * ((hi - lo) / (pmax - pmin))


def _ms_ssim_min_size(ms_ssim_kwargs) -> int:
    """Smallest slice side (px) that torchmetrics' MS-SSIM accepts with these settings.

    Its rules: side >= 2**n and side // max(1, n - 1)**2 > kernel_size - 1 (n = len(betas)), and the
    reflect padding of the Gaussian window (half-width ``int(3.5 sigma + 0.5)``, or ``(kernel_size - 1) // 2``
    without ``gaussian_kernel``) must be smaller than the side at the coarsest scale, side // 2**(n-1);
    MicroSSIM's fit needs 7 px (a 7-px SSIM window).
    """
    betas = ms_ssim_kwargs.get("betas", (0.0448, 0.2856, 0.3001, 0.2363, 0.1333))
    n = len(betas)
    k = ms_ssim_kwargs.get("kernel_size", 11)
    k = max(k) if isinstance(k, (tuple, list)) else int(k)
    sigma = ms_ssim_kwargs.get("sigma", 1.5)
    sigma = max(sigma) if isinstance(sigma, (tuple, list)) else float(sigma)
    pad = int(3.5 * sigma + 0.5) if ms_ssim_kwargs.get("gaussian_kernel", True) else (k - 1) // 2
    return max(2 ** n, k * max(1, n - 1) ** 2, (pad + 1) * 2 ** (n - 1), 7)


def microssim_3d(pred, target, bg_percentile=3, **ms_ssim_kwargs):
    """MicroMS3IM (Ashesh et al. 2024, PyPI ``microssim``) of a 3D stack.

    ``microssim.MicroMS3IM`` is 2D only; as the package itself does for arrays with
    more than two dimensions, the background offsets, normalisation maximum and
    range-invariance factor are fitted on the whole stack, and the score is the mean
    of the per-z-slice MicroMS3IM.

    Parameters
    ----------
    pred, target : ndarray, shape (Z, Y, X)
    bg_percentile : int
        Percentile taken as background offset (package default 3).
    **ms_ssim_kwargs
        Passed to ``torchmetrics`` ``MultiScaleStructuralSimilarityIndexMeasure``
        (e.g. ``betas=(0.5, 0.5)`` and ``kernel_size=7`` for slices smaller than
        176 px, which the default 5 scales with an 11-px kernel need).

    Returns
    -------
    float
        Mean MicroMS3IM over the z slices where the target is not constant. A slice
        where the target is constant has no MS-SSIM (the package takes the slice's
        range as data range, 0 there, and gives an arbitrary 0 or NaN) and is left out,
        so blank or padded slices at the ends of a stack do not change the score.

    Raises
    ------
    ImportError
        The ``microssim`` package is not installed.
    DegenerateInputError
        The target is constant over the whole stack or in every slice, or a slice is
        smaller than the MS-SSIM settings allow (the message gives the minimum and
        settings that fit).
    ValueError
        Not 3D, or shape mismatch.
    """
    try:
        from microssim import MicroMS3IM
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "microssim_3d needs the optional package 'microssim' (pip install microssim); "
            f"import failed: {err}"
        ) from err
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"microssim_3d expects two ZYX stacks of equal shape, got {pred.shape} and {target.shape}")
    need = _ms_ssim_min_size(ms_ssim_kwargs)
    if min(target.shape[1:]) < need:
        raise DegenerateInputError(
            f"microssim_3d: slices of {target.shape[1]}x{target.shape[2]} px are smaller than the {need} px that "
            f"MS-SSIM needs with {ms_ssim_kwargs or 'its default 5 scales and 11-px kernel'}; pass "
            "betas=(0.5, 0.5), kernel_size=7 (slices >= 12 px), or skip MicroMS3IM for such small images")
    if target.max() == target.min():
        raise DegenerateInputError(f"microssim_3d: the target is constant (every value {target.flat[0]:g}): "
                                   "MicroMS3IM is undefined; evaluate on a target with structure")
    keep = [z for z in range(target.shape[0]) if target[z].max() > target[z].min()]
    metric = MicroMS3IM(bg_percentile=bg_percentile)
    try:
        metric.fit(target, pred)
        scores = [float(metric.score(target[z], pred[z], **ms_ssim_kwargs)) for z in keep]
    except (ValueError, RuntimeError) as err:  # the packages' own size checks, in case ours missed a rule
        raise DegenerateInputError(f"microssim_3d: stacks of shape {target.shape} with MS-SSIM settings "
                                   f"{ms_ssim_kwargs}: {err}; pass betas=(0.5, 0.5), kernel_size=7 or skip "
                                   "MicroMS3IM") from err
    bad = [z for z, v in zip(keep, scores) if not np.isfinite(v)]
    if bad:
        raise DegenerateInputError(f"microssim_3d: MS-SSIM is not finite in z slice(s) {bad} (normalised target "
                                   "range 0 after the background offset?); check those slices of the target")
    return float(np.mean(scores))


def background_variability(pred, mask):
    """Standard deviation of ``pred`` outside the foreground ``mask``.

    Quantifies background noise/haze of a virtual stain (Spotlight's claim that the
    foreground-aware loss suppresses background).

    Parameters
    ----------
    pred : ndarray, shape (...)
    mask : ndarray of bool, same shape
        Foreground; the statistic is computed where ``mask`` is False.

    Returns
    -------
    float
        Population std (ddof=0) of the background voxels, in the units of ``pred``.

        An empty mask (no foreground) gives the std of the whole image.

    Raises
    ------
    DegenerateInputError
        No background voxel (the mask covers the whole image).
    ValueError
        Shape mismatch.
    """
    pred = np.asarray(pred, dtype=np.float64)
    mask = _as_mask(mask, pred.shape)
    bg = pred[~mask]
    if bg.size == 0:
        raise DegenerateInputError("mask covers the whole image: no background to evaluate; background "
                                   "variability needs a foreground mask that leaves some background")
    return float(bg.std())


# ----------------------------------------------------------------------------------
# Fourier ring / shell correlation
# ----------------------------------------------------------------------------------
def _spacing_tuple(spacing, ndim):
    if np.isscalar(spacing):
        return (float(spacing),) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise ValueError(f"spacing has {len(spacing)} entries for a {ndim}D image")
    return spacing


def fourier_ring_correlation(a, b, spacing=1.0, n_bins=None, window="hann"):
    """Fourier ring (2D) / shell (3D) correlation between two images.

    ``FRC(k) = Re sum_{|f| in bin k} A(f) B*(f) / sqrt(sum |A|^2 sum |B|^2)``

    Parameters
    ----------
    a, b : ndarray, shape (Y, X) or (Z, Y, X)
        Two images of the same field (e.g. two independent acquisitions, or
        prediction vs target).
    spacing : float or sequence of float
        Voxel size in micrometres (per axis, ZYX order).
    n_bins : int, optional
        Number of rings/shells. Bins are isotropic in *physical* frequency: equal
        width intervals of ``|f| = sqrt(sum_i f_i^2)`` (cycles/um) from 0 up to
        ``f_max = min_i 1 / (2 spacing_i)`` (the smallest Nyquist frequency, so every
        shell is fully sampled along every axis). Default:
        ``floor(f_max / df)`` with ``df = max_i 1 / (n_i spacing_i)``, the coarsest
        frequency step, so that no bin is empty. Frequencies above ``f_max`` (the
        corners) are ignored.
    window : {"hann", "tukey", None} or str
        Apodisation applied to both images before the FFT
        (:func:`skimage.filters.window`) to suppress the edge cross in the spectrum,
        which would otherwise correlate between ``a`` and ``b``.

    Returns
    -------
    freqs : ndarray, shape (n_bins,)
        Bin centres in 1/um.
    frc : ndarray, shape (n_bins,)
        Correlation in [-1, 1]; 0 where a bin has no energy in ``a`` or ``b``.

    Raises
    ------
    DegenerateInputError
        ``a`` or ``b`` is constant (all zero included): it has no structure to correlate,
        and after apodisation its spectrum is the window's, so any curve would be an
        artefact. A constant *prediction* has resolved nothing; callers that compare
        models report that as an infinitely coarse resolution (see
        :func:`common.spotlight.evaluation.pixel_metrics`).
    ValueError
        Shape mismatch, ndim not 2 or 3.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim not in (2, 3):
        raise ValueError(f"FRC expects a 2D or 3D image, got ndim={a.ndim}")
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

    Parameters
    ----------
    freqs : ndarray, shape (n,)
        Increasing frequencies in 1/um (from :func:`fourier_ring_correlation`).
    curve : ndarray, shape (n,)
        FRC values.
    threshold : float
        Fixed threshold (1/7 ~ 0.143 by default).

    Returns
    -------
    float
        ``1 / f_c`` in um, where ``f_c`` is the first crossing, linearly interpolated
        between the last bin above and the first bin below the threshold. The first
        bin (which holds the zero frequency) is skipped. If the curve never drops
        below the threshold the resolution is limited by sampling and
        ``1 / freqs[-1]`` is returned; if it is already below at the second bin,
        ``1 / freqs[1]``.

    Raises
    ------
    DegenerateInputError
        The curve has NaN/inf values, or is 0 in every bin (no energy anywhere: the
        curve of two blank images), or the frequencies are not positive and increasing.
    ValueError
        Shapes.
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


# ----------------------------------------------------------------------------------
# MONAI / ignite Pearson metric
# ----------------------------------------------------------------------------------
def _batch_pearson(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample Pearson r of batch-first tensors (B, C, ...) -> (B, 1); constant -> 0."""
    if y_pred.shape != y.shape:
        raise ValueError(f"y_pred and y must have the same shape, got {tuple(y_pred.shape)} and {tuple(y.shape)}")
    if y_pred.ndim < 2:
        raise ValueError("expected batch-first tensors (B, C, ...)")
    x = y_pred.detach().reshape(y_pred.shape[0], -1).double()
    t = y.detach().reshape(y.shape[0], -1).double().to(x.device)
    const = (x.amax(1) == x.amin(1)) | (t.amax(1) == t.amin(1))
    dx = x - x.mean(1, keepdim=True)
    dt = t - t.mean(1, keepdim=True)
    den = torch.sqrt((dx * dx).sum(1) * (dt * dt).sum(1))
    r = (dx * dt).sum(1) / torch.where(den > 0, den, torch.ones_like(den))
    r = torch.where(const | (den == 0), torch.zeros_like(r), r).clamp(-1.0, 1.0)
    return r.float().unsqueeze(1)


class PearsonMetric(CumulativeIterationMetric):
    """Per-sample Pearson correlation, accumulated over iterations (MONAI metric).

    Each batch item (all channels and voxels flattened) gives one r; a constant
    prediction or target gives r = 0 (not NaN). ``aggregate()`` reduces the buffer
    of shape (N, 1) with ``reduction`` (default: mean over all samples).

    Usage in a bundle config::

        {"_target_": "IgniteMetricHandler",
         "metric_fn": {"_target_": "common.metrics.PearsonMetric"},
         "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}

    or simply ``{"_target_": "common.metrics.PearsonR", ...}``.

    Parameters
    ----------
    reduction : MetricReduction or str
        As in MONAI (``"mean"``, ``"none"``, ...).
    get_not_nans : bool
        Also return the count of non-NaN values from ``aggregate``.
    """

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False) -> None:
        super().__init__()
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if y is None:
            raise ValueError("PearsonMetric needs both y_pred and y")
        return _batch_pearson(y_pred, y)

    def aggregate(self, reduction: MetricReduction | str | None = None):
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f


class PearsonR(IgniteMetricHandler):
    """Ignite handler computing the mean per-sample Pearson r (like ``monai.handlers.MeanDice``).

    Parameters
    ----------
    reduction : MetricReduction or str
        Reduction over samples (default mean).
    output_transform : callable
        Extracts ``(y_pred, y)`` from ``engine.state.output``, e.g.
        ``monai.handlers.from_engine(["pred", "label"])``.
    save_details : bool
        Store per-sample values in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        super().__init__(
            metric_fn=PearsonMetric(reduction=reduction),
            output_transform=output_transform,
            save_details=save_details,
        )


# ----------------------------------------------------------------------------------
# instance matching (StarDist / Cellpose definitions)
# ----------------------------------------------------------------------------------
def _check_labels(labels, name):
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        raise TypeError(f"{name} must be an integer label image, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} has negative labels")
    return labels


def _sequential(labels):
    """Flattened labels renumbered 1..n (0 kept) and the original ids, ascending.

    Own lookup table instead of skimage's relabel_sequential: we need the sorted ids
    anyway, and a bincount LUT is O(voxels) when labels are not huge numbers.
    """
    flat = labels.ravel().astype(np.int64, copy=False)
    top = int(flat.max(initial=0))
    if top <= 4 * flat.size + 1_000_000:
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = False
        ids = np.nonzero(present)[0]
        lut = np.zeros(top + 1, dtype=np.int64)
        lut[ids] = np.arange(1, ids.size + 1)
        return lut[flat], ids
    ids, inv = np.unique(flat, return_inverse=True)
    if ids[0] == 0:
        return inv.astype(np.int64), ids[1:]
    return inv.astype(np.int64) + 1, ids


def _overlap_pairs(gt, pred):
    """Sparse contingency table of two label images.

    Returns (gt_ids, pred_ids, gt_area, pred_area, rows, cols, inter) where
    ``rows``/``cols`` index ``gt_ids``/``pred_ids`` and ``inter`` is the voxel count
    of each overlapping (non-background) pair.
    """
    gt = _check_labels(gt, "gt")
    pred = _check_labels(pred, "pred")
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred must have the same shape, got {gt.shape} and {pred.shape}")
    g, gt_ids = _sequential(gt)
    p, pred_ids = _sequential(pred)
    ng, np_ = gt_ids.size, pred_ids.size
    g = g.ravel()
    p = p.ravel()
    gt_area = np.bincount(g, minlength=ng + 1)[1:]
    pred_area = np.bincount(p, minlength=np_ + 1)[1:]
    both = (g > 0) & (p > 0)
    code = g[both] * (np_ + 1) + p[both]
    if (ng + 1) * (np_ + 1) <= 4 * code.size + 1_000_000:
        # dense bincount is O(voxels) and fastest while the table stays small
        counts = np.bincount(code, minlength=(ng + 1) * (np_ + 1))
        code = np.nonzero(counts)[0]
        inter = counts[code]
    else:
        code, inter = np.unique(code, return_counts=True)
    rows = code // (np_ + 1) - 1
    cols = code % (np_ + 1) - 1
    return gt_ids, pred_ids, gt_area, pred_area, rows, cols, inter.astype(np.int64)


def match_instances(gt_labels, pred_labels, return_labels=False, sparse=False):
    """IoU between every ground-truth and predicted object (2D or 3D).

    Built from a contingency table (one ``np.bincount`` over the voxels, or
    ``np.unique`` of pair codes when the table would be large), so it is fast for
    thousands of objects.

    Parameters
    ----------
    gt_labels, pred_labels : ndarray of int, shape (Y, X) or (Z, Y, X)
        Label images (0 = background). Labels need not be consecutive.
    return_labels : bool
        Also return the object labels indexing rows and columns.
    sparse : bool
        Return a ``scipy.sparse.csr_matrix`` (only overlapping pairs stored) instead
        of a dense array.

    Returns
    -------
    iou : ndarray, shape (n_gt, n_pred)
        ``iou[i, j] = |G_i & P_j| / |G_i | P_j|`` with rows in increasing order of
        ground-truth label and columns in increasing order of predicted label.
    gt_ids, pred_ids : ndarray of int, shapes (n_gt,), (n_pred,)
        Only if ``return_labels``.
    """
    gt_ids, pred_ids, ga, pa, rows, cols, inter = _overlap_pairs(gt_labels, pred_labels)
    vals = inter / (ga[rows] + pa[cols] - inter)
    shape = (gt_ids.size, pred_ids.size)
    if sparse:
        iou = scipy.sparse.csr_matrix((vals, (rows, cols)), shape=shape)
    else:
        iou = np.zeros(shape, dtype=np.float64)
        iou[rows, cols] = vals
    return (iou, gt_ids, pred_ids) if return_labels else iou


def _match_at_threshold(rows, cols, vals, n_gt, n_pred, th):
    """Optimal one-to-one matching on the IoU >= th graph.

    Uses Cellpose's cost ``-(iou >= th) - iou / (2 n_min)`` (maximum number of
    matches, ties broken by the largest summed IoU), solved with
    ``linear_sum_assignment`` independently on each connected component of the
    bipartite graph (components do not interact, and at th > 0.5 nearly all are a
    single pair), so thousands of objects stay cheap.
    Returns indices (gt_idx, pred_idx) of the matched pairs and their IoU.
    """
    sel = vals >= th
    r, c, v = rows[sel], cols[sel], vals[sel]
    if r.size == 0:
        return r, c, v
    n_min = max(min(n_gt, n_pred), 1)
    graph = scipy.sparse.coo_matrix((np.ones(r.size), (r, c + n_gt)), shape=(n_gt + n_pred,) * 2)
    _, comp = _graph_components(graph, directed=False)
    edge_comp = comp[r]
    sizes = np.bincount(edge_comp)
    single = sizes[edge_comp] == 1
    out_r, out_c, out_v = [r[single]], [c[single]], [v[single]]
    for k in np.unique(edge_comp[~single]):
        e = edge_comp == k
        ur, ri = np.unique(r[e], return_inverse=True)
        uc, ci = np.unique(c[e], return_inverse=True)
        iou = np.zeros((ur.size, uc.size))
        iou[ri, ci] = v[e]
        cost = -(iou >= th).astype(float) - iou / (2 * n_min)
        a, b = linear_sum_assignment(cost)
        ok = iou[a, b] >= th
        out_r.append(ur[a[ok]])
        out_c.append(uc[b[ok]])
        out_v.append(iou[a[ok], b[ok]])
    return np.concatenate(out_r), np.concatenate(out_c), np.concatenate(out_v)


def matching(gt, pred, thresholds=DEFAULT_IOU_THRESHOLDS):
    """Match predicted to ground-truth objects at several IoU thresholds.

    A pair counts as a true positive if it is part of the optimal one-to-one
    assignment (``scipy.optimize.linear_sum_assignment``, Cellpose's cost: maximise
    the number of pairs with IoU >= threshold, then their IoU) and its IoU >=
    threshold. Counts are identical to ``cellpose.metrics.average_precision`` for
    consecutive labels (Cellpose counts objects as ``labels.max()``; here the
    number of distinct non-zero labels).

    Parameters
    ----------
    gt, pred : ndarray of int, shape (Y, X) or (Z, Y, X)
        Label images (0 = background).
    thresholds : float or sequence of float
        IoU thresholds (default 0.50, 0.55, ..., 0.95).

    Returns
    -------
    dict
        ``thresholds`` (T,); ``tp``, ``fp``, ``fn`` (T,) int; ``n_true``, ``n_pred``
        int; ``precision`` = TP/(TP+FP), ``recall`` = TP/(TP+FN),
        ``f1`` = 2TP/(2TP+FP+FN), ``ap`` = TP/(TP+FP+FN) (T,) float;
        ``mean_matched_iou`` (T,) (NaN without matches); and per threshold lists
        ``matched_gt``, ``matched_pred`` (original labels) and ``matched_iou``.
        A ratio with a zero denominator is 1.0 when both images are empty (nothing
        to find, nothing found) and 0.0 otherwise.
    """
    thresholds = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    gt_ids, pred_ids, ga, pa, rows, cols, inter = _overlap_pairs(gt, pred)
    vals = inter / (ga[rows] + pa[cols] - inter)
    n_true, n_pred = gt_ids.size, pred_ids.size
    tp = np.zeros(thresholds.size, dtype=np.int64)
    mg, mp, mi = [], [], []
    for k, th in enumerate(thresholds):
        a, b, v = _match_at_threshold(rows, cols, vals, n_true, n_pred, th)
        tp[k] = a.size
        order = np.argsort(a, kind="stable")
        mg.append(gt_ids[a[order]])
        mp.append(pred_ids[b[order]])
        mi.append(v[order])
    fp = n_pred - tp
    fn = n_true - tp
    empty = 1.0 if (n_true == 0 and n_pred == 0) else 0.0
    with np.errstate(invalid="ignore"):
        mean_iou = np.array([m.mean() if m.size else np.nan for m in mi])
    return {
        "thresholds": thresholds,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "n_true": int(n_true),
        "n_pred": int(n_pred),
        "precision": _safe_ratio(tp, tp + fp, empty),
        "recall": _safe_ratio(tp, tp + fn, empty),
        "f1": _safe_ratio(2 * tp, 2 * tp + fp + fn, empty),
        "ap": _safe_ratio(tp, tp + fp + fn, empty),
        "mean_matched_iou": mean_iou,
        "matched_gt": mg,
        "matched_pred": mp,
        "matched_iou": mi,
    }


def average_precision(gt_list, pred_list, thresholds=(0.5, 0.75, 0.9)):
    """Per-image "average precision" AP = TP / (TP + FP + FN), as Cellpose/StarDist.

    Same interface and values as ``cellpose.metrics.average_precision`` (for
    consecutive labels), computed with :func:`matching`.

    Parameters
    ----------
    gt_list, pred_list : list of ndarray of int, or a single ndarray
        Ground-truth and predicted label images (2D or 3D each).
    thresholds : float or sequence of float
        IoU thresholds.

    Returns
    -------
    ap, tp, fp, fn : ndarray, shape (n_images, T), or (T,) for a single image
        ``ap`` is float64 (1.0 for an image where both label images are empty,
        where Cellpose would give NaN); counts are int64.
    """
    single = not isinstance(gt_list, (list, tuple))
    if single:
        gt_list, pred_list = [gt_list], [pred_list]
    if len(gt_list) != len(pred_list):
        raise ValueError(f"got {len(gt_list)} ground-truth and {len(pred_list)} predicted images")
    thresholds = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    shape = (len(gt_list), thresholds.size)
    ap = np.zeros(shape)
    tp = np.zeros(shape, dtype=np.int64)
    fp = np.zeros(shape, dtype=np.int64)
    fn = np.zeros(shape, dtype=np.int64)
    for n, (g, p) in enumerate(zip(gt_list, pred_list)):
        m = matching(g, p, thresholds)
        ap[n], tp[n], fp[n], fn[n] = m["ap"], m["tp"], m["fp"], m["fn"]
    if single:
        return ap[0], tp[0], fp[0], fn[0]
    return ap, tp, fp, fn


def dataset_average_precision(gt_list, pred_list, thresholds=DEFAULT_IOU_THRESHOLDS):
    """Dataset-level AP: TP, FP, FN are summed over all images *before* dividing.

    This weights every object equally (StarDist's ``matching_dataset``), unlike the
    mean of per-image AP, which weights every image equally.

    Parameters
    ----------
    gt_list, pred_list : sequence of ndarray of int
        Label images (2D or 3D each).
    thresholds : sequence of float
        IoU thresholds (default 0.50, 0.55, ..., 0.95).

    Returns
    -------
    dict
        ``thresholds`` (T,); summed ``tp``, ``fp``, ``fn`` (T,);
        ``ap`` = TP/(TP+FP+FN), ``precision``, ``recall``, ``f1`` = 2TP/(2TP+FP+FN)
        (T,); ``mAP`` = mean of ``ap`` over thresholds; ``n_images``;
        ``per_image_ap`` (n_images, T) for reference.
    """
    if len(gt_list) != len(pred_list):
        raise ValueError(f"got {len(gt_list)} ground-truth and {len(pred_list)} predicted images")
    thresholds = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    ap_i, tp_i, fp_i, fn_i = average_precision(list(gt_list), list(pred_list), thresholds)
    tp, fp, fn = tp_i.sum(0), fp_i.sum(0), fn_i.sum(0)
    empty = 1.0 if (tp.sum() + fp.sum() + fn.sum()) == 0 else 0.0
    ap = _safe_ratio(tp, tp + fp + fn, empty)
    return {
        "thresholds": thresholds,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "ap": ap,
        "mAP": float(ap.mean()),
        "precision": _safe_ratio(tp, tp + fp, empty),
        "recall": _safe_ratio(tp, tp + fn, empty),
        "f1": _safe_ratio(2 * tp, 2 * tp + fp + fn, empty),
        "n_images": len(gt_list),
        "per_image_ap": ap_i,
    }


def aggregated_jaccard_index(gt, pred):
    """Aggregated Jaccard Index (Kumar et al. 2017, IEEE TMI).

    For every ground-truth object G_i take the predicted object P_j with the
    largest IoU (a prediction may serve several G_i, as in the original
    definition); ``C += |G_i & P_j|``, ``U += |G_i | P_j|``. Ground-truth objects
    without any overlapping prediction add ``|G_i|`` to ``U``; predictions never
    selected add their area to ``U``. ``AJI = C / U``.

    Parameters
    ----------
    gt, pred : ndarray of int, shape (Y, X) or (Z, Y, X)

    Returns
    -------
    float
        AJI in [0, 1]; 1.0 when both images are empty.
    """
    gt_ids, pred_ids, ga, pa, rows, cols, inter = _overlap_pairs(gt, pred)
    if gt_ids.size == 0 and pred_ids.size == 0:
        return 1.0
    union = ga[rows] + pa[cols] - inter
    iou = inter / union
    best = np.full(gt_ids.size, -1, dtype=np.int64)
    best_iou = np.zeros(gt_ids.size)
    # per gt row: the overlapping pair with the highest IoU (ties: lowest pred label)
    order = np.lexsort((cols, -iou, rows))
    first = np.ones(order.size, dtype=bool)
    first[1:] = rows[order][1:] != rows[order][:-1]
    sel = order[first]
    best[rows[sel]] = cols[sel]
    best_iou[rows[sel]] = iou[sel]
    c = float(inter[sel].sum())
    u = float(union[sel].sum())
    u += float(ga[best < 0].sum())
    used = np.zeros(pred_ids.size, dtype=bool)
    used[cols[sel]] = True
    u += float(pa[~used].sum())
    return c / u if u > 0 else 1.0


# ----------------------------------------------------------------------------------
# semantic segmentation
# ----------------------------------------------------------------------------------
def per_class_scores(gt_sem, pred_sem, n_classes, zero_division=np.nan):
    """Per-class precision, recall, F1 (Dice) and IoU of semantic label maps.

    Parameters
    ----------
    gt_sem, pred_sem : ndarray of int, shape (...)
        Class index per voxel, values in ``0 .. n_classes - 1``.
    n_classes : int
    zero_division : float
        Value for a score whose denominator is 0 (class absent from both images for
        F1/IoU, absent from the prediction for precision, from the ground truth for
        recall). Default NaN, so that ``np.nanmean`` skips absent classes.

    Returns
    -------
    dict of ndarray, each shape (n_classes,) unless noted
        ``precision`` TP/(TP+FP), ``recall`` TP/(TP+FN), ``f1`` 2TP/(2TP+FP+FN),
        ``iou`` TP/(TP+FP+FN), ``support`` (ground-truth voxel count),
        ``confusion`` (n_classes, n_classes) with rows = ground truth, columns =
        prediction.
    """
    gt_sem = np.asarray(gt_sem)
    pred_sem = np.asarray(pred_sem)
    if gt_sem.shape != pred_sem.shape:
        raise ValueError(f"gt_sem and pred_sem must have the same shape, got {gt_sem.shape} and {pred_sem.shape}")
    g = gt_sem.ravel().astype(np.int64)
    p = pred_sem.ravel().astype(np.int64)
    for name, a in (("gt_sem", g), ("pred_sem", p)):
        if a.size and (a.min() < 0 or a.max() >= n_classes):
            raise ValueError(f"{name} has values outside 0..{n_classes - 1}")
    conf = np.bincount(g * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp = np.diag(conf).astype(np.float64)
    fp = conf.sum(0) - tp
    fn = conf.sum(1) - tp
    return {
        "precision": _safe_ratio(tp, tp + fp, zero_division),
        "recall": _safe_ratio(tp, tp + fn, zero_division),
        "f1": _safe_ratio(2 * tp, 2 * tp + fp + fn, zero_division),
        "iou": _safe_ratio(tp, tp + fp + fn, zero_division),
        "support": conf.sum(1),
        "confusion": conf,
    }


# ----------------------------------------------------------------------------------
# per-object morphology
# ----------------------------------------------------------------------------------
#: Feature columns produced by :func:`object_features` that describe shape/intensity
#: (identifiers and positions excluded); used by the profile comparisons.
SHAPE_FEATURES = (
    "volume",
    "surface_area",
    "sphericity",
    "axis_major_length",
    "axis_medium_length",
    "axis_minor_length",
    "extent",
    "solidity",
)
INTENSITY_FEATURES = ("intensity_mean", "intensity_std", "intensity_max", "intensity_min")


def object_features(labels, intensity=None, spacing=(1.0, 1.0, 1.0)):
    """Per-object 3D morphology (and intensity) features.

    Parameters
    ----------
    labels : ndarray of int, shape (Z, Y, X)
        Instance labels (0 = background).
    intensity : ndarray, shape (Z, Y, X), optional
        Intensity image for the ``intensity_*`` columns.
    spacing : sequence of 3 float
        Voxel size (dz, dy, dx) in micrometres.

    Returns
    -------
    pandas.DataFrame
        One row per object with columns ``label``; ``centroid_z/y/x`` (um);
        ``volume`` (um^3, voxel count x voxel volume); ``surface_area`` (um^2, area
        of the marching-cubes mesh at level 0.5 of the zero-padded binary object,
        :func:`skimage.measure.marching_cubes` + ``mesh_surface_area``, with
        ``spacing``); ``sphericity`` = pi^(1/3) (6 V)^(2/3) / A (1 for a sphere);
        ``axis_major/medium/minor_length`` (um, full lengths of the ellipsoid with
        the same second moments: ``sqrt(10 (l_j + l_k - l_i))`` from the
        eigenvalues l of regionprops' spacing-aware inertia tensor); ``extent``
        (volume / bounding-box volume); ``solidity`` (volume / convex-hull volume);
        and with ``intensity``: ``intensity_mean/std/max/min``.
    """
    import pandas as pd
    from skimage import measure

    labels = _check_labels(labels, "labels")
    if labels.ndim != 3:
        raise ValueError(f"object_features expects a ZYX label volume, got ndim={labels.ndim}")
    sp = _spacing_tuple(spacing, 3)
    if intensity is not None:
        intensity = np.asarray(intensity, dtype=np.float64)
        if intensity.shape != labels.shape:
            raise ValueError(f"intensity shape {intensity.shape} does not match labels {labels.shape}")
    cols = ["label", "centroid_z", "centroid_y", "centroid_x", *SHAPE_FEATURES]
    if intensity is not None:
        cols += list(INTENSITY_FEATURES)
    rows = []
    for rp in measure.regionprops(labels, intensity_image=intensity, spacing=sp):
        crop = np.pad(rp.image, 1).astype(np.float32)
        verts, faces, _, _ = measure.marching_cubes(crop, level=0.5, spacing=sp)
        area = float(measure.mesh_surface_area(verts, faces))
        vol = float(rp.area)
        ev = np.sort(np.asarray(rp.inertia_tensor_eigvals, dtype=np.float64))[::-1]  # l0 >= l1 >= l2
        major = np.sqrt(max(10.0 * (ev[0] + ev[1] - ev[2]), 0.0))
        medium = np.sqrt(max(10.0 * (ev[0] - ev[1] + ev[2]), 0.0))
        minor = np.sqrt(max(10.0 * (-ev[0] + ev[1] + ev[2]), 0.0))
        try:
            solidity = float(rp.solidity)
        except Exception:  # flat / tiny objects have no 3D convex hull (QhullError)
            solidity = 1.0
        row = [
            int(rp.label),
            *map(float, rp.centroid),
            vol,
            area,
            float(np.pi ** (1 / 3) * (6 * vol) ** (2 / 3) / area) if area > 0 else np.nan,
            float(major),
            float(medium),
            float(minor),
            float(rp.extent),
            solidity,
        ]
        if intensity is not None:
            row += [
                float(rp.intensity_mean),
                float(rp.intensity_std),
                float(rp.intensity_max),
                float(rp.intensity_min),
            ]
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def _feature_columns(feats_a, feats_b, features):
    if features is None:
        features = [c for c in (*SHAPE_FEATURES, *INTENSITY_FEATURES) if c in feats_a and c in feats_b]
    if not features:
        raise ValueError("no common feature column")
    return list(features)


def feature_profile_distance(feats_a, feats_b, features=None, reference=None):
    """Cosine distance between the median feature profiles of two object populations.

    Each feature is z-scored with the mean and std of ``reference`` (default
    ``feats_a``, e.g. objects segmented in the real stain), then the per-feature
    median over objects forms each population's profile;
    ``distance = 1 - <m_a, m_b> / (|m_a| |m_b|)``.

    Note: with the default reference, ``m_a`` is the median of z-scores of ``a``
    itself, i.e. a measure of the skew of ``a``'s distributions and close to 0, so
    the cosine is sensitive to noise; pass a separate control population as
    ``reference`` for a stable profile comparison.

    Parameters
    ----------
    feats_a, feats_b : pandas.DataFrame (or dict of 1D arrays)
        Outputs of :func:`object_features`.
    features : sequence of str, optional
        Columns to use (default: all shape and intensity features present in both).
    reference : DataFrame, optional
        Population providing the z-score statistics (default ``feats_a``).

    Returns
    -------
    float
        Cosine distance in [0, 2]; 0.0 if both profiles are the zero vector, 1.0 if
        exactly one is. Features with zero std in the reference are only centred.

    Raises
    ------
    DegenerateInputError
        A population without any object.
    """
    import pandas as pd

    fa = pd.DataFrame(feats_a)
    fb = pd.DataFrame(feats_b)
    ref = fa if reference is None else pd.DataFrame(reference)
    cols = _feature_columns(fa, fb, features)
    if len(fa) == 0 or len(fb) == 0:
        raise DegenerateInputError(f"feature profiles need at least one object in each population, got {len(fa)} "
                                   f"and {len(fb)}; check the segmentations (no object found?)")
    mu = ref[cols].to_numpy(np.float64).mean(0)
    sd = ref[cols].to_numpy(np.float64).std(0)
    sd = np.where(sd > 0, sd, 1.0)
    ma = np.nanmedian((fa[cols].to_numpy(np.float64) - mu) / sd, axis=0)
    mb = np.nanmedian((fb[cols].to_numpy(np.float64) - mu) / sd, axis=0)
    na, nb = np.linalg.norm(ma), np.linalg.norm(mb)
    if na == 0 and nb == 0:
        return 0.0
    if na == 0 or nb == 0:
        return 1.0
    return float(np.clip(1.0 - np.dot(ma, mb) / (na * nb), 0.0, 2.0))


def matched_feature_correlation(feats_gt, feats_pred, gt_labels, pred_labels, features=None, iou_threshold=0.5):
    """Per-feature Pearson r between ground-truth and predicted objects matched by IoU.

    Objects are paired by :func:`matching` at ``iou_threshold`` (unique at >= 0.5).

    Parameters
    ----------
    feats_gt, feats_pred : pandas.DataFrame
        :func:`object_features` of ``gt_labels`` and ``pred_labels`` (column ``label``).
    gt_labels, pred_labels : ndarray of int, shape (Z, Y, X)
        The label images the features were measured on.
    features : sequence of str, optional
        Columns to correlate (default: shape and intensity features present in both).
    iou_threshold : float

    Returns
    -------
    dict
        ``{feature: r}`` (r = 0.0 when a feature is constant over the matched
        objects, NaN when fewer than 2 pairs) plus ``"n_matched"``.
    """
    import pandas as pd

    fg = pd.DataFrame(feats_gt).set_index("label")
    fp = pd.DataFrame(feats_pred).set_index("label")
    cols = _feature_columns(fg, fp, features)
    m = matching(gt_labels, pred_labels, thresholds=[iou_threshold])
    g_lab, p_lab = m["matched_gt"][0], m["matched_pred"][0]
    out: dict = {}
    for c in cols:
        if g_lab.size < 2:
            out[c] = float("nan")
        else:
            out[c] = pearson_r(fp.loc[p_lab, c].to_numpy(), fg.loc[g_lab, c].to_numpy())
    out["n_matched"] = int(g_lab.size)
    return out


# ----------------------------------------------------------------------------------
# MONAI / ignite PSNR over the target's own range (validation of virtual staining)
# ----------------------------------------------------------------------------------
def _batch_range_psnr(y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR (dB) with ``data_range = max(y) - min(y)`` of each target -> (B, 1).

    MONAI's ``PSNRMetric`` needs one fixed ``max_val``; z-scored microscopy targets have none, so
    each sample uses its own target range (the convention of :func:`psnr`). A perfect prediction
    gives +inf; a constant target (range 0) has no PSNR: NaN in the buffer, which MONAI's mean
    reduction leaves out (as MONAI's ``DiceMetric`` does with an empty ground truth) and which
    :meth:`RangePSNRMetric.aggregate` refuses when no sample is left.
    """
    x = y_pred.detach().reshape(y_pred.shape[0], -1).double()
    t = y.detach().reshape(y.shape[0], -1).double().to(x.device)
    mse = ((x - t) ** 2).mean(1)
    rng = t.amax(1) - t.amin(1)
    val = 10.0 * torch.log10(rng**2 / mse)
    val = torch.where(rng > 0, val, torch.full_like(val, float("nan")))
    return val.float().unsqueeze(1)


class RangePSNRMetric(PearsonMetric):
    """Per-sample PSNR using each target's intensity range, accumulated like :class:`PearsonMetric`.

    Same value as :func:`psnr` ``(pred, target)`` per sample. Where :func:`psnr` raises for a
    constant target, this metric (which sees whole validation sets, following MONAI's convention)
    records NaN for that sample and leaves it out of the mean; ``get_not_nans=True`` returns how
    many samples counted. ``aggregate()`` raises :class:`DegenerateInputError` when every
    sample's target is constant, instead of MONAI's 0.
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if y is None:
            raise ValueError("RangePSNRMetric needs both y_pred and y")
        return _batch_range_psnr(y_pred, y)

    def aggregate(self, reduction: MetricReduction | str | None = None):
        data = self.get_buffer()
        if isinstance(data, torch.Tensor) and data.numel() and bool(torch.isnan(data).all()):
            raise DegenerateInputError(f"RangePSNR: all {data.shape[0]} target(s) are constant, so PSNR over the "
                                       "target's range is undefined; validate on targets with structure "
                                       "(scripts/check_data.py lists constant images)")
        return super().aggregate(reduction)


class RangePSNR(IgniteMetricHandler):
    """Ignite handler: mean per-sample PSNR (dB) with the target's range as ``data_range``."""

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN, output_transform: Callable = lambda x: x,
                 save_details: bool = True) -> None:
        super().__init__(metric_fn=RangePSNRMetric(reduction=reduction), output_transform=output_transform,
                         save_details=save_details)


# ----------------------------------------------------------------------------------
# Pearson's r on the target's foreground, for validating foreground-aware models (Spotlight)
# ----------------------------------------------------------------------------------
__all__ += ["ForegroundPearsonMetric", "ForegroundPearsonR"]


def _batch_foreground_pearson(y_pred: torch.Tensor, y: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per-sample Pearson r over the voxels where ``y >= threshold`` -> (B, 1); < 2 voxels or constant -> 0."""
    if y_pred.shape != y.shape:
        raise ValueError(f"y_pred and y must have the same shape, got {tuple(y_pred.shape)} and {tuple(y.shape)}")
    x = y_pred.detach().reshape(y_pred.shape[0], -1).double()
    t = y.detach().reshape(y.shape[0], -1).double().to(x.device)
    m = (t >= threshold).double()
    n = m.sum(1)
    nn_ = torch.where(n > 0, n, torch.ones_like(n))
    dx = (x - (x * m).sum(1, keepdim=True) / nn_[:, None]) * m
    dt = (t - (t * m).sum(1, keepdim=True) / nn_[:, None]) * m
    den = torch.sqrt((dx * dx).sum(1) * (dt * dt).sum(1))
    r = (dx * dt).sum(1) / torch.where(den > 0, den, torch.ones_like(den))
    r = torch.where((n < 2) | (den == 0), torch.zeros_like(r), r).clamp(-1.0, 1.0)
    return r.float().unsqueeze(1)


class ForegroundPearsonMetric(PearsonMetric):
    """Per-sample Pearson r restricted to the target's foreground ``y >= threshold``.

    With Otsu-standardised targets (:class:`common.spotlight.OtsuStandardize`) the default
    ``threshold=0.0`` is the target's Otsu foreground, where Spotlight's loss supervises
    intensities. Same value as ``pearson_r(pred, target, mask=target >= threshold)``; a sample
    with fewer than 2 foreground voxels or a constant prediction there gives 0.
    """

    def __init__(self, threshold: float = 0.0, reduction: MetricReduction | str = MetricReduction.MEAN,
                 get_not_nans: bool = False) -> None:
        super().__init__(reduction=reduction, get_not_nans=get_not_nans)
        self.threshold = float(threshold)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if y is None:
            raise ValueError("ForegroundPearsonMetric needs both y_pred and y")
        return _batch_foreground_pearson(y_pred, y, self.threshold)


class ForegroundPearsonR(IgniteMetricHandler):
    """Ignite handler: mean per-sample foreground Pearson r (see :class:`ForegroundPearsonMetric`)."""

    def __init__(self, threshold: float = 0.0, reduction: MetricReduction | str = MetricReduction.MEAN,
                 output_transform: Callable = lambda x: x, save_details: bool = True) -> None:
        super().__init__(metric_fn=ForegroundPearsonMetric(threshold=threshold, reduction=reduction),
                         output_transform=output_transform, save_details=save_details)


# ----------------------------------------------------------------------------------
# MONAI / ignite instance-segmentation AP over a whole validation/test set (isl_cell_instance)
# ----------------------------------------------------------------------------------
__all__ += ["scores_from_counts", "InstanceMatchingMetric", "InstanceAP"]


def scores_from_counts(tp, fp, fn):
    """AP = TP/(TP+FP+FN), precision, recall and F1 from (summed) counts, per threshold.

    The convention of :func:`dataset_average_precision`: a ratio with a zero denominator is 1.0
    when nothing was there and nothing was found (all counts 0 at every threshold), else 0.0.

    Parameters
    ----------
    tp, fp, fn : ndarray, shape (T,)

    Returns
    -------
    dict of ndarray, shape (T,): ``ap``, ``precision``, ``recall``, ``f1``; and ``mAP`` (float).
    """
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    empty = 1.0 if (tp.sum() + fp.sum() + fn.sum()) == 0 else 0.0
    ap = _safe_ratio(tp, tp + fp + fn, empty)
    return {
        "ap": ap,
        "precision": _safe_ratio(tp, tp + fp, empty),
        "recall": _safe_ratio(tp, tp + fn, empty),
        "f1": _safe_ratio(2 * tp, 2 * tp + fp + fn, empty),
        "mAP": float(ap.mean()),
    }


class InstanceMatchingMetric(CumulativeIterationMetric):
    """Instance matching of predicted vs ground-truth label images, accumulated over a data set.

    Every image (each batch item, on every DDP rank) adds one buffer row
    ``[TP(T), FP(T), FN(T), AJI]`` from :func:`matching` and :func:`aggregated_jaccard_index`;
    ``aggregate()`` sums the counts over **all** images before dividing (every object weighs the
    same, as :func:`dataset_average_precision`; not only the last image of a batch) and returns:

    * ``"mAP"``: mean over the IoU thresholds of TP/(TP+FP+FN);
    * ``"ap"``, ``"f1"``, ``"precision"``, ``"recall"``: at ``iou_threshold``;
    * ``"aji"``: mean over images of the aggregated Jaccard index.

    Parameters
    ----------
    metric : str
        One of the names above.
    thresholds : sequence of float
        IoU thresholds (default 0.50, 0.55, ..., 0.95).
    iou_threshold : float
        Threshold of ``"ap"``, ``"f1"``, ``"precision"``, ``"recall"`` (must be in ``thresholds``).

    Inputs ``y_pred``, ``y``: integer label images ``(B, 1, Y, X)`` / ``(B, 1, Z, Y, X)`` or lists
    of ``(1, ...)`` (images may differ in size).
    """

    METRICS = ("mAP", "ap", "f1", "precision", "recall", "aji")

    def __init__(self, metric: str = "mAP", thresholds=DEFAULT_IOU_THRESHOLDS, iou_threshold: float = 0.5) -> None:
        super().__init__()
        if metric not in self.METRICS:
            raise ValueError(f"metric must be one of {self.METRICS}, got {metric!r}")
        self.metric = metric
        self.thresholds = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
        hits = np.flatnonzero(np.isclose(self.thresholds, iou_threshold))
        if metric in ("ap", "f1", "precision", "recall") and hits.size == 0:
            raise ValueError(f"iou_threshold {iou_threshold} is not among the thresholds {self.thresholds.tolist()}")
        self.index = int(hits[0]) if hits.size else 0

    @staticmethod
    def _labels(t: torch.Tensor) -> np.ndarray:
        a = t.detach().cpu().numpy()
        if a.shape[0] != 1:
            raise ValueError(f"expected one channel of instance labels, got shape {tuple(a.shape)}")
        return np.rint(a[0]).astype(np.int64)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if y is None:
            raise ValueError("InstanceMatchingMetric needs both y_pred and y")
        if y_pred.shape[0] != y.shape[0] or y_pred.shape[2:] != y.shape[2:]:
            raise ValueError(f"y_pred {tuple(y_pred.shape)} and y {tuple(y.shape)} do not match")
        rows = []
        for p, g in zip(y_pred, y):
            gl, pl = self._labels(g), self._labels(p)
            m = matching(gl, pl, self.thresholds)
            rows.append(np.concatenate([m["tp"], m["fp"], m["fn"], [aggregated_jaccard_index(gl, pl)]]))
        return torch.as_tensor(np.stack(rows), dtype=torch.float64)

    def counts(self):
        """Summed ``(tp, fp, fn)`` (each shape (T,)) and the per-image AJI, over everything seen so far."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            raise ValueError("no image has been evaluated")
        d = data.reshape(-1, 3 * self.thresholds.size + 1).double().cpu().numpy()
        t = self.thresholds.size
        return d[:, :t].sum(0), d[:, t:2 * t].sum(0), d[:, 2 * t:3 * t].sum(0), d[:, -1]

    def aggregate(self):
        tp, fp, fn, aji = self.counts()
        if self.metric == "aji":
            return torch.tensor(float(aji.mean()), dtype=torch.float64)
        s = scores_from_counts(tp, fp, fn)
        if self.metric == "mAP":
            return torch.tensor(s["mAP"], dtype=torch.float64)
        return torch.tensor(float(s[self.metric][self.index]), dtype=torch.float64)


class InstanceAP(IgniteMetricHandler):
    """Ignite handler of :class:`InstanceMatchingMetric` (mAP by default) for validation/evaluation.

    Usage in a bundle config (the prediction post-processed to labels under ``pred_instances``,
    the ground truth under ``instances``)::

        {"_target_": "common.metrics.InstanceAP", "metric": "mAP",
         "output_transform": "$monai.handlers.from_engine(['pred_instances', 'instances'])"}
    """

    def __init__(self, metric: str = "mAP", thresholds=DEFAULT_IOU_THRESHOLDS, iou_threshold: float = 0.5,
                 output_transform: Callable = lambda x: x, save_details: bool = False) -> None:
        super().__init__(metric_fn=InstanceMatchingMetric(metric, thresholds, iou_threshold),
                         output_transform=output_transform, save_details=save_details)
